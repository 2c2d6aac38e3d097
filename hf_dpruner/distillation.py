"""Knowledge distillation: the per-token KL divergence from a teacher's next-token distribution, normalised like
the Trainer's LM loss (PAT's dense teacher, and the dense base model in recovery)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from .step_penalty import loss_is_scaled_for_ga


def distillation_loss_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, int]:
    """``(T² · Σ KL(softmax(t/T) ‖ softmax(s/T)), number of terms)`` over the positions that predict a token:
    position ``i`` predicts ``labels[:, i + 1]``, and labels of -100 (padding) are left out, as in the LM loss.

    The sum is returned, not the mean, so that the caller can normalise it as the LM loss is normalised (over the
    tokens of a whole accumulated batch, or per micro-batch)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape: the teacher must share the tokenizer.")
    valid = labels[:, 1:] != -100
    student = F.log_softmax(student_logits[:, :-1][valid].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][valid].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
    return kl * temperature**2, int(valid.sum())


def distillation_loss(
    trainer: Trainer,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    num_items_in_batch,
) -> torch.Tensor:
    """The distillation term of one micro-batch, normalised like the LM loss of `trainer`: over the tokens of the
    whole accumulated batch when `training_step` does not divide by the accumulation steps, else per micro-batch."""
    total, count = distillation_loss_sum(student_logits, teacher_logits, labels, temperature)
    if loss_is_scaled_for_ga(trainer, num_items_in_batch):
        value = total / num_items_in_batch
    else:
        value = total / max(count, 1)
    return value.to(student_logits.dtype)


def mix_distillation(lm_loss: torch.Tensor, distill: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 − weight) · lm_loss + weight · distill``."""
    return (1.0 - weight) * lm_loss + weight * distill
