"""Magnitude pruning scores: |W|."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..targets import PrunableWeight
from .base import ImportanceScorer


class MagnitudeImportance(ImportanceScorer):
    """Score = |W|; needs no calibration data."""

    name = "magnitude"

    @torch.no_grad()
    def score(
        self,
        model: torch.nn.Module,
        weights: Mapping[str, PrunableWeight],
        batches: Sequence[dict[str, torch.Tensor]] = (),
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        return {name: w.weight.detach().abs().float() for name, w in weights.items()}
