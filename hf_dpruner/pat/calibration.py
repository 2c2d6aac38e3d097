"""The calibration pass shared by the structured-pruning statistics (channel importance, compensation, MLP neurons).

Callers register forward hooks that accumulate what they measure; `calibration_pass` runs the models on each batch
in eval mode without gradients, keeps the batch's attention mask where the hooks can read it (`CalibrationBatch`),
and restores the training flags and removes the hooks afterwards, also on an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..layerwise import token_mask

Batches = Sequence[Mapping[str, torch.Tensor]]


class CalibrationBatch:
    """The batch being run, as the hooks see it: its ``attention_mask`` (``[batch, tokens]`` or None)."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None  # flat CPU mask of the real tokens, None without padding

    def set(self, batch: Mapping[str, torch.Tensor] | None) -> None:
        """Make `batch` the current one (None: no batch)."""
        self.attention_mask = None if batch is None else batch.get("attention_mask")
        keep = None if batch is None else token_mask(batch)
        self._keep = None if keep is None else keep.cpu()

    def tokens(self, tensor: torch.Tensor, width: int) -> torch.Tensor:
        """`tensor` (``[batch, tokens, width]``) as float32 CPU rows of its real tokens (padding dropped)."""
        rows = tensor.detach().float().reshape(-1, width).cpu()
        return rows if self._keep is None else rows[self._keep]


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
            batch_state.set(batch)
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
        batch_state.set(None)
    return windows
