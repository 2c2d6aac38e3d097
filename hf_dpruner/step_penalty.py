"""Adding a per-optimizer-step penalty to a `transformers.Trainer` loss, correctly under gradient accumulation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Trainer


def loss_is_scaled_for_ga(trainer: Trainer, num_items_in_batch) -> bool:
    """Whether `training_step` leaves the loss undivided by the accumulation steps (it is already normalized)."""
    if trainer.loss_is_scaled_for_ga is not None:
        return trainer.loss_is_scaled_for_ga
    return bool(trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
        trainer.compute_loss_func is not None
    )


def add_step_penalty(
    trainer: Trainer, loss: torch.Tensor, penalty: Callable[[], torch.Tensor], num_items_in_batch
) -> torch.Tensor:
    """``loss + penalty()``, the penalty counted once per optimizer step.

    Call it on every micro-batch: `penalty` is evaluated and added only on the one that syncs gradients (the
    weights do not change within an accumulation window), scaled so that its gradient counts exactly once whether or not
    `training_step` later divides the loss by the accumulation steps."""
    if not trainer.accelerator.sync_gradients:
        return loss
    value = penalty()
    if not loss_is_scaled_for_ga(trainer, num_items_in_batch):
        value = value * trainer.current_gradient_accumulation_steps
    return loss + value.to(loss.dtype)
