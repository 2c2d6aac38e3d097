"""Recovery of pruned models: LoRA whose updates keep the pruning masks, and RankAdaptor per-layer ranks."""

from .distillation_trainer import DistillationTrainer
from .lora import get_masked_peft_model, load_masked_adapter, merge_masked_lora
from .masked_lora_layer import MaskedLoraLinear
from .performance_model import PerformanceModel, RecoveryRun
from .rank_space import RankSpace, lora_parameter_count, lora_target_modules, rank_patterns
from .rankadaptor import (
    RankAdaptorConfig,
    RankSearchResult,
    ShortRecoveryRun,
    layer_sparsity,
    layer_statistics,
    lora_config_for,
    search_ranks,
)
from .recover import RecoveryArguments, RecoveryResult, plot_ranks, rank_space_for, recover

__all__ = [
    "DistillationTrainer",
    "MaskedLoraLinear",
    "PerformanceModel",
    "RankAdaptorConfig",
    "RankSearchResult",
    "RankSpace",
    "RecoveryArguments",
    "RecoveryResult",
    "RecoveryRun",
    "ShortRecoveryRun",
    "get_masked_peft_model",
    "layer_sparsity",
    "layer_statistics",
    "load_masked_adapter",
    "lora_config_for",
    "lora_parameter_count",
    "lora_target_modules",
    "merge_masked_lora",
    "plot_ranks",
    "rank_patterns",
    "rank_space_for",
    "recover",
    "search_ranks",
]
