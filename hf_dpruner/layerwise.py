"""Run a decoder one block at a time on cached calibration inputs (as SparseGPT/Wanda do).

Each block's ``(args, kwargs)`` are captured with forward pre-hooks in one pass and replayed, so position
embeddings, per-layer masks and any other layer kwargs come from the model itself, never rebuilt by hand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .targets import decoder_layers


class _InputsCaptured(Exception):
    """Raised by the last block's pre-hook: the inputs are recorded, the rest of the model need not run."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """The first block's hidden states for each batch, and every block's other ``(args, kwargs)``.

    Blocks can receive different kwargs (e.g. a sliding-window mask on some layers), so each block's own are
    kept; they are references to tensors the model shares between blocks, not copies.
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
    try:
        for batch in batches:
            try:
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            except _InputsCaptured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hidden, calls


@dataclass
class BlockStep:
    """One decoder block, its input hidden states and other inputs; `forward()` runs them (firing any hooks)."""

    index: int
    block: nn.Module
    hidden: list[torch.Tensor]
    calls: list[tuple[tuple, dict]]

    @torch.no_grad()
    def forward(self) -> list[torch.Tensor]:
        outputs = []
        for hidden, (args, kwargs) in zip(self.hidden, self.calls):
            out: Any = self.block(hidden, *args, **kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
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
