"""The one-shot structured recipe on the MLP neurons: greedy OBS removes neurons and refits ``down_proj``, then
every pruned block is trained to reproduce the dense block. ``PATConfig(axis="neurons", strategy="one-shot")``
runs it inside `PATTrainer` before the LoRA steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from .neuron_pruning import prune_mlp_neurons
from .teacher_reconstruction import reconstruct_to_teacher

Batches = Sequence[dict[str, torch.Tensor]]


def prune_and_reconstruct(
    model: PreTrainedModel,
    num_removed: int,
    calibration: Batches,
    reconstruction: Batches,
    *,
    epochs: int = 8,
    lr: float = 2e-3,
    damping: float = 0.01,
    precision: str = "auto",
    seed: int = 0,
    disable_tqdm: bool = False,
) -> PreTrainedModel:
    """A new model without `num_removed` MLP neurons per layer (`prune_mlp_neurons` with ``selection="obs"`` on
    the `calibration` batches), its blocks then trained toward `model`'s (`reconstruct_to_teacher` on the
    `reconstruction` batches, `epochs` passes at Adam learning rate `lr`); `model` is unchanged. The new model is
    on `model`'s device.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> batches = [{"input_ids": torch.randint(0, 64, (2, 16))}]
        >>> small = prune_and_reconstruct(dense, 16, batches, batches, epochs=2, disable_tqdm=True)
        >>> small.config.intermediate_size
        48
    """
    small = prune_mlp_neurons(model, num_removed, calibration, damping=damping, selection="obs")
    small = small.to(next(model.parameters()).device)
    reconstruct_to_teacher(small, model, reconstruction, epochs=epochs, lr=lr, precision=precision, seed=seed,
                           disable_tqdm=disable_tqdm)
    return small
