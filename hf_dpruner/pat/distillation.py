"""Knowledge distillation for PAT: the per-token KL divergence from the dense model's next-token distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, int]:
    """``(T² · Σ KL(softmax(t/T) ‖ softmax(s/T)), number of terms)`` over the positions that predict a token:
    position ``i`` predicts ``labels[:, i + 1]``, and labels of -100 (padding) are left out, as in the LM loss.

    The sum is returned, not the mean, so that the caller can normalise it as the LM loss is normalised (over the
    tokens of a whole accumulated batch, or per micro-batch)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"Student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape.")
    valid = labels[:, 1:] != -100
    student = F.log_softmax(student_logits[:, :-1][valid].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][valid].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum")
    return kl * temperature**2, int(valid.sum())
