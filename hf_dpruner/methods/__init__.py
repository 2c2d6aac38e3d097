"""Pruning methods: the registry (`PruningMethod`, `register_method`), `prune_model`, and one file per method."""

from .base import (
    CALIBRATION_CHOICES,
    PruningMethod,
    get_method,
    method_card_entry,
    method_names,
    prune_model,
    register_method,
    unregister_method,
)
from .blockwise import BlockwiseMethod
from .dual_blockwise import DualBlockwiseMethod

# the built-in methods register themselves on import, in this order (the CLI's and the benchmark's order)
from . import dpruner, magnitude, wanda, sparsegpt, cross_calibration, dpruner_recon  # noqa: E402,F401  isort: skip

__all__ = [
    "CALIBRATION_CHOICES",
    "BlockwiseMethod",
    "DualBlockwiseMethod",
    "PruningMethod",
    "get_method",
    "method_card_entry",
    "method_names",
    "prune_model",
    "register_method",
    "unregister_method",
]
