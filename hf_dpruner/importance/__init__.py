"""Importance scorers: one file each, all returning ``{parameter name: fp32 score tensor}`` (higher = keep)."""

from .base import (
    ImportanceScorer,
    importance_description,
    importance_fingerprint,
    load_importance,
    save_importance,
)
from .domain import DomainImportance
from .general import FisherImportance, OBSImportance, general_scorer
from .magnitude import MagnitudeImportance
from .sparsegpt import inverse_hessian_cholesky, sparsegpt_prune
from .wanda import wanda_scores

__all__ = [
    "DomainImportance",
    "FisherImportance",
    "ImportanceScorer",
    "MagnitudeImportance",
    "OBSImportance",
    "general_scorer",
    "importance_description",
    "importance_fingerprint",
    "inverse_hessian_cholesky",
    "load_importance",
    "save_importance",
    "sparsegpt_prune",
    "wanda_scores",
]
