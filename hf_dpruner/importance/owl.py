"""OWL layer-wise sparsity ratios (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret
Sauce for Pruning LLMs to High Sparsity").

A block's outlier ratio is the share of its weights whose Wanda score ``|W_ij| · ||X_j||₂`` exceeds ``M`` times
the mean score of their matrix. Blocks with more outliers are pruned less: the ratios are rescaled linearly to
``[-λ, λ]`` around the target, so the mean sparsity over blocks stays the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float = 5.0) -> float:
    """Share of the entries of the score matrices that exceed `threshold` × their own matrix's mean."""
    if not scores:
        raise ValueError("outlier_ratio needs at least one score matrix.")
    outliers = sum(int((s > threshold * s.float().mean()).sum()) for s in scores)
    return outliers / sum(s.numel() for s in scores)


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsity from the blocks' outlier `ratios`: ``sparsity − λ · (2 · (r − r_min) / (r_max − r_min)
    − 1)`` re-centred to mean `sparsity` (equal ratios give `sparsity` everywhere); clipped to [0, 0.99]."""
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"The OWL range lambda must be in [0, 1), got {lam!r}.")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        return []
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return [float(sparsity)] * r.numel()
    keep_bonus = (r - r.min()) / spread * (2 * lam)
    keep_bonus = keep_bonus - keep_bonus.mean()
    return [min(max(float(sparsity - b), 0.0), 0.99) for b in keep_bonus]
