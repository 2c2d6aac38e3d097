"""`DPrunerConfig`: the recipe of a D-Pruner run, stored as ``pruning_config.json`` in every pruned checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .config_base import RecipeConfig

PRUNING_CONFIG_NAME = "pruning_config.json"

GENERAL_ESTIMATORS = ("obs", "fisher")
DOMAIN_PASSES = ("finetune", "score")
DOMAIN_SCORES = ("taylor", "taylor_plus")
MASK_TARGETS = ("original", "tuned")
IMPORTANCE_DTYPES = ("float32", "bfloat16")
RECONSTRUCTION_PRECISIONS = ("auto", "float32", "bfloat16")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")
SPARSITY_TYPES = ("unstructured", "row", "N:M (e.g. 2:4, 4:8)")

# Keys that `save_pretrained` adds beside the recipe; `from_pretrained` reads them back into `record`.
RECORD_KEYS = (
    "method", "hf_dpruner_version", "base_model", "calibration", "achieved_sparsity", "recovery", "masks_sha256"
)
# JSON types of the record keys (null is accepted for each but the checksum).
_RECORD_TYPES: dict[str, type] = {
    "method": str,
    "hf_dpruner_version": str,
    "base_model": str,
    "calibration": dict,
    "achieved_sparsity": dict,
    "recovery": dict,
    "masks_sha256": str,
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def parse_n_m(sparsity_type: str) -> tuple[int, int] | None:
    """Return ``(N, M)`` for an ``"N:M"`` sparsity type, ``None`` for the other types."""
    match = _NM_PATTERN.match(sparsity_type)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _is_number(value: Any) -> bool:
    """True for int and float values, False for bools (``True`` is an int in Python, not a ratio)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_ratio(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def check_record(data: Mapping[str, Any]) -> None:
    """Raise TypeError/ValueError if a record key of a ``pruning_config.json`` content has the wrong type."""
    for key, expected in _RECORD_TYPES.items():
        if key not in data or (data[key] is None and key != "masks_sha256"):
            continue
        if not isinstance(data[key], expected):
            raise TypeError(f"Record key {key!r} must be a JSON {expected.__name__}, got {data[key]!r}.")
    if "masks_sha256" in data and not _SHA256.match(data["masks_sha256"]):
        raise ValueError(f"masks_sha256 must be 64 lowercase hex digits, got {data['masks_sha256']!r}.")


@dataclass
class DPrunerConfig(RecipeConfig):
    """Configuration of D-Pruner (Zhang et al. 2024): general importance, regularized domain pass, masks."""

    sparsity: float = field(
        default=0.5, metadata={"help": "Fraction of the weights of each target matrix set to zero, in [0, 1)."}
    )
    sparsity_type: str = field(
        default="unstructured",
        metadata={
            "help": "'unstructured' (one threshold per matrix, as in the paper), 'row' (same ratio in every output "
            "row) or 'N:M' such as '2:4' (keep N of every M consecutive input weights; overrides `sparsity`)."
        },
    )
    layer_sparsity: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "Per-module sparsity overrides: regex (matched with re.search against the parameter name) -> "
            "ratio, like peft's rank_pattern (a JSON string on the command line). First match wins; unmatched "
            "matrices use `sparsity`. 'owl': a ratio per decoder block from its outlier ratio (OWL, Yin et al. "
            "2024), measured on the calibration text before pruning and saved as such a dict."
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names (suffixes) of the Linear/Conv1D modules of the decoder blocks to prune, e.g. "
            "['q_proj', 'v_proj']. Default: every Linear/Conv1D inside the decoder blocks."
        },
    )
    num_samples: int = field(
        default=32, metadata={"help": "Calibration windows drawn from each of the general and the domain data."}
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per calibration window."})
    general_estimator: str = field(
        default="obs",
        metadata={
            "help": "General importance estimator: 'obs' (SparseGPT/OBS saliency W^2 / diag(chol(H^-1))^2, layer by "
            "layer) or 'fisher' (1/2 * mean(g^2) * W^2 from LM-loss gradients)."
        },
    )
    damping: float = field(
        default=0.01, metadata={"help": "OBS Hessian damping, as a fraction of the mean Hessian diagonal."}
    )
    regularization_lambda: float = field(
        default=0.1, metadata={"help": "Weight lambda of the regularizer lambda * sum(G * (W - W0)^2); 0 disables it."}
    )
    clamp_general_importance: bool = field(
        default=True,
        metadata={
            "help": "In the 'finetune' pass, clamp G at 1 / (2 * lambda * learning_rate), the largest value for "
            "which an SGD step on the penalty does not overshoot W0 (without it heavy-tailed OBS scores make the "
            "domain pass diverge)."
        },
    )
    domain_pass: str = field(
        default="finetune",
        metadata={
            "help": "'finetune': the domain pass trains the weights with the regularized loss (the paper) and "
            "accumulates importance at every optimizer step; 'score': weights stay fixed, and the regularizer acts "
            "through the look-ahead W - W0 = -lr * g."
        },
    )
    domain_score: str = field(
        default="taylor",
        metadata={
            "help": "Domain importance: 'taylor' = |g*W - 1/2 (g*W)^2| (second-order Taylor of setting W to 0) or "
            "'taylor_plus' = |g*W + 1/2 (g*W)^2| (the sign of the authors' code)."
        },
    )
    apply_masks_to: str = field(
        default="original",
        metadata={
            "help": "'original': masks are applied to the pretrained weights and the domain-tuned weights are "
            "discarded (the paper); 'tuned': keep the weights of the domain pass."
        },
    )

    owl_threshold: float = field(
        default=5.0, metadata={"help": "OWL: a weight is an outlier when its Wanda score exceeds this times the mean."}
    )
    owl_lambda: float = field(
        default=0.08, metadata={"help": "OWL: block sparsities range over sparsity +- this value."}
    )
    general_weight: float | None = field(
        default=None,
        metadata={
            "help": "Share of the general text, in [0, 1], in the calibration Hessian and the reconstruction loss of "
            "the methods that blend domain and general text ('cross-calibration', 'dpruner-recon'); each text's "
            "part is normalised by its token count. None: the method's own default."
        },
    )
    reconstruction_epochs: int = field(
        default=2,
        metadata={
            "help": "'dpruner-recon': passes over the calibration windows that train each pruned block's kept "
            "weights to reproduce the dense block's outputs (masks fixed); 0 skips the block reconstruction."
        },
    )
    reconstruction_lr: float = field(
        default=1e-3, metadata={"help": "'dpruner-recon': Adam learning rate of the block reconstruction."}
    )
    reconstruction_batch_size: int = field(
        default=2, metadata={"help": "'dpruner-recon': calibration windows per block-reconstruction step."}
    )
    reconstruction_precision: str = field(
        default="auto",
        metadata={
            "help": "'dpruner-recon': compute precision of the block reconstruction: its training passes, its "
            "dense targets and the pruned block's outputs that feed the next block. 'bfloat16' autocasts them (the "
            "weights, their Adam state, the loss, the Hessian statistics and the OBS update stay float32); "
            "'float32' does not; 'auto' takes bfloat16 where the hardware multiplies it natively (CUDA with "
            "bfloat16, CPUs with AVX512-BF16 or AMX), float32 elsewhere."
        },
    )

    importance_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the importance buffers G and S: 'float32', or 'bfloat16' to halve their memory (S is "
            "then accumulated with stochastic rounding, so long passes do not stall). float16 is not offered: OBS "
            "saliencies overflow its range and Taylor terms underflow it."
        },
    )
    offload_importance: bool = field(
        default=False,
        metadata={
            "help": "Keep G, S and the regularizer's W0 in CPU memory and move them to the weight's device one "
            "matrix at a time (for models on an accelerator; a no-op on CPU)."
        },
    )

    def __post_init__(self) -> None:
        if not _is_ratio(self.sparsity):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        self.sparsity = float(self.sparsity)
        if not isinstance(self.sparsity_type, str):
            raise TypeError(f"sparsity_type must be a string ({', '.join(SPARSITY_TYPES)}), got {self.sparsity_type!r}")
        n_m = parse_n_m(self.sparsity_type)
        if n_m is not None:
            n, m = n_m
            if not 0 < n < m:
                raise ValueError(f"sparsity_type {self.sparsity_type!r} needs 0 < N < M (e.g. '2:4', '4:8').")
        elif self.sparsity_type not in ("unstructured", "row"):
            raise ValueError(f"sparsity_type must be one of {', '.join(SPARSITY_TYPES)}; got {self.sparsity_type!r}.")
        if self.layer_sparsity == "owl" and n_m is not None:
            raise ValueError("layer_sparsity='owl' sets a ratio per block; N:M sparsity has a fixed ratio.")
        if isinstance(self.layer_sparsity, str) and self.layer_sparsity != "owl":
            try:
                self.layer_sparsity = json.loads(self.layer_sparsity)
            except json.JSONDecodeError as err:
                example = '{"down_proj": 0.3}'
                raise ValueError(f"layer_sparsity must be a JSON object such as '{example}': {err}.") from err
        if self.layer_sparsity is not None and self.layer_sparsity != "owl":
            if not isinstance(self.layer_sparsity, dict):
                raise TypeError(f"layer_sparsity must be a dict of regex -> ratio, got {type(self.layer_sparsity)}.")
            for pattern, ratio in self.layer_sparsity.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"layer_sparsity keys must be regex strings, got {pattern!r}.")
                try:
                    re.compile(pattern)
                except (re.error, OverflowError, RecursionError) as err:
                    raise ValueError(f"layer_sparsity key {pattern!r} is not a valid regex: {err}.") from err
                if not _is_ratio(ratio):
                    raise ValueError(f"layer_sparsity[{pattern!r}] must be in [0, 1), got {ratio!r}.")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not isinstance(self.target_modules, (list, tuple)) or not all(
                isinstance(name, str) and name for name in self.target_modules
            ):
                raise TypeError(f"target_modules must be a list of module names, got {self.target_modules!r}.")
            if not self.target_modules:
                raise ValueError("target_modules is empty; leave it None to prune every Linear of the blocks.")
            self.target_modules = list(self.target_modules)
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.general_weight is not None and not (_is_number(self.general_weight) and 0 <= self.general_weight <= 1):
            raise ValueError(f"general_weight must be in [0, 1] (or None for the method's default), got "
                             f"{self.general_weight!r}.")
        for name in ("reconstruction_epochs",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if not isinstance(self.reconstruction_batch_size, int) or isinstance(self.reconstruction_batch_size, bool) \
                or self.reconstruction_batch_size < 1:
            raise ValueError(f"reconstruction_batch_size must be a positive integer, got "
                             f"{self.reconstruction_batch_size!r}.")
        if not _is_number(self.owl_threshold) or not (0 < self.owl_threshold < math.inf):
            raise ValueError(f"owl_threshold must be > 0, got {self.owl_threshold!r}.")
        if not _is_number(self.owl_lambda) or not (0 <= self.owl_lambda < 1):
            raise ValueError(f"owl_lambda must be in [0, 1), got {self.owl_lambda!r}.")
        if not _is_number(self.reconstruction_lr) or not (0 < self.reconstruction_lr < math.inf):
            raise ValueError(f"reconstruction_lr must be > 0, got {self.reconstruction_lr!r}.")
        for name in ("clamp_general_importance", "offload_importance"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        self._check_choice("general_estimator", GENERAL_ESTIMATORS)
        self._check_choice("domain_pass", DOMAIN_PASSES)
        self._check_choice("domain_score", DOMAIN_SCORES)
        self._check_choice("apply_masks_to", MASK_TARGETS)
        if self.importance_dtype == "float16":
            raise ValueError(
                "importance_dtype 'float16' is not supported: OBS saliencies exceed its range (65504) and Taylor "
                "terms fall below its resolution. Use 'bfloat16' to halve the importance memory."
            )
        self._check_choice("importance_dtype", IMPORTANCE_DTYPES)
        self._check_choice("reconstruction_precision", RECONSTRUCTION_PRECISIONS)
        if not _is_number(self.damping) or not (0 < self.damping < math.inf):
            raise ValueError(f"damping must be > 0, got {self.damping!r}; give a finite number.")
        if not _is_number(self.regularization_lambda) or not (0 <= self.regularization_lambda < math.inf):
            raise ValueError(
                f"regularization_lambda must be >= 0, got {self.regularization_lambda!r}; give a finite number."
            )

    def _check_choice(self, name: str, valid: tuple[str, ...]) -> None:
        if getattr(self, name) not in valid:
            raise ValueError(f"{name} must be one of {valid}, got {getattr(self, name)!r}.")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` for N:M sparsity, else ``None``."""
        return parse_n_m(self.sparsity_type)

    def sparsity_for(self, param_name: str) -> float:
        """Target sparsity of one parameter, after `layer_sparsity` overrides."""
        if self.n_m is not None:
            n, m = self.n_m
            return 1.0 - n / m
        if self.layer_sparsity == "owl":
            raise ValueError("layer_sparsity='owl' is resolved into per-block ratios by prune_model(); call "
                             "hf_dpruner.layer_ratios.owl_layer_sparsity to resolve it yourself.")
        for pattern, ratio in (self.layer_sparsity or {}).items():
            if re.search(pattern, param_name):
                return float(ratio)
        return self.sparsity

    config_name: ClassVar[str] = PRUNING_CONFIG_NAME
    record_keys: ClassVar[tuple[str, ...]] = RECORD_KEYS

    @classmethod
    def check_record(cls, data: Mapping[str, Any]) -> None:
        check_record(data)


def config_from_record(data: Mapping[str, Any], source: str | os.PathLike) -> DPrunerConfig | None:
    """The DPrunerConfig of a ``pruning_config.json`` content read from `source`, ``None`` for a record without a
    recipe (no ``sparsity`` key); invalid content raises an error that names `source`."""
    try:
        if "sparsity" in data:
            return DPrunerConfig.from_dict(data)
        check_record(data)
        return None
    except (TypeError, ValueError) as err:
        raise DPrunerConfig.invalid_file(err, source) from err


def pruning_config_file(path: str | os.PathLike) -> Path:
    """``pruning_config.json`` inside a folder, or `path` itself when it is not a folder."""
    return DPrunerConfig.config_file(path)


def read_pruning_record(path: str | os.PathLike) -> dict[str, Any]:
    """The full ``pruning_config.json`` (recipe and record) of a folder or file, with clear errors."""
    return DPrunerConfig.read_record(path)


def recorded_source(value: Any, folder: str | os.PathLike, key: str, flag: str) -> str | None:
    """A model or data reference that a checkpoint's own JSON names (`key`), safe to follow without asking.

    Names (a bundled corpus, a Hub or `datasets` id) pass through, and so do local paths inside the checkpoint
    `folder`. A local path elsewhere (absolute, with ``..``, or existing relative to the working directory) is
    refused: a downloaded checkpoint must not make us read arbitrary files. The user can name it with `flag`."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key} in {folder} must be a non-empty string, got {value!r}.")
    path = Path(value)
    if not (path.is_absolute() or ".." in path.parts or path.exists()):
        return value
    root = Path(folder).resolve()
    resolved = path.resolve()
    if resolved == root or root in resolved.parents:
        return str(resolved)
    raise ValueError(
        f"The checkpoint {folder} names {key} {value!r}, a local path outside its folder; files outside a "
        f"checkpoint are read only when you name them yourself: pass {flag} {value} to use it."
    )
