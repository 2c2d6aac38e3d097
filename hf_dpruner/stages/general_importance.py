"""Stage 1 of D-Pruner: the general importance G of every target weight, on open-domain windows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..importance import OBSImportance, general_scorer
from .state import PruningState


@dataclass
class GeneralImportanceStage:
    """Sets ``state.general_importance`` (G, with `config.general_estimator`: OBS saliency or Fisher) and
    ``state.increased_damping`` from the general batches; nothing to do when G is already there (given, or read
    from a cache). `on_computed` is called with the state once G has been computed (the trainer writes its cache).

    Args:
        batches: returns the general calibration batches (called only when G has to be computed).
        disable_tqdm: hide the progress bar.
        on_computed: optional hook run after a fresh G.
    """

    name: ClassVar[str] = "general_importance"
    batches: Callable[[], Sequence[Mapping[str, torch.Tensor]]]
    disable_tqdm: bool = False
    on_computed: Callable[[PruningState], None] | None = None

    def run(self, state: PruningState) -> None:
        if state.general_importance is not None:
            return
        cfg = state.config
        scorer = general_scorer(cfg.general_estimator, cfg.damping)
        scores = scorer.score(state.model, state.prunable, self.batches(), disable_tqdm=self.disable_tqdm)
        state.increased_damping = scorer.increased_damping if isinstance(scorer, OBSImportance) else None
        state.general_importance = state.store_importance(scores)
        if self.on_computed is not None:
            self.on_computed(state)
