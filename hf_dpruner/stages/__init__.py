"""D-Pruner as a sequence of stages over one shared `PruningState`:

1. `GeneralImportanceStage` — G on open-domain text;
2. `DomainImportanceStage` — the regularizer from G, then S over the regularized domain pass;
3. `SelectMasksStage` — masks from S, applied.

`DPrunerTrainer.prune` builds the three and runs them with `run_stages`; the trainer supplies the batches and the
domain pass (the `Trainer` parts: training, checkpoints, resume)."""

from .domain_importance import DomainImportanceStage
from .general_importance import GeneralImportanceStage
from .select_masks import SelectMasksStage
from .state import PruningResult, PruningState, Stage, run_stages

__all__ = [
    "DomainImportanceStage",
    "GeneralImportanceStage",
    "PruningResult",
    "PruningState",
    "SelectMasksStage",
    "Stage",
    "run_stages",
]
