"""The general-importance regularizer ``λ · Σ G ⊙ (W − W₀)²`` of D-Pruner's refined training loss."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from .masks import check_finite_scores
from .targets import PrunableWeight


def _importance_for(weight: torch.Tensor, importance: torch.Tensor, bound: float | None) -> torch.Tensor:
    """G of one weight in float32 on the weight's device, clamped at `bound` (a per-matrix temporary)."""
    g = importance.to(weight.device, torch.float32)
    return g.clamp(max=bound) if bound is not None else g


def _delta(weight: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``W − W₀`` in float32 on the weight's device."""
    return weight.detach().float() - reference.to(weight.device, torch.float32)


def _penalty_gradient(weight, reference, importance, lam: float, bound: float | None) -> torch.Tensor:
    """``2λ·G·(W − W₀)``, the gradient of the penalty of one weight, in float32."""
    return (2.0 * lam) * _importance_for(weight, importance, bound) * _delta(weight, reference)


class _WeightPenalty(torch.autograd.Function):
    """``λ·Σ G·(W − W₀)²`` for one weight, saving only references (no model-sized temporaries kept for backward)."""

    @staticmethod
    def forward(ctx, weight, reference, importance, lam: float, bound: float | None):
        ctx.save_for_backward(weight, reference, importance)
        ctx.lam, ctx.bound = lam, bound
        return lam * (_importance_for(weight, importance, bound) * _delta(weight, reference).square()).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, reference, importance = ctx.saved_tensors
        grad = grad_output * _penalty_gradient(weight, reference, importance, ctx.lam, ctx.bound)
        return grad.to(weight.dtype), None, None, None, None


class GeneralImportanceRegularizer:
    """Keeps weights that matter for general text near their pretrained values W₀.

    Holds references to G (not copies: clamping at `max_importance` and casting to float32 happen one matrix at a
    time) and, with `keep_reference`, a copy of W₀ on `storage_device` (default: the weight's device). At
    ``W = W₀`` the term and its gradient are zero: it acts once the weights move (``domain_pass="finetune"``, which
    needs W₀) or through the look-ahead gradient of `lookahead_gradient` (``domain_pass="score"``, which does not).
    """

    def __init__(
        self,
        weights: Mapping[str, PrunableWeight],
        importance: Mapping[str, torch.Tensor],
        lam: float,
        max_importance: float | None = None,
        keep_reference: bool = True,
        storage_device: torch.device | str | None = None,
    ) -> None:
        missing = set(weights) - set(importance)
        if missing:
            raise ValueError(f"General importance lacks {len(missing)} target weights, e.g. {sorted(missing)[0]}.")
        check_finite_scores({n: importance[n] for n in weights}, "General importance")
        self.weights = weights
        self.lam = float(lam)
        self.max_importance = max_importance
        self.importance = {n: importance[n] for n in weights}
        self.reference = {
            n: w.weight.detach().to(storage_device if storage_device is not None else w.weight.device, copy=True)
            for n, w in weights.items()
        } if keep_reference else {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._added: set[str] = set()

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
        if not self.reference:
            raise RuntimeError("This regularizer keeps no W0 (keep_reference=False): it has no penalty to evaluate.")
        for name, w in self.weights.items():
            total = total + _WeightPenalty.apply(
                w.weight, self.reference[name], self.importance[name], self.lam, self.max_importance
            )
        return total

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """The penalty as a number (no autograd graph)."""
        return self()

    def arm_gradient(self, scale: float = 1.0) -> None:
        """Add ``scale · 2λ·G·(W − W₀)`` to each target weight's gradient in the next backward pass, inside the
        weight's own gradient as it arrives (a tensor hook, so DDP reduces the sum and no model-sized buffer of
        penalty gradients waits for the LM gradients, as it would with the penalty in the loss's graph).
        `scale` is the loss scale of fp16 mixed precision (1 otherwise); `disarm()` removes the hooks."""
        self.disarm()
        if self.lam == 0:
            return
        if not self.reference:
            raise RuntimeError("This regularizer keeps no W0 (keep_reference=False): it has no gradient to add.")
        for name, w in self.weights.items():
            self._hooks.append(w.weight.register_hook(functools.partial(self._add_gradient, name, scale)))

    def _add_gradient(self, name: str, scale: float, grad: torch.Tensor) -> torch.Tensor:
        if name in self._added:  # once per armed backward, also when a checkpointed block reports twice
            return grad
        self._added.add(name)
        penalty = _penalty_gradient(
            self.weights[name].weight, self.reference[name], self.importance[name], self.lam, self.max_importance
        )
        return grad + (scale * penalty).to(grad.dtype)

    def disarm(self) -> None:
        """Remove the gradient hooks of `arm_gradient`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._added = [], set()

    def lookahead_gradient(self, name: str, grad: torch.Tensor, lr: float) -> torch.Tensor:
        """Gradient of the full loss at the look-ahead point ``W = W₀ − lr·g``: ``g · (1 − 2·λ·lr·G)``."""
        g = _importance_for(grad, self.importance[name], self.max_importance)
        return grad.float() * (1.0 - 2.0 * self.lam * lr * g)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy W₀ back into the weights (nothing to do without a kept reference: the weights never moved)."""
        for name, reference in self.reference.items():
            self.weights[name].weight.copy_(reference)
