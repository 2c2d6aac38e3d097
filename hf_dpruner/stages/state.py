"""The state D-Pruner's stages share: the model and its targets, G, the regularizer, S, the masks, stage times."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..config import DPrunerConfig
from ..importance import DomainImportance
from ..regularizer import GeneralImportanceRegularizer
from ..targets import PrunableWeight


@dataclass
class PruningResult:
    """What a pruning run produced: the keep-masks, the sparsity report, seconds per stage, domain-pass steps."""

    masks: dict[str, torch.Tensor]
    sparsity: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    domain_steps: int = 0


@dataclass
class PruningState:
    """One D-Pruner run, as its stages leave it.

    Stage 1 sets `general_importance` (G) and `increased_damping`; stage 2 sets `regularizer`, `domain_importance`
    (S) and, when the masks go onto the original weights after a fine-tuning pass, `reference` (W₀ of the trainable
    parameters that are not targets; the targets' W₀ is the regularizer's); stage 3 sets `masks` and makes `model`
    a pruned model. `seconds` holds each stage's wall time."""

    model: torch.nn.Module
    prunable: dict[str, PrunableWeight]
    config: DPrunerConfig
    general_importance: dict[str, torch.Tensor] | None = None
    # {parameter name: damping used} for the stage-1 Hessians that needed more than config.damping; None when unknown
    # (G given as a dict, or read from a cache that does not say) or when no Hessian was factorised
    increased_damping: dict[str, float] | None = None
    regularizer: GeneralImportanceRegularizer | None = None
    domain_importance: DomainImportance | None = None
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def importance_storage(self) -> tuple[torch.dtype, torch.device | None]:
        """Dtype and device of the importance buffers (None: each weight's own device)."""
        cfg = self.config
        return getattr(torch, cfg.importance_dtype), (torch.device("cpu") if cfg.offload_importance else None)

    def store_importance(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`scores` cast to the importance dtype and device in place, one matrix at a time (never two full
        copies)."""
        dtype, device = self.importance_storage()
        for name in list(scores):
            target = device if device is not None else self.prunable[name].weight.device
            scores[name] = scores[name].to(target, dtype)
        return scores

    @torch.no_grad()
    def restore_original_weights(self) -> None:
        """Copy the weights from before the domain pass back (targets from the regularizer, others from
        `reference`)."""
        self.regularizer.restore()
        params = dict(self.model.named_parameters())
        for name, value in self.reference.items():
            params[name].copy_(value)
        self.reference = {}


class Stage(Protocol):
    """One step of the recipe: reads and writes the shared `PruningState`."""

    name: ClassVar[str]  # the key of its time in `PruningResult.stage_seconds`

    def run(self, state: PruningState) -> None: ...


def run_stages(stages: Sequence[Stage], state: PruningState) -> PruningState:
    """Run `stages` in order on `state`, recording each one's wall time in ``state.seconds``."""
    for stage in stages:
        start = time.perf_counter()
        stage.run(state)
        state.seconds[stage.name] = time.perf_counter() - start
    return state
