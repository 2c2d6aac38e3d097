"""hf_dpruner: domain-specific pruning (D-Pruner) of Hugging Face causal language models."""

from .config import DPrunerConfig
from .modeling import AutoPrunedModelForCausalLM, PrunedModelMixin, make_pruned
from .recovery import get_masked_peft_model, load_masked_adapter, merge_masked_lora
from .stages import PruningResult
from .trainer import DPrunerTrainer
from .version import __version__

__all__ = [
    "AutoPrunedModelForCausalLM",
    "DPrunerConfig",
    "DPrunerTrainer",
    "PrunedModelMixin",
    "PruningResult",
    "__version__",
    "get_masked_peft_model",
    "load_masked_adapter",
    "make_pruned",
    "merge_masked_lora",
]
