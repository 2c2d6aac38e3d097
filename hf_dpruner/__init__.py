"""hf_dpruner: domain-specific pruning (D-Pruner) of Hugging Face causal language models."""

__version__ = "0.1.0"

from .config import DPrunerConfig  # noqa: E402
from .modeling import AutoPrunedModelForCausalLM, PrunedModelMixin, make_pruned  # noqa: E402
from .recovery import get_masked_peft_model, load_masked_adapter, merge_masked_lora  # noqa: E402
from .trainer import DPrunerTrainer, PruningResult  # noqa: E402

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
