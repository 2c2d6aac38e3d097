"""Run a decoder one block at a time on cached calibration inputs (as SparseGPT/Wanda do).

Each block's ``(args, kwargs)`` are captured with forward pre-hooks in one pass and replayed, so position
embeddings, per-layer masks and any other layer kwargs come from the model itself, never rebuilt by hand.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .reconstruction import autocast_to
from .targets import PrunableWeight, decoder_layers


class _InputsCaptured(Exception):
    """Raised by the last block's pre-hook: the inputs are recorded, the rest of the model need not run."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """The first block's hidden states for each batch, and every block's other ``(args, kwargs)``.

    Blocks can receive different kwargs (e.g. a sliding-window mask on some layers), so each block's own are
    kept; they are references to tensors the model shares between blocks, not copies. The blocks themselves do
    not run: while capturing, each passes its input through (only the embeddings and what the model computes
    for its blocks, such as position embeddings and attention masks, are computed).
    """
    blocks = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                hidden.append(args[0] if args else kwargs["hidden_states"])
            calls[index].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if index == len(blocks) - 1:
                raise _InputsCaptured

        return hook

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    own = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's device hooks wrap forward
    for block in blocks:
        block.forward = _pass_through
    try:
        for batch in batches:
            try:
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            except _InputsCaptured:
                pass
    finally:
        for block, forward in zip(blocks, own, strict=True):
            if forward is None:
                del block.forward  # the class's forward again
            else:
                block.forward = forward
        for handle in handles:
            handle.remove()
    return hidden, calls


def _pass_through(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a block's forward during `capture_block_inputs`: its input hidden states, unchanged."""
    return args[0] if args else kwargs["hidden_states"]


@dataclass
class BlockStep:
    """One decoder block, its input hidden states and other inputs; `forward()` runs them (firing any hooks)."""

    index: int
    block: nn.Module
    hidden: list[torch.Tensor]
    calls: list[tuple[tuple, dict]]

    @torch.no_grad()
    def forward(self, autocast: torch.dtype | None = None) -> list[torch.Tensor]:
        """The block's output for each batch; with `autocast` (e.g. ``torch.bfloat16``) computed autocast to that
        dtype and returned in the input's dtype."""
        outputs = []
        for hidden, (args, kwargs) in zip(self.hidden, self.calls, strict=False):
            with autocast_to(hidden.device, autocast):
                out: Any = self.block(hidden, *args, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(out.to(hidden.dtype))
        return outputs


def iterate_blocks(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], desc: str = "blocks", disable_tqdm: bool = False
) -> Iterator[BlockStep]:
    """Yield each decoder block with its inputs; after the caller is done (it may change the block's
    weights), the block is re-run to produce the inputs of the next one."""
    was_training = model.training
    model.eval()
    try:
        hidden, calls = capture_block_inputs(model, batches)
        blocks = decoder_layers(model)
        for index in tqdm(range(len(blocks)), desc=desc, disable=disable_tqdm):
            step = BlockStep(index, blocks[index], hidden, calls[index])
            yield step
            hidden = step.forward()
    finally:
        model.train(was_training)


def input_statistics(
    step: BlockStep, targets: list[PrunableWeight], batches: Sequence[Mapping[str, torch.Tensor]], gram: bool
) -> dict[str, tuple[torch.Tensor, int]]:
    """Run the block once over its inputs with hooks on `targets`; per module, over non-padding tokens,
    ``Σ x²`` per input feature (``gram=False``, fp32) or ``XᵀX`` (``gram=True``), and the token count.

    Each batch's ``XᵀX`` is computed in fp32 and summed in fp64, so the total does not depend (beyond fp64
    rounding) on how the batches are split between processes and summed back (`distributed.all_reduce_sum_`)."""
    token_masks = [token_mask(batch) for batch in batches]
    acc: dict[str, list] = {}
    for w in targets:
        size = w.weight.shape[w.input_dim]
        shape = (size, size) if gram else (size,)
        dtype = torch.float64 if gram else torch.float32
        acc[w.name] = [torch.zeros(shape, dtype=dtype, device=w.weight.device), 0]
    batch_index = [-1]
    # modules reading the same tensor (q/k/v, gate/up) share one statistic per batch: the last input seen and its
    # statistic are kept (the reference also keeps the tensor alive, so `is` cannot match a new one at its address)
    last: dict[str, Any] = {"input": None, "value": None, "count": 0}

    def next_batch(module: torch.nn.Module, args: tuple) -> None:
        batch_index[0] += 1
        last.update(input=None, value=None)

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if args[0] is not last["input"]:
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()
                keep = token_masks[batch_index[0]]
                if keep is not None and keep.numel() == x.shape[0]:  # modules seeing every token of the batch
                    x = x[keep.to(x.device)]
                last.update(input=args[0], value=x.t() @ x if gram else (x * x).sum(0), count=x.shape[0])
            acc[name][0].add_(last["value"])
            acc[name][1] += last["count"]

        return hook

    handles = [step.block.register_forward_pre_hook(next_batch)]
    handles += [w.module.register_forward_hook(make_hook(w.name)) for w in targets]
    try:
        step.forward()
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    for w in targets:
        if acc[w.name][1] == 0:
            raise ValueError(f"{w.module_name} received no calibration tokens; is it used in forward()?")
    return {name: (value, count) for name, (value, count) in acc.items()}


def token_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Flat boolean mask of the non-padding tokens of a batch, or None when it has no padding."""
    attention = batch.get("attention_mask")
    if attention is None or bool(attention.all()):
        return None
    return attention.reshape(-1).bool()
