"""Resuming D-Pruner: fingerprinted general-importance caches and domain-pass checkpoints that hold S."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .fingerprint import differing_parts, digest, training_fingerprint
from .importance import importance_description, importance_fingerprint, load_importance

if TYPE_CHECKING:
    from transformers import TrainerState, TrainingArguments

    from .config import DPrunerConfig
    from .importance import DomainImportance
    from .stages import PruningState
    from .targets import PrunableWeight

logger = logging.get_logger(__name__)

DOMAIN_STATE_NAME = "dpruner_domain_state.safetensors"


class ResumableDomainPass:
    """`DPrunerTrainer`'s stage outputs as checkpoints: G caches carry the fingerprint of what they were computed
    from, and every Trainer checkpoint of the domain pass also holds S, its step count and the run's fingerprint.
    Mixed into `DPrunerTrainer` (a `transformers.Trainer`), whose attributes below it relies on; reading a G cache
    sets ``increased_damping`` from it."""

    # set by DPrunerTrainer.__init__ and its stages
    dpruner_config: DPrunerConfig
    prunable: dict[str, PrunableWeight]
    fingerprints: dict[str, str | None]
    domain_importance: DomainImportance | None
    increased_damping: dict[str, float] | None
    pruning_state: PruningState
    # from transformers.Trainer
    args: TrainingArguments
    state: TrainerState

    def general_fingerprint(self) -> dict[str, str | None]:
        """What G depends on: the model, the general windows and the general-stage settings."""
        cfg = self.dpruner_config
        recipe = {"estimator": cfg.general_estimator, "damping": cfg.damping, "seq_len": cfg.seq_len,
                  "num_samples": cfg.num_samples, "targets": sorted(self.prunable)}
        return {"model": self.fingerprints["model"], "general_data": self.fingerprints["general_data"],
                "recipe": digest(recipe)}

    def run_fingerprint(self) -> dict[str, str | None]:
        """What the domain pass depends on: G's inputs, the domain windows, the recipe and the training settings."""
        return {**self.general_fingerprint(), "domain_data": self.fingerprints["domain_data"],
                "config": digest(self.dpruner_config.to_dict()), "training": training_fingerprint(self.args)}

    def _load_general_cache(self, path: Path) -> dict[str, torch.Tensor]:
        """G from a cache file, refused when it was computed from another model, other data or other settings."""
        scores = load_importance(path, self.prunable)
        stored = importance_fingerprint(path)
        if stored is None:
            logger.warning(f"{path} has no fingerprint (not written by this version), so it cannot be checked against "
                           "this model and data; it is used as it is.")
        else:
            stale = differing_parts(self.general_fingerprint(), stored)
            if stale:
                raise ValueError(
                    f"The general importance cache {path} was computed for another {' / '.join(stale)} than this "
                    "run's, so it is stale. Delete it to recompute, or pass another path."
                )
        wanted = getattr(torch, self.dpruner_config.importance_dtype)
        low = sorted({str(g.dtype) for g in scores.values() if g.dtype != wanted and g.dtype != torch.float32})
        if low:
            raise ValueError(f"{path} holds {', '.join(low)} scores but this run keeps importance in {wanted}; delete "
                             "it to recompute, or set importance_dtype to match.")
        self.increased_damping = _increased_damping_of(path)
        return self.pruning_state.store_importance(scores)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then S, its step count and the run's fingerprint. That file is written last
        (atomically), so it marks a complete checkpoint: a run killed while saving leaves one without it, which
        `last_complete_checkpoint` skips."""
        super()._save_checkpoint(model, trial)
        if self.domain_importance is None or not self.args.should_save:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = {name: t.detach().cpu().contiguous() for name, t in self.domain_importance.state_dict().items()}
        tmp = folder / (DOMAIN_STATE_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"fingerprint": json.dumps(self.run_fingerprint(), sort_keys=True)})
        tmp.replace(folder / DOMAIN_STATE_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's state, plus S when resuming the domain pass (refused if the checkpoint is another run's)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.domain_importance is None:
            return
        path = Path(resume_from_checkpoint) / DOMAIN_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {DOMAIN_STATE_NAME}: it is not a complete D-Pruner domain-pass "
                "checkpoint (not written by DPrunerTrainer, or the run was killed while saving it). Resume from "
                "an earlier checkpoint, or start over."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = json.loads((handle.metadata() or {}).get("fingerprint", "{}"))
                state = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, json.JSONDecodeError) as err:
            raise ValueError(f"Cannot read {path} ({err}); resume from an earlier checkpoint, or start over.") from err
        stale = differing_parts(self.run_fingerprint(), stored)
        if stale:
            raise ValueError(
                f"{resume_from_checkpoint} was written by a run with another {' / '.join(stale)}; resuming it would "
                "mix two runs. Rerun with the original settings, or delete the checkpoint to start over."
            )
        try:
            self.domain_importance.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def _increased_damping_of(path: Path) -> dict[str, float] | None:
    """The Hessians whose damping was raised while the G cache at `path` was computed, None if it does not say."""
    value = importance_description(path).get("increased_damping")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) and v > 0 for k, v in value.items()
    ):
        raise ValueError(f"Importance file {path} has a corrupt increased_damping entry; delete it to recompute.")
    return {k: float(v) for k, v in value.items()}


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in `folder` that holds a complete D-Pruner domain state, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if suffix.isdigit() and (path / DOMAIN_STATE_NAME).is_file() and (path / TRAINER_STATE_NAME).is_file():
            steps.append((int(suffix), path))
    return str(max(steps)[1]) if steps else None
