"""Domain importance S, accumulated from the gradients of the regularized loss over the domain pass."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..targets import PrunableWeight


class DomainImportance:
    """Accumulates ``S += |g·W − ½ (g·W)²|`` (``"taylor"``) or ``|g·W + ½ (g·W)²|`` (``"taylor_plus"``).

    The first form is the second-order Taylor estimate, with the Fisher approximation, of the loss change when a
    weight is set to zero; the second is the sign used by the authors' code.
    """

    def __init__(self, weights: Mapping[str, PrunableWeight], form: str = "taylor") -> None:
        if form not in ("taylor", "taylor_plus"):
            raise ValueError(f"Unknown domain score form {form!r}; valid: 'taylor', 'taylor_plus'.")
        self.weights = weights
        self.sign = -0.5 if form == "taylor" else 0.5
        self.scores = {name: torch.zeros_like(w.weight, dtype=torch.float32) for name, w in weights.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, gradients: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one step's term; gradients default to each weight's ``.grad``."""
        missing = []
        for name, w in self.weights.items():
            grad = gradients[name] if gradients is not None else w.weight.grad
            if grad is None:
                missing.append(name)
                continue
            gw = grad.float() * w.weight.detach().float()
            self.scores[name].add_((gw + self.sign * gw * gw).abs_())
        if missing:
            raise ValueError(
                f"No gradient for {len(missing)} target weights (e.g. {missing[0]}); they must require grad "
                "during the domain pass."
            )
        self.num_updates += 1
