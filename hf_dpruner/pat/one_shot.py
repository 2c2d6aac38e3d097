"""One-shot width pruning: drop the hidden channels of least activation importance, with no training.

The structured peer of PAT (Minitron's width pruning without its distillation): the same channel importance that
``PATConfig(mask_init="activation")`` starts from, the same export, but the channels are chosen once and never learned.
Tune the smaller model afterwards (LoRA, distillation) like any other model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from .channel_importance import activation_channel_importance
from .compensation import reader_maps
from .config import PATConfig
from .export import channel_subset_state_dict, smaller_model
from .modules import check_supported


def width_prune(
    model: PreTrainedModel,
    pruning_ratio: float,
    calibration: Sequence[Mapping[str, torch.Tensor]],
    importance: torch.Tensor | None = None,
    compensate: bool = False,
    damping: float = 0.01,
    compensation_rounds: int = 1,
) -> PreTrainedModel:
    """A new, smaller standard model keeping the ``round((1 - pruning_ratio) · hidden_size)`` hidden channels of
    largest activation importance over the `calibration` batches (``input_ids`` and optionally
    ``attention_mask``), or of the given `importance`. `model` is left unchanged.

    With ``compensate=True`` the weights that read the residual stream (q/k/v, gate/up, and an untied LM head) are
    refitted by least squares to reproduce their dense outputs on the `calibration` tokens from what the smaller
    model's norms give them (`compensation.reader_maps`, ridge `damping`); calibrate on the text the model must
    keep (e.g. domain and general windows). A tied LM head cannot be refitted and keeps the column selection.
    ``compensation_rounds > 1`` refits on the smaller model's own residual stream, one more forward pass of both
    models per round.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> small = width_prune(model, 0.25, [{"input_ids": torch.randint(0, 64, (2, 16))}])
        >>> small.config.hidden_size
        24
    """
    check_supported(model)
    if not isinstance(compensation_rounds, int) or compensation_rounds < 1:
        raise ValueError(f"compensation_rounds must be an integer >= 1, got {compensation_rounds!r}.")
    hidden = model.config.hidden_size
    heads = model.config.num_attention_heads  # the smaller hidden size must stay a multiple of it
    kept = PATConfig(pruning_ratio=pruning_ratio, axis="hidden", strategy="learned", lora_r=0).kept_channels(
        hidden, multiple_of=heads)
    if importance is None:
        importance = activation_channel_importance(model, calibration)
    if importance.shape != (hidden,):
        raise ValueError(f"importance must have shape ({hidden},), got {tuple(importance.shape)}.")
    order = torch.argsort(importance.float().cpu(), descending=True, stable=True)
    keep = order[:kept].sort().values
    if not compensate:
        return smaller_model(model, channel_subset_state_dict(model, keep), kept)
    small = None  # the first fit reads the dense residual stream, each refit the last smaller model's own
    for _ in range(compensation_rounds):
        maps = reader_maps(model, keep, calibration, damping, small=small)
        small = smaller_model(model, channel_subset_state_dict(model, keep, reader_maps=maps), kept)
    return small
