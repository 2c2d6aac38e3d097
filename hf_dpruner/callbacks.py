"""Trainer callbacks: accumulate domain importance before each optimizer step; keep pruned weights at zero."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .importance.domain import DomainImportance


class DomainImportanceCallback(TrainerCallback):
    """Adds each optimizer step's gradients to S: after clipping when ``max_grad_norm > 0``, and unscaled under
    fp16 mixed precision.

    The Trainer unscales fp16 gradients only to clip them; otherwise they still carry the loss scale here, so the
    callback unscales them itself through the optimizer's `GradScaler` (whose ``step`` then does not unscale them
    again), as PyTorch prescribes for reading gradients between backward and the optimizer step."""

    def __init__(self, importance: DomainImportance) -> None:
        self.importance = importance

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)  # an accelerate AcceleratedOptimizer under fp16
        clipped = args.max_grad_norm is not None and args.max_grad_norm > 0  # clipping unscaled them already
        if scaler is not None and not clipped:
            scaler.unscale_(optimizer.optimizer)
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
