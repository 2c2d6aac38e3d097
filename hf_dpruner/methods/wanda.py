"""Wanda (Sun et al. 2023): keep the largest ``|W_ij| · ||X_j||₂``; the kept weights are not updated.

The comparison group follows `DPrunerConfig.sparsity_type`: ``"row"`` (per output row) is Wanda's own and its
best setting; ``"unstructured"`` compares whole matrices."""

from __future__ import annotations

import torch

from ..config import DPrunerConfig
from ..importance.wanda import wanda_scores
from ..masks import compute_mask
from ..targets import PrunableWeight
from .base import register_method
from .blockwise import BlockwiseMethod


@register_method
class Wanda(BlockwiseMethod):
    name = "wanda"
    title = "Wanda"
    description = ("Wanda keeps, in every output row, the weights with the largest |W| times the norm of their input "
                   "activation on the calibration text.")
    citation = ("Mingjie Sun, Zhuang Liu, Anna Bair, J. Zico Kolter. *A Simple and Effective Pruning Approach for "
                "Large Language Models*. ICLR 2024. arXiv:2306.11695.")
    statistics = "input_norms"
    gram = False

    @torch.no_grad()
    def prune_weight(
        self, weight: PrunableWeight, statistic: torch.Tensor, num_tokens: int, config: DPrunerConfig
    ) -> torch.Tensor:
        scores = wanda_scores(weight.weight, statistic, weight.input_dim)
        keep = compute_mask(scores, config.sparsity_for(weight.name), config.sparsity_type, weight.input_dim,
                            weight.name)
        weight.weight.masked_fill_(~keep, 0.0)
        return keep
