"""The general-importance regularizer ``λ · Σ G ⊙ (W − W₀)²`` of D-Pruner's refined training loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .masks import check_finite_scores
from .targets import PrunableWeight


class _WeightPenalty(torch.autograd.Function):
    """``λ·Σ G·(W − W₀)²`` for one weight, saving only references (no model-sized temporaries kept for backward)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, reference: torch.Tensor, importance: torch.Tensor, lam: float):
        ctx.save_for_backward(weight, reference, importance)
        ctx.lam = lam
        return lam * (importance * (weight.float() - reference.float()).square()).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, reference, importance = ctx.saved_tensors
        grad = (2.0 * ctx.lam) * grad_output * importance * (weight.float() - reference.float())
        return grad.to(weight.dtype), None, None, None


class GeneralImportanceRegularizer:
    """Keeps weights that matter for general text near their pretrained values W₀.

    Holds G (fp32, optionally clamped at `max_importance`) and W₀ (the weight's dtype) for every target weight.
    At ``W = W₀`` the term and its
    gradient are zero: it acts once the weights move (``domain_pass="finetune"``) or through the look-ahead
    gradient of `lookahead_gradient` (``domain_pass="score"``).
    """

    def __init__(
        self,
        weights: Mapping[str, PrunableWeight],
        importance: Mapping[str, torch.Tensor],
        lam: float,
        max_importance: float | None = None,
    ) -> None:
        missing = set(weights) - set(importance)
        if missing:
            raise ValueError(f"General importance lacks {len(missing)} target weights, e.g. {sorted(missing)[0]}.")
        check_finite_scores({n: importance[n] for n in weights}, "General importance")
        self.weights = weights
        self.lam = float(lam)
        self.importance = {n: importance[n].to(w.weight.device, torch.float32) for n, w in weights.items()}
        if max_importance is not None:
            self.importance = {n: g.clamp(max=max_importance) for n, g in self.importance.items()}
        self.reference = {n: w.weight.detach().clone() for n, w in weights.items()}

    @staticmethod
    def sgd_stable_bound(lam: float, lr: float) -> float | None:
        """Largest G for which one SGD step on ``λ·G·(W − W₀)²`` does not overshoot W₀: ``1 / (2·λ·lr)``.

        Explicit SGD on this quadratic diverges where ``2·lr·λ·G > 2``; OBS saliencies are heavy-tailed (on
        SmolLM2-135M a few down_proj weights reach 3e5 while the median is 3e-4), so without the bound the
        penalty of a handful of weights dominates (and, clipped, erases) the domain gradient.
        """
        return None if lam <= 0 or lr <= 0 else 1.0 / (2.0 * lam * lr)

    def __call__(self) -> torch.Tensor:
        """The penalty, differentiable w.r.t. the current weights."""
        first = next(iter(self.weights.values())).weight
        total = torch.zeros((), device=first.device, dtype=torch.float32)
        if self.lam == 0:
            return total
        for name, w in self.weights.items():
            total = total + _WeightPenalty.apply(w.weight, self.reference[name], self.importance[name], self.lam)
        return total

    def lookahead_gradient(self, name: str, grad: torch.Tensor, lr: float) -> torch.Tensor:
        """Gradient of the full loss at the look-ahead point ``W = W₀ − lr·g``: ``g · (1 − 2·λ·lr·G)``."""
        return grad.float() * (1.0 - 2.0 * self.lam * lr * self.importance[name])

    @torch.no_grad()
    def restore(self) -> None:
        """Copy W₀ back into the weights."""
        for name, w in self.weights.items():
            w.weight.copy_(self.reference[name])
