"""`DualBlockwiseMethod`: one decoder block at a time on domain *and* general calibration inputs.

Per block: the Hessian of every target weight blends the domain and the general inputs
(`reconstruction.blended_hessian`), SparseGPT selects the mask and updates the kept weights on it, and, when
``reconstruct`` is set, the block's kept weights are then trained to reproduce the dense block's outputs
(`reconstruction.reconstruct_block`) on the same windows, inputs from the already-pruned blocks, targets from the
dense model's own trajectory. The pruned block then produces the next block's inputs. The reconstruction's passes
(training, targets, the outputs that feed the next block) may run autocast (`DPrunerConfig.reconstruction_precision`);
the statistics and the OBS update stay float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ..config import DPrunerConfig
from ..data import batches_to_device
from ..importance.sparsegpt import sparsegpt_prune_weight
from ..layerwise import BlockStep, capture_block_inputs, input_statistics
from ..reconstruction import autocast_dtype, blended_hessian, output_error, reconstruct_block
from ..targets import decoder_layers, find_prunable_weights, group_by_block
from .base import Batches, PruningMethod


def rebatch(batches: Batches, size: int) -> list[dict[str, torch.Tensor]]:
    """Concatenate consecutive batches into batches of (up to) `size` rows; only batches of the same window length,
    with or without an attention mask alike, are joined."""
    out: list[dict[str, torch.Tensor]] = []
    pending: list[Mapping[str, torch.Tensor]] = []

    def kind(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Size, bool]:
        return batch["input_ids"].shape[1:], "attention_mask" in batch

    def flush() -> None:
        if pending:
            keys = [k for k in ("input_ids", "attention_mask") if k in pending[0]]
            out.append({k: torch.cat([b[k] for b in pending]) for k in keys})
            pending.clear()

    for batch in batches:
        rows = sum(len(b["input_ids"]) for b in pending)
        if pending and (rows + len(batch["input_ids"]) > size or kind(batch) != kind(pending[0])):
            flush()
        pending.append(batch)
    flush()
    return out


class DualBlockwiseMethod(PruningMethod):
    """SparseGPT on a Hessian blending domain and general inputs, optionally followed by block reconstruction."""

    data = "both"
    statistics = "hessian"
    default_general_weight: ClassVar[float] = 0.5
    reconstruct: ClassVar[bool] = False

    def general_weight(self, config: DPrunerConfig) -> float:
        return self.default_general_weight if config.general_weight is None else float(config.general_weight)

    def run(self, model, tokenizer, config: DPrunerConfig, training_args, **kwargs: Any):
        """`PruningMethod.run` with the general weight resolved, so that ``pruning_config.json`` records the
        weight used (the method's default when ``config.general_weight`` is None)."""
        config = dataclasses.replace(config, general_weight=self.general_weight(config))
        return super().run(model, tokenizer, config, training_args, **kwargs)

    @torch.no_grad()
    def prune(
        self,
        model: torch.nn.Module,
        batches: Batches | None,
        config: DPrunerConfig,
        *,
        general_batches: Batches | None = None,
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        weight = self.general_weight(config)
        if not batches:
            raise ValueError(f"The {self.name!r} method needs domain calibration batches (dicts with 'input_ids').")
        if weight > 0 and not general_batches:
            raise ValueError(f"The {self.name!r} method blends general text with weight {weight:g} but got no general "
                             "calibration batches; give general text, or set general_weight=0.")
        device = next(model.parameters()).device
        size = config.reconstruction_batch_size
        sets = [rebatch(batches_to_device(batches, device), size)]
        if weight > 0:
            sets.append(rebatch(batches_to_device(general_batches, device), size))
        set_weights = [1.0 - weight, weight][: len(sets)]
        by_block = group_by_block(find_prunable_weights(model, config.target_modules))
        reconstruct = self.reconstruct and config.reconstruction_epochs > 0
        # the reconstruction's training passes, its targets and the next block's inputs; statistics and OBS: float32
        autocast = autocast_dtype(config.reconstruction_precision, device) if reconstruct else None
        self.increased_damping: dict[str, float] = {}
        self.block_errors: dict[int, float] = {}  # relative output error of each block after reconstruction
        generator = torch.Generator().manual_seed(0)
        masks: dict[str, torch.Tensor] = {}
        was_training = model.training
        model.eval()
        try:
            captured = [capture_block_inputs(model, batch_set) for batch_set in sets]
            pruned = [hidden for hidden, _ in captured]
            dense = list(pruned)
            blocks = decoder_layers(model)
            for index in tqdm(range(len(blocks)), desc=f"{self.name} pruning", disable=disable_tqdm):
                block = blocks[index]
                steps = [BlockStep(index, block, pruned[k], captured[k][1][index]) for k in range(len(sets))]
                if reconstruct:  # the dense block on the dense trajectory: the targets, and the next dense inputs
                    dense = [BlockStep(index, block, dense[k], captured[k][1][index]).forward(autocast)
                             for k in range(len(sets))]
                targets = by_block.get(index, [])
                if targets:
                    stats = [input_statistics(step, targets, sets[k], gram=True) for k, step in enumerate(steps)]
                    for w in targets:
                        hessian = blended_hessian(stats[0][w.name], stats[1][w.name] if len(stats) > 1 else None,
                                                  weight)
                        masks[w.name] = sparsegpt_prune_weight(w, hessian, config, self.increased_damping)
                    del stats
                    if reconstruct:
                        inputs, outputs, weights = _reconstruction_batches(steps, dense, set_weights)
                        reconstruct_block(block, inputs, outputs, {w.weight: masks[w.name] for w in targets},
                                          epochs=config.reconstruction_epochs, lr=config.reconstruction_lr,
                                          batch_weights=weights, generator=generator, measure=False,
                                          autocast=autocast)
                pruned = [step.forward(autocast) for step in steps]
                if reconstruct and targets:  # the error left, from the outputs that feed the next block
                    self.block_errors[index] = output_error([o for outs in pruned for o in outs],
                                                            [t for outs in dense for t in outs], weights)
        finally:
            model.train(was_training)
        return masks


def _reconstruction_batches(steps: Sequence[BlockStep], dense: Sequence[list[torch.Tensor]],
                            set_weights: Sequence[float]) -> tuple[list, list[torch.Tensor], list[float]]:
    """(inputs, dense targets, loss weights) of every batch of every text, in order; each text's batches share its
    weight equally."""
    inputs, targets, weights = [], [], []
    for step, outputs, share in zip(steps, dense, set_weights, strict=True):
        for hidden, (args, kwargs), target in zip(step.hidden, step.calls, outputs, strict=True):
            inputs.append((hidden, args, kwargs))
            targets.append(target)
            weights.append(share / len(outputs))
    return inputs, targets, weights
