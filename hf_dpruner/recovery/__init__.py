"""Recovery of pruned models: LoRA whose updates keep the pruning masks."""

from .lora import get_masked_peft_model, load_masked_adapter, merge_masked_lora
from .masked_lora_layer import MaskedLoraLinear

__all__ = ["MaskedLoraLinear", "get_masked_peft_model", "load_masked_adapter", "merge_masked_lora"]
