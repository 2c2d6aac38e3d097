"""SparseGPT (Frantar & Alistarh 2023): OBS mask selection with reconstruction of the kept weights, one decoder
block at a time. The tensor math is `importance.sparsegpt.sparsegpt_prune`."""

from __future__ import annotations

import torch

from ..config import DPrunerConfig
from ..importance.sparsegpt import sparsegpt_prune_weight
from ..targets import PrunableWeight
from .base import register_method
from .blockwise import BlockwiseMethod


@register_method
class SparseGPT(BlockwiseMethod):
    name = "sparsegpt"
    title = "SparseGPT"
    description = ("SparseGPT prunes one decoder block at a time by OBS saliency on the calibration text and updates "
                   "the remaining weights to reconstruct the block's outputs.")
    citation = ("Elias Frantar, Dan Alistarh. *SparseGPT: Massive Language Models Can Be Accurately Pruned in "
                "One-Shot*. ICML 2023. arXiv:2301.00774.")
    statistics = "hessian"
    gram = True

    def prune(self, model, batches, config, *, general_batches=None, disable_tqdm=False):
        self.increased_damping = {}  # weights whose Hessian needed more damping than config.damping, and how much
        return super().prune(model, batches, config, general_batches=general_batches, disable_tqdm=disable_tqdm)

    @torch.no_grad()
    def prune_weight(
        self, weight: PrunableWeight, statistic: torch.Tensor, num_tokens: int, config: DPrunerConfig
    ) -> torch.Tensor:
        return sparsegpt_prune_weight(weight, statistic * (2.0 / num_tokens), config, self.increased_damping)

