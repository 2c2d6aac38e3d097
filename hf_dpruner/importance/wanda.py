"""Wanda scores (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

The score of weight ``W_ij`` (output i, input j) is ``|W_ij| · ||X_j||_2``, where ``X_j`` is the j-th input
feature over all calibration tokens. Which weights compete with each other is decided by
`DPrunerConfig.sparsity_type`, not here: ``"row"`` (the same ratio in every output row) is Wanda's own
comparison group; ``"unstructured"`` compares the whole matrix (which the Wanda paper found worse for LLMs);
``"N:M"`` keeps N of every M consecutive inputs of a row, as in the paper's semi-structured results.
"""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor, input_dim: int = 1) -> torch.Tensor:
    """``|W| · sqrt(Σ x²)`` for one weight, shaped like `weight` (fp32).

    `input_sq_norms` holds, per input feature, the sum of its squared values over the calibration tokens.
    `input_dim` is the dim of `weight` that indexes inputs: 1 for nn.Linear (out, in), 0 for transformers'
    Conv1D (in, out), i.e. `PrunableWeight.input_dim`.
    """
    if input_dim not in (0, 1):
        raise ValueError(f"input_dim must be 0 (Conv1D) or 1 (nn.Linear), got {input_dim!r}.")
    if input_sq_norms.shape != (weight.shape[input_dim],):
        raise ValueError(
            f"input_sq_norms has shape {tuple(input_sq_norms.shape)}; the weight {tuple(weight.shape)} has "
            f"{weight.shape[input_dim]} inputs along dim {input_dim}."
        )
    norms = input_sq_norms.float().clamp_min(0).sqrt().to(weight.device)
    norms = norms.unsqueeze(0) if input_dim == 1 else norms.unsqueeze(1)
    return weight.detach().float().abs() * norms
