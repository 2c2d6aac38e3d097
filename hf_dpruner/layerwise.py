"""Run a decoder one block at a time on cached calibration inputs (as SparseGPT/Wanda do).

The first block's ``(args, kwargs)`` are captured with a forward pre-hook and replayed, so position
embeddings, masks and any other layer kwargs come from the model itself and are never rebuilt by hand.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .targets import decoder_layers


class _InputsCaptured(Exception):
    """Raised by the pre-hook to stop the forward pass once the first block's inputs are recorded."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` the first decoder block receives for each calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _InputsCaptured

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            except _InputsCaptured:
                pass
    finally:
        handle.remove()
    return captured


def _replace_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@dataclass
class BlockStep:
    """One decoder block and its cached inputs; `forward()` runs them through it (firing any hooks)."""

    index: int
    block: nn.Module
    calls: list[tuple[tuple, dict]]
    outputs: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def forward(self) -> list[torch.Tensor]:
        self.outputs = []
        for args, kwargs in self.calls:
            out: Any = self.block(*args, **kwargs)
            self.outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return self.outputs


def iterate_blocks(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], desc: str = "blocks", disable_tqdm: bool = False
) -> Iterator[BlockStep]:
    """Yield each decoder block with its inputs; after the caller is done (it may change the block's
    weights), the block is re-run to produce the inputs of the next one."""
    was_training = model.training
    model.eval()
    try:
        calls = capture_block_inputs(model, batches)
        blocks = decoder_layers(model)
        for index in tqdm(range(len(blocks)), desc=desc, disable=disable_tqdm):
            step = BlockStep(index, blocks[index], calls)
            yield step
            outputs = step.forward()
            calls = [_replace_hidden(call, hidden) for call, hidden in zip(calls, outputs)]
    finally:
        model.train(was_training)
