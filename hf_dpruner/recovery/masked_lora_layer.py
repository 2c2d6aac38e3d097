"""`MaskedLoraLinear`: a peft LoRA layer whose update is multiplied by the keep-mask of the pruned layer it wraps."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..modeling import MASK_BUFFER


class MaskedLoraLinear(LoraLinear):
    """LoRA for a pruned ``nn.Linear`` or GPT-2 ``Conv1D``: the effective weight is ``W + (B·A·scaling) ⊙ M``, with
    M the ``pruning_keep_mask`` buffer of the wrapped layer. Merging therefore leaves every pruned weight at exactly
    0 and gives the outputs of the unmerged adapter. A wrapped layer without a mask gets stock LoRA.

    Cost: on a masked layer, `forward` builds the masked delta (d_out x d_in) of each active adapter at every call
    and autograd keeps it for the backward pass, i.e. about one extra weight matrix of compute and memory per layer
    (stock LoRA needs r x (d_in + d_out)). Mixed-adapter batches (``adapter_names=``) are not supported there.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # Conv1D stores its weight as (in, out): set per layer, whatever `config.fan_in_fan_out` says.
        self.fan_in_fan_out = self.is_target_conv_1d_layer = isinstance(self.get_base_layer(), Conv1D)

    @property
    def lora_variants(self) -> dict[tuple[str, ...], None]:
        """Plain LoRA only: the variants (DoRA, ...) merge and forward in their own, unmasked way."""
        return {(): None}

    @property
    def keep_mask(self) -> torch.Tensor | None:
        """The wrapped layer's keep-mask (weight-shaped, True = kept), or None if it is not pruned."""
        return getattr(self.get_base_layer(), MASK_BUFFER, None)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """LoRA's delta weight (shaped like the base weight) with the pruned positions set to exactly 0."""
        delta = super().get_delta_weight(adapter)
        keep = self.keep_mask
        return delta if keep is None else delta.masked_fill(~keep.to(delta.device), 0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.keep_mask is None or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"adapter_names={kwargs['adapter_names']!r}: mixed-adapter batches are not supported on masked LoRA "
                "layers. Select one adapter with `set_adapter(name)` instead."
            )
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_input = self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype))
            delta = self.get_delta_weight(name)
            update = F.linear(lora_input, delta.T if self.fan_in_fan_out else delta)
            if self.lora_bias[name]:
                update = update + self.lora_B[name].bias * self.scaling[name]
            result = result + update.to(result.dtype)
        return result
