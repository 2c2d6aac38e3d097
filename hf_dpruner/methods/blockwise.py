"""`BlockwiseMethod`: the orchestration shared by the methods that prune one decoder block at a time on its
calibration inputs (Wanda, SparseGPT): the block's target modules are hooked during one pass over the block's
inputs, all of them are pruned, and the pruned block then produces the next block's inputs.

Padding tokens (``attention_mask == 0``) are left out of the input statistics; windows made by
`data.build_windows` have none.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from ..config import DPrunerConfig
from ..data import batches_to_device
from ..layerwise import input_statistics, iterate_blocks
from ..targets import PrunableWeight, find_prunable_weights, group_by_block
from .base import Batches, PruningMethod


class BlockwiseMethod(PruningMethod):
    """A method that prunes each weight from its block's input statistics: ``Σ x²`` per input feature
    (``gram = False``) or the Gram matrix ``XᵀX`` (``gram = True``), over the block's calibration tokens."""

    gram: ClassVar[bool] = False

    @abstractmethod
    def prune_weight(
        self, weight: PrunableWeight, statistic: torch.Tensor, num_tokens: int, config: DPrunerConfig
    ) -> torch.Tensor:
        """Prune one weight in place from its input statistic; return its keep-mask (in the weight's layout)."""

    def prune(
        self,
        model: torch.nn.Module,
        batches: Batches | None,
        config: DPrunerConfig,
        *,
        general_batches: Batches | None = None,
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        if not batches:
            raise ValueError(
                f"The {self.name!r} method needs calibration batches (dicts with 'input_ids'), got {batches!r}; "
                "only methods with data='none' (e.g. 'magnitude') work without data."
            )
        batches = batches_to_device(batches, next(model.parameters()).device)
        by_block = group_by_block(find_prunable_weights(model, config.target_modules))
        masks: dict[str, torch.Tensor] = {}
        for step in iterate_blocks(model, batches, desc=f"{self.name} pruning", disable_tqdm=disable_tqdm):
            targets = by_block.get(step.index, [])
            if not targets:
                continue
            stats = input_statistics(step, targets, batches, gram=self.gram)
            for weight in targets:
                statistic, count = stats[weight.name]
                masks[weight.name] = self.prune_weight(weight, statistic, count, config)
        return masks
