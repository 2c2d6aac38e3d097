"""The Hybrid Sparsification Module: a low-rank transform on the identity, gated by the shared channel mask."""

from __future__ import annotations

import torch
from torch import nn


class HybridSparsificationModule(nn.Module):
    """``HSM(x) = gate ⊙ T x`` with ``T = I + B · diag(v) · A``.

    ``A`` (``rank × hidden``, the down projection) starts with orthonormal rows, ``v`` (the learnable scale) at 1 and
    ``B`` (``hidden × rank``) at 0, so a new HSM with an all-open gate is exactly the identity. With
    ``transform=False`` the module is the gate alone (used on tied embeddings, whose matrix cannot absorb ``T``
    without untying the LM head).
    """

    def __init__(self, hidden_size: int, rank: int, transform: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank if transform else 0
        if transform:
            self.down = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, hidden_size)))
            self.scale = nn.Parameter(torch.ones(rank))
            self.up = nn.Parameter(torch.zeros(hidden_size, rank))

    @property
    def has_transform(self) -> bool:
        return self.rank > 0

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.has_transform:
            h = x.to(self.down.dtype)
            x = (h + ((h @ self.down.t()) * self.scale) @ self.up.t()).to(x.dtype)
        return x * gate.to(x.dtype)

    def transform_matrix(self) -> torch.Tensor:
        """``T = I + B diag(v) A`` (``hidden × hidden``, fp32), the matrix folded into the neighbouring weights."""
        eye = torch.eye(self.hidden_size)
        if not self.has_transform:
            return eye
        down, scale, up = (p.detach().float().cpu() for p in (self.down, self.scale, self.up))
        return eye + (up * scale) @ down

    def identity_loss(self) -> torch.Tensor:
        """``‖A Aᵀ − I‖²_F``: zero for orthonormal rows; keeps the transform decoupled from the scale ``v``."""
        if not self.has_transform:
            return torch.zeros(())
        gram = self.down @ self.down.t()
        return (gram - torch.eye(self.rank, dtype=gram.dtype, device=gram.device)).pow(2).sum()
