"""Resolve ``layer_sparsity="owl"`` into per-block ratios: one pass of the dense model over the calibration
windows measures each block's outlier ratio (`importance.owl`), which sets its sparsity."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from transformers.utils import logging

from .config import DPrunerConfig
from .importance.owl import outlier_ratio, owl_sparsities
from .importance.wanda import wanda_scores
from .layerwise import input_statistics, iterate_blocks
from .targets import decoder_layers, find_prunable_weights, group_by_block

logger = logging.get_logger(__name__)


@torch.no_grad()
def owl_layer_sparsity(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    config: DPrunerConfig,
    disable_tqdm: bool = False,
) -> dict[str, float]:
    """``{regex of a decoder block's parameters: sparsity}`` by OWL, for `DPrunerConfig.layer_sparsity`.

    Each block's outlier ratio is measured on the dense model with the calibration `batches`; the ratios set the
    blocks' sparsity in ``config.sparsity ± config.owl_lambda`` (mean ``config.sparsity``)."""
    if config.n_m is not None:
        raise ValueError("layer_sparsity='owl' sets a ratio per block; N:M sparsity has a fixed ratio.")
    by_block = group_by_block(find_prunable_weights(model, config.target_modules))
    prefixes = {id(m): name for name, m in model.named_modules()}
    blocks = decoder_layers(model)
    ratios: dict[int, float] = {}
    for step in iterate_blocks(model, batches, desc="OWL outlier ratios", disable_tqdm=disable_tqdm):
        targets = by_block.get(step.index, [])
        if targets:
            stats = input_statistics(step, targets, batches, gram=False)
            scores = [wanda_scores(w.weight, stats[w.name][0], w.input_dim) for w in targets]
            ratios[step.index] = outlier_ratio(scores, config.owl_threshold)
    sparsities = owl_sparsities(list(ratios.values()), config.sparsity, config.owl_lambda)
    resolved = {f"^{re.escape(prefixes[id(blocks[i])])}\\.": s for i, s in zip(ratios, sparsities, strict=True)}
    logger.info("OWL block sparsities: " + ", ".join(f"{i}: {s:.3f}" for i, s in zip(ratios, sparsities,
                                                                                       strict=True)))
    return resolved
