"""Importance scorers: one file each, all returning ``{parameter name: fp32 score tensor}`` (higher = keep)."""

from .base import ImportanceScorer, load_importance, save_importance
from .domain import DomainImportance
from .general import FisherImportance, OBSImportance, general_scorer
from .magnitude import MagnitudeImportance

__all__ = [
    "DomainImportance",
    "FisherImportance",
    "ImportanceScorer",
    "MagnitudeImportance",
    "OBSImportance",
    "general_scorer",
    "load_importance",
    "save_importance",
]
