"""Stage 2 of D-Pruner: the regularizer built from G, then the domain importance S over a regularized domain pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..importance import DomainImportance
from ..regularizer import GeneralImportanceRegularizer
from .state import PruningState


@dataclass
class DomainImportanceStage:
    """Sets ``state.regularizer`` (``λ · Σ G ⊙ (W − W₀)²``, G clamped for a stable fine-tune when
    `config.clamp_general_importance`), an empty ``state.domain_importance`` (S, in `config.domain_score`'s form),
    and, for a ``finetune`` pass whose masks go onto the original weights, ``state.reference``; then runs the
    domain pass, which fills S from the gradients of the regularized loss.

    Args:
        run_pass: the domain pass (`DPrunerTrainer` runs `Trainer.train` for ``finetune``, its score pass for
            ``score``); it reads the regularizer and adds to S.
        learning_rate: the pass's learning rate (for the clamp bound of G).
        seed: seeds S's random tie-breaking.
    """

    name: ClassVar[str] = "domain_importance"
    run_pass: Callable[[PruningState], None]
    learning_rate: float
    seed: int = 0

    def run(self, state: PruningState) -> None:
        cfg = state.config
        if state.general_importance is None:
            raise ValueError("The domain importance stage needs G: run the general importance stage first.")
        finetune = cfg.domain_pass == "finetune"
        bound = None
        if finetune and cfg.clamp_general_importance:
            bound = GeneralImportanceRegularizer.sgd_stable_bound(cfg.regularization_lambda, self.learning_rate)
        dtype, device = state.importance_storage()
        state.regularizer = GeneralImportanceRegularizer(
            state.prunable, state.general_importance, cfg.regularization_lambda, bound,
            keep_reference=finetune, storage_device=device,
        )
        state.domain_importance = DomainImportance(state.prunable, cfg.domain_score, dtype, device, self.seed)
        if finetune and cfg.apply_masks_to == "original":
            state.reference = _other_trainable_weights(state, device)
        self.run_pass(state)


def _other_trainable_weights(state: PruningState, device: torch.device | None) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters that are not targets (the fine-tune moves them too)."""
    return {
        name: p.detach().to(device if device is not None else p.device, copy=True)
        for name, p in state.model.named_parameters()
        if p.requires_grad and name not in state.prunable
    }
