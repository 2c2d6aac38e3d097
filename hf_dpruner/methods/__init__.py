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

# the built-in methods register themselves on import, in this order (the CLI's and the benchmark's order)
from . import dpruner, magnitude, wanda, sparsegpt  # noqa: E402,F401  isort: skip

__all__ = [
    "CALIBRATION_CHOICES",
    "BlockwiseMethod",
    "PruningMethod",
    "get_method",
    "method_card_entry",
    "method_names",
    "prune_model",
    "register_method",
    "unregister_method",
]
