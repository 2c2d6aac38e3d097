"""PAT's trainable channel mask and its annealing schedule: one mask shared by the whole residual stream, or one
mask per MLP (``num_groups``) for the neuron axis."""

from __future__ import annotations

import math

import torch
from torch import nn


class SharedChannelMask(nn.Module):
    """One logit per hidden channel, shared by every HSM, turned into a per-channel gate.

    With step ``s`` of ``S`` training steps and ``s0 = mask_warmup_fraction · S``:

    - ``s < s0``: ``gate = sigmoid(τ(s) · logits) + β(s)`` with ``τ(s) = 1 / (1 − ln s / ln s0)`` (0 at ``s = 0``,
      growing without bound towards ``s0``) and ``β(s) = max(0, 0.5 − s / s0)``: every channel starts fully open
      and the gate sharpens towards a step function;
    - ``s ≥ s0``: the gate is exactly binary, 1 on the ``num_kept`` channels with the largest logits and 0 elsewhere.
      Gradients still reach the logits through ``sigmoid(logits)`` (straight-through), so channels can swap.

    With ``num_groups`` the logits are ``[num_groups, hidden_size]``: that many independent masks on one schedule
    (e.g. one per MLP), each keeping its own ``num_kept`` channels.
    """

    def __init__(self, hidden_size: int, num_kept: int, warmup_fraction: float = 1 / 3,
                 num_groups: int | None = None) -> None:
        super().__init__()
        if not 0 < num_kept <= hidden_size:
            raise ValueError(f"num_kept must be in [1, {hidden_size}], got {num_kept}.")
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer or None, got {num_groups!r}.")
        self.hidden_size = hidden_size
        self.num_kept = num_kept
        self.warmup_fraction = warmup_fraction
        self.logits = nn.Parameter(torch.zeros(hidden_size if num_groups is None else (num_groups, hidden_size)))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))

    def set_progress(self, step: int, total_steps: int) -> None:
        """Move the schedule to `step` of `total_steps` (the Trainer calls this before every forward)."""
        self.step.fill_(int(step))
        self.total_steps.fill_(max(int(total_steps), 1))

    @property
    def warmup_steps(self) -> int:
        """``s0``: the first step at which the gate is binary."""
        return max(1, round(self.warmup_fraction * int(self.total_steps)))

    @property
    def is_binary(self) -> bool:
        return int(self.step) >= self.warmup_steps

    def temperature(self) -> float:
        """``τ(s)``; infinite once the gate is binary."""
        s, s0 = int(self.step), self.warmup_steps
        if s >= s0:
            return math.inf
        if s == 0:
            return 0.0
        return 1.0 / (1.0 - math.log(s) / math.log(s0))

    def offset(self) -> float:
        """``β(s) = max(0, 0.5 − s / s0)``."""
        return max(0.0, 0.5 - int(self.step) / self.warmup_steps)

    def keep_mask(self) -> torch.Tensor:
        """Bool, the logits' shape: the ``num_kept`` channels with the largest logits (per group; ties: lower index
        first)."""
        order = torch.argsort(self.logits.detach(), dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(self.logits, dtype=torch.bool)
        return keep.scatter_(-1, order[..., : self.num_kept], True)

    def kept_indices(self) -> torch.Tensor:
        """Sorted indices of the kept channels: ``[num_kept]``, or ``[num_groups, num_kept]`` (a row per group)."""
        keep = self.keep_mask()
        return torch.nonzero(keep)[:, -1].view(*keep.shape[:-1], self.num_kept)

    def gate(self) -> torch.Tensor:
        """The per-channel gate at the current step (the logits' shape)."""
        if self.is_binary:
            soft = torch.sigmoid(self.logits)
            return self.keep_mask().to(soft.dtype) + (soft - soft.detach())
        return torch.sigmoid(self.temperature() * self.logits) + self.offset()

    def num_open(self) -> int:
        """Channels whose gate exceeds 0.5 now (in all groups together)."""
        return int((self.gate().detach() > 0.5).sum())

    def active_loss(self) -> torch.Tensor:
        """``|num_kept − N_open| / hidden_size`` (the mean over the groups); ``N_open`` counts gates above 0.5, with
        a straight-through gradient through the gates, so the loss pulls every gate towards the target count."""
        gate = self.gate()
        count = (gate.detach() > 0.5).sum(-1).to(gate.dtype) + (gate - gate.detach()).sum(-1)
        return ((self.num_kept - count).abs() / self.hidden_size).mean()
