"""The calibration pass shared by the structured-pruning statistics (channel importance, compensation, MLP neurons).

Callers register forward hooks that accumulate what they measure; `calibration_pass` runs the models on each batch
in eval mode without gradients, keeps the batch's attention mask where the hooks can read it (`CalibrationBatch`),
and restores the training flags and removes the hooks afterwards, also on an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

Batches = Sequence[Mapping[str, torch.Tensor]]


class CalibrationBatch:
    """The batch being run, as the hooks see it: its ``attention_mask`` (``[batch, tokens]`` or None)."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None

    def tokens(self, tensor: torch.Tensor, width: int) -> torch.Tensor:
        """`tensor` (``[batch, tokens, width]``) as float32 CPU rows of its real tokens (padding dropped)."""
        rows = tensor.detach().float().reshape(-1, width).cpu()
        if self.attention_mask is None:
            return rows
        return rows[self.attention_mask.reshape(-1).bool().cpu()]


@torch.no_grad()
def calibration_pass(
    models: Sequence[nn.Module],
    batches: Batches,
    batch_state: CalibrationBatch,
    handles: Iterable[torch.utils.hooks.RemovableHandle] = (),
    after_each: Callable[[], None] | None = None,
) -> int:
    """Run every model of `models` on each of `batches` (``input_ids``, optionally ``attention_mask``) in eval mode,
    with `batch_state` set to the batch, then `after_each()`; remove `handles` and restore the training flags at the
    end. Returns the number of windows (sequences) run."""
    modes = [model.training for model in models]
    windows = 0
    for model in models:
        model.eval()
    try:
        for batch in batches:
            batch_state.attention_mask = batch.get("attention_mask")
            for model in models:
                model(input_ids=batch["input_ids"], attention_mask=batch_state.attention_mask)
            windows += len(batch["input_ids"])
            if after_each is not None:
                after_each()
    finally:
        for handle in handles:
            handle.remove()
        for model, mode in zip(models, modes, strict=True):
            model.train(mode)
        batch_state.attention_mask = None
    return windows
