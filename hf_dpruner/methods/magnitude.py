"""Magnitude pruning: keep the largest ``|W|``; needs no data."""

from __future__ import annotations

import torch

from ..config import DPrunerConfig
from ..importance.magnitude import MagnitudeImportance
from ..masks import apply_masks, compute_masks
from ..targets import find_prunable_weights
from .base import Batches, PruningMethod, register_method


@register_method
class Magnitude(PruningMethod):
    name = "magnitude"
    title = "magnitude pruning"
    description = "Magnitude pruning keeps the weights with the largest |W|."
    data = "none"

    def prune(
        self,
        model: torch.nn.Module,
        batches: Batches | None,
        config: DPrunerConfig,
        *,
        general_batches: Batches | None = None,
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        weights = find_prunable_weights(model, config.target_modules)
        masks = compute_masks(MagnitudeImportance().score(model, weights), weights, config, disable_tqdm)
        apply_masks(model, masks)
        return masks
