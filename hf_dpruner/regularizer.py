"""The general-importance regularizer ``λ · Σ G ⊙ (W − W₀)²`` of D-Pruner's refined training loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .targets import PrunableWeight


class GeneralImportanceRegularizer:
    """Keeps weights that matter for general text near their pretrained values W₀.

    Holds G and W₀ for every target weight (fp32 G, W₀ in the weight's dtype). At ``W = W₀`` the term and its
    gradient are zero: it acts once the weights move (``domain_pass="finetune"``) or through the look-ahead
    gradient of `lookahead_gradient` (``domain_pass="score"``).
    """

    def __init__(
        self, weights: Mapping[str, PrunableWeight], importance: Mapping[str, torch.Tensor], lam: float
    ) -> None:
        missing = set(weights) - set(importance)
        if missing:
            raise ValueError(f"General importance lacks {len(missing)} target weights, e.g. {sorted(missing)[0]}.")
        self.weights = weights
        self.lam = float(lam)
        self.importance = {n: importance[n].to(w.weight.device, torch.float32) for n, w in weights.items()}
        self.reference = {n: w.weight.detach().clone() for n, w in weights.items()}

    def __call__(self) -> torch.Tensor:
        """The penalty, differentiable w.r.t. the current weights."""
        first = next(iter(self.weights.values())).weight
        total = torch.zeros((), device=first.device, dtype=torch.float32)
        if self.lam == 0:
            return total
        for name, w in self.weights.items():
            total = total + (self.importance[name] * (w.weight.float() - self.reference[name].float()).square()).sum()
        return self.lam * total

    def lookahead_gradient(self, name: str, grad: torch.Tensor, lr: float) -> torch.Tensor:
        """Gradient of the full loss at the look-ahead point ``W = W₀ − lr·g``: ``g · (1 − 2·λ·lr·G)``."""
        return grad.float() * (1.0 - 2.0 * self.lam * lr * self.importance[name])

    @torch.no_grad()
    def restore(self) -> None:
        """Copy W₀ back into the weights."""
        for name, w in self.weights.items():
            w.weight.copy_(self.reference[name])
