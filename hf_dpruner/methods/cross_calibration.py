"""Cross-calibration (Williams et al. 2025): SparseGPT whose Hessian blends a domain and a general part.

The weight of the general part is `DPrunerConfig.general_weight`, by default 0.5: equal shares of the two texts,
each normalised by its token count (the same Hessian as SparseGPT calibrated on equal numbers of domain and general
windows). The paper's own default weighting could not be checked here; set ``general_weight`` to match it."""

from __future__ import annotations

from .base import register_method
from .dual_blockwise import DualBlockwiseMethod


@register_method
class CrossCalibration(DualBlockwiseMethod):
    name = "cross-calibration"
    title = "Cross-calibration"
    description = ("Cross-calibration prunes one decoder block at a time with SparseGPT on a Hessian that blends the "
                   "domain calibration text with general text, keeping the weights that matter for both; "
                   "training-free.")
    citation = ("Miles Williams, George Chrysostomou, Vitor Jeronymo, Nikolaos Aletras. *Compressing Language Models "
                "for Specialized Domains*. EACL 2026. arXiv:2502.18424.")
    default_general_weight = 0.5
    reconstruct = False
