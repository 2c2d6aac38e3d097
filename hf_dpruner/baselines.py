"""The peer baselines D-Pruner is compared with, on the same targets, sparsity settings and masks format.

- ``magnitude``: keep the largest ``|W|``; needs no data.
- ``wanda`` (Sun et al. 2023): keep the largest ``|W_ij| · ||X_j||_2``; weights are not updated.
- ``sparsegpt`` (Frantar & Alistarh 2023): OBS mask selection with weight reconstruction.

Wanda and SparseGPT prune one decoder block at a time, as both papers do: the block's target modules are
hooked during one pass over the block's calibration inputs, all of them are pruned, and the pruned block then
produces the next block's inputs. The comparison group follows `DPrunerConfig.sparsity_type` for all three
(``"row"`` is Wanda's own default; ``"unstructured"`` compares whole matrices).

Padding tokens (``attention_mask == 0``) are left out of the input statistics; windows made by
`data.build_windows` have none.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from .config import DPrunerConfig
from .importance.magnitude import MagnitudeImportance
from .importance.sparsegpt import sparsegpt_prune
from .importance.wanda import wanda_scores
from .layerwise import input_statistics, iterate_blocks
from .masks import apply_masks, compute_mask, compute_masks
from .targets import PrunableWeight, find_prunable_weights

BASELINE_METHODS = ("magnitude", "wanda", "sparsegpt")


def prune_baseline(
    model: torch.nn.Module,
    method: str,
    batches: Sequence[Mapping[str, torch.Tensor]] | None = None,
    config: DPrunerConfig | None = None,
    disable_tqdm: bool = False,
) -> dict[str, torch.Tensor]:
    """Prune `model` in place with a baseline `method`; returns the keep-masks ``{parameter name: bool tensor}``.

    `batches` are calibration batches (dicts with ``input_ids`` and optionally ``attention_mask``; ``labels``
    are ignored), needed by ``wanda`` and ``sparsegpt``. `config` gives ``sparsity``, ``sparsity_type``,
    ``layer_sparsity``, ``target_modules`` and (SparseGPT) ``damping``; default `DPrunerConfig()`.
    Pruned weights are exactly 0 afterwards.
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"Unknown baseline method {method!r}; valid methods: {', '.join(BASELINE_METHODS)}.")
    config = config if config is not None else DPrunerConfig()
    weights = find_prunable_weights(model, config.target_modules)
    if method == "magnitude":
        masks = compute_masks(MagnitudeImportance().score(model, weights), weights, config, disable_tqdm)
        apply_masks(model, masks)
        return masks
    if not batches:
        raise ValueError(
            f"The {method!r} baseline needs calibration batches (dicts with 'input_ids'), got {batches!r}; "
            "only 'magnitude' works without data."
        )
    device = next(model.parameters()).device
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    by_block: dict[int, list[PrunableWeight]] = defaultdict(list)
    for weight in weights.values():
        by_block[weight.layer_index].append(weight)
    masks: dict[str, torch.Tensor] = {}
    for step in iterate_blocks(model, batches, desc=f"{method} pruning", disable_tqdm=disable_tqdm):
        targets = by_block.get(step.index, [])
        if not targets:
            continue
        stats = input_statistics(step, targets, batches, gram=method == "sparsegpt")
        for w in targets:
            second_moment, count = stats[w.name]
            if method == "wanda":
                masks[w.name] = _prune_wanda(w, second_moment, config)
            else:
                masks[w.name] = _prune_sparsegpt(w, second_moment * (2.0 / count), config)
    return masks


@torch.no_grad()
def _prune_wanda(w: PrunableWeight, input_sq_norms: torch.Tensor, config: DPrunerConfig) -> torch.Tensor:
    scores = wanda_scores(w.weight, input_sq_norms, w.input_dim)
    keep = compute_mask(scores, config.sparsity_for(w.name), config.sparsity_type, w.input_dim, w.name)
    w.weight.masked_fill_(~keep, 0.0)
    return keep


@torch.no_grad()
def _prune_sparsegpt(w: PrunableWeight, hessian: torch.Tensor, config: DPrunerConfig) -> torch.Tensor:
    new_weight, keep = sparsegpt_prune(
        w.as_out_in(w.weight.detach()), hessian, config.sparsity_for(w.name), config.sparsity_type, config.damping
    )
    # as_out_in is a transpose for Conv1D (its own inverse) and the identity for nn.Linear: back to weight layout
    w.weight.copy_(w.as_out_in(new_weight))
    return w.as_out_in(keep).contiguous()
