"""Stage 3 of D-Pruner: keep the highest-S weights, and make the model a pruned model."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from ..distributed import broadcast_from_main_
from ..masks import compute_masks
from ..modeling import make_pruned
from .state import PruningState


@dataclass
class SelectMasksStage:
    """Sets ``state.masks`` from S (`config.sparsity`, `sparsity_type`, `layer_sparsity`), identical on every
    process; with ``apply_masks_to="original"`` puts the weights from before the domain pass back; then prunes the
    model (`make_pruned`), recording `record` with the domain-pass step count and any increased damping, and drops
    the regularizer (the pruned model trains with the plain LM loss).

    Args:
        record: what ``pruning_config.json`` records about the run (``method``, ``base_model``, ``calibration``).
        disable_tqdm: hide the progress bar.
    """

    name: ClassVar[str] = "masks"
    record: dict[str, Any]
    disable_tqdm: bool = False

    def run(self, state: PruningState) -> None:
        cfg = state.config
        masks = compute_masks(state.domain_importance.scores, state.prunable, cfg, disable_tqdm=self.disable_tqdm)
        broadcast_from_main_(masks)  # equal on every rank already, up to rounding; make them identical
        if cfg.apply_masks_to == "original":
            state.restore_original_weights()
        record = copy.deepcopy(self.record)
        calibration = record.setdefault("calibration", {})
        calibration["domain_steps"] = state.domain_importance.num_updates
        if state.increased_damping is not None:  # {} when every Hessian factorised with config.damping
            calibration["increased_damping"] = dict(state.increased_damping)
        make_pruned(state.model, masks, cfg, record, apply=True)
        state.masks = masks
        state.regularizer = None
