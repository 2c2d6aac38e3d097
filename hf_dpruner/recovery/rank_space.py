"""Per-layer LoRA ranks under a fixed budget, and their peft ``rank_pattern`` / ``alpha_pattern``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..targets import decoder_layers, find_prunable_weights


@dataclass(frozen=True)
class RankSpace:
    """Rank vectors (one rank per decoder layer, every module of a layer gets it) whose sum is exactly
    ``mean_rank * num_layers``: the same number of LoRA parameters as uniform rank ``mean_rank`` when the layers
    have the same shapes (as in every decoder-only model)."""

    num_layers: int
    mean_rank: int = 8
    choices: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 14, 16)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
        if not self.choices or sorted(set(self.choices)) != list(self.choices) or self.choices[0] < 1:
            raise ValueError(f"choices must be increasing positive ranks, got {self.choices}.")
        if self.mean_rank not in self.choices:
            raise ValueError(f"mean_rank {self.mean_rank} must be one of the rank choices {self.choices}.")

    @property
    def budget(self) -> int:
        """The exact sum of ranks every vector of the space has."""
        return self.mean_rank * self.num_layers

    def uniform(self) -> tuple[int, ...]:
        return (self.mean_rank,) * self.num_layers

    def is_valid(self, ranks: Sequence[int]) -> bool:
        return len(ranks) == self.num_layers and sum(ranks) == self.budget and all(r in self.choices for r in ranks)

    def sample(self, rng: random.Random, moves: int | None = None) -> tuple[int, ...]:
        """A random vector of the space: random budget-neutral moves (one layer one choice up, another one down)
        starting from the uniform vector."""
        index = {r: i for i, r in enumerate(self.choices)}
        levels = [index[self.mean_rank]] * self.num_layers
        top = len(self.choices) - 1
        for _ in range(moves if moves is not None else rng.randint(1, 3 * self.num_layers)):
            up, down = rng.randrange(self.num_layers), rng.randrange(self.num_layers)
            if up == down or levels[up] == top or levels[down] == 0:
                continue
            step_up = self.choices[levels[up] + 1] - self.choices[levels[up]]
            step_down = self.choices[levels[down]] - self.choices[levels[down] - 1]
            if step_up == step_down:  # keeps the sum exact on uneven grids too
                levels[up] += 1
                levels[down] -= 1
        return tuple(self.choices[level] for level in levels)

    def candidates(self, count: int, seed: int = 0, exclude: Sequence[Sequence[int]] = ()) -> list[tuple[int, ...]]:
        """Up to `count` distinct random vectors, none of them in `exclude`."""
        rng = random.Random(seed)
        seen = {tuple(r) for r in exclude}
        found: list[tuple[int, ...]] = []
        for _ in range(20 * count):
            ranks = self.sample(rng)
            if ranks not in seen:
                seen.add(ranks)
                found.append(ranks)
                if len(found) == count:
                    break
        return found


def lora_target_modules(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[list[str]]:
    """Per decoder layer, the full names of the Linear/Conv1D modules LoRA will wrap (all of them by default)."""
    weights = find_prunable_weights(model, list(target_modules) if target_modules else None)
    per_layer: list[list[str]] = [[] for _ in decoder_layers(model)]
    for weight in weights.values():
        per_layer[weight.layer_index].append(weight.module_name)
    return per_layer


def rank_patterns(
    model: nn.Module, ranks: Sequence[int], lora_alpha: float, mean_rank: int, target_modules: Sequence[str] | None
) -> tuple[dict[str, int], dict[str, float]]:
    """peft ``rank_pattern`` and ``alpha_pattern`` giving every targeted module of layer i rank ``ranks[i]``, keyed by
    full module name. Alphas scale with the rank (``lora_alpha * r / mean_rank``) so every layer keeps the scaling
    ``lora_alpha / mean_rank`` of the uniform configuration."""
    modules = lora_target_modules(model, target_modules)
    if len(ranks) != len(modules):
        raise ValueError(f"Got {len(ranks)} ranks for a model with {len(modules)} decoder layers.")
    rank_pattern = {name: int(r) for r, names in zip(ranks, modules, strict=False) for name in names}
    alpha_pattern = {name: lora_alpha * r / mean_rank
                     for r, names in zip(ranks, modules, strict=False) for name in names}
    return rank_pattern, alpha_pattern


def lora_parameter_count(model: nn.Module, ranks: Sequence[int], target_modules: Sequence[str] | None = None) -> int:
    """Trainable LoRA parameters of a rank vector: ``r * (d_in + d_out)`` summed over the targeted modules."""
    weights = find_prunable_weights(model, list(target_modules) if target_modules else None)
    return sum(ranks[w.layer_index] * sum(w.weight.shape) for w in weights.values())
