"""Trainer callbacks: accumulate domain importance before each optimizer step; keep pruned weights at zero."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .importance.domain import DomainImportance


class DomainImportanceCallback(TrainerCallback):
    """Adds each optimizer step's gradients (unscaled; after clipping when ``max_grad_norm > 0``) to S."""

    def __init__(self, importance: DomainImportance) -> None:
        self.importance = importance

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.importance.update()


class KeepMasksCallback(TrainerCallback):
    """Re-zeroes the pruned weights of a model made by `make_pruned` after every optimizer step.

    The gradient hooks of `make_pruned` already keep them at zero for SGD/Adam/AdamW; this guards against
    optimizers that move weights with zero gradient (e.g. a non-decoupled weight decay on a revived value).
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and hasattr(model, "apply_pruning_masks"):
            with torch.no_grad():
                model.apply_pruning_masks()
