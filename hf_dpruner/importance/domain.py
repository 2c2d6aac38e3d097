"""Domain importance S, accumulated from the gradients of the regularized loss over the domain pass."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..targets import PrunableWeight

_LOW_HALF = -(1 << 16)  # int32 0xFFFF0000: keeps the sign, exponent and the 7 mantissa bits of a bfloat16


def stochastic_add_(accumulator: torch.Tensor, term: torch.Tensor, generator: torch.Generator) -> None:
    """``accumulator += term`` for a bfloat16 `accumulator`, the float32 sum rounded stochastically to bfloat16.

    Round-to-nearest drops every term below half a bfloat16 step of the running sum, so a sum of many similar
    terms stalls (at 256 equal terms); stochastic rounding is unbiased, and the sum keeps growing."""
    total = accumulator.float().add_(term)
    bits = total.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    bits.add_(noise).bitwise_and_(_LOW_HALF)
    accumulator.copy_(total)  # exact: the dropped mantissa bits are zero


class DomainImportance:
    """Accumulates ``S += |g·W − ½ (g·W)²|`` (``"taylor"``) or ``|g·W + ½ (g·W)²|`` (``"taylor_plus"``).

    The first form is the second-order Taylor estimate, with the Fisher approximation, of the loss change when a
    weight is set to zero; the second is the sign used by the authors' code. S is held in `dtype` (float32 or
    bfloat16) on `device` (default: each weight's device); terms are computed in float32.
    """

    def __init__(
        self,
        weights: Mapping[str, PrunableWeight],
        form: str = "taylor",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        if form not in ("taylor", "taylor_plus"):
            raise ValueError(f"Unknown domain score form {form!r}; valid: 'taylor', 'taylor_plus'.")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Domain importance is held in float32 or bfloat16, not {dtype}.")
        self.weights = weights
        self.sign = -0.5 if form == "taylor" else 0.5
        self.scores = {
            name: torch.zeros(w.weight.shape, dtype=dtype, device=device if device is not None else w.weight.device)
            for name, w in weights.items()
        }
        self.num_updates = 0
        self.seed = seed
        self._index = {name: i for i, name in enumerate(weights)}
        self._generators: dict[torch.device, torch.Generator] = {}

    @torch.no_grad()
    def add(self, name: str, grad: torch.Tensor) -> None:
        """Add the term of one weight's gradient to its score."""
        gw = grad.float() * self.weights[name].weight.detach().float()
        score = self.scores[name]
        term = (gw + self.sign * gw * gw).abs_().to(score.device)
        if score.dtype == torch.float32:
            score.add_(term)
        else:
            stochastic_add_(score, term, self._generator(name, score.device))

    def _generator(self, name: str, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, step, weight): the rounding noise is reproducible, also after a resume."""
        generator = self._generators.setdefault(device, torch.Generator(device))
        return generator.manual_seed(self.seed + 1_000_003 * self.num_updates + self._index[name])

    def update(self, gradients: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one step's terms for every weight; gradients default to each weight's ``.grad``."""
        if gradients is None:
            gradients = {name: w.weight.grad for name, w in self.weights.items()}
        missing = [name for name in self.weights if gradients[name] is None]
        if missing:
            raise_missing_gradients(missing)
        for name in self.weights:
            self.add(name, gradients[name])
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The scores and the step count, for a checkpoint."""
        return {**self.scores, "__num_updates__": torch.tensor(self.num_updates, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict` (names, shapes and dtypes must match)."""
        expected = set(self.scores) | {"__num_updates__"}
        if set(state) != expected:
            diff = sorted(set(state) ^ expected)
            raise ValueError(f"Domain importance state does not match the target weights (differs on {diff[:3]}).")
        for name, score in self.scores.items():
            if state[name].shape != score.shape or state[name].dtype != score.dtype:
                raise ValueError(
                    f"Domain importance state of {name} is {tuple(state[name].shape)} {state[name].dtype}, expected "
                    f"{tuple(score.shape)} {score.dtype}."
                )
            score.copy_(state[name])  # also across devices (a checkpoint is read on the CPU)
        self.num_updates = int(state["__num_updates__"])


def raise_missing_gradients(missing: list[str]) -> None:
    raise ValueError(
        f"No gradient for {len(missing)} target weights (e.g. {missing[0]}); they must require grad during the "
        "domain pass."
    )
