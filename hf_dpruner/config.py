"""`DPrunerConfig`: the recipe of a D-Pruner run, stored as ``pruning_config.json`` in every pruned checkpoint."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

PRUNING_CONFIG_NAME = "pruning_config.json"

GENERAL_ESTIMATORS = ("obs", "fisher")
DOMAIN_PASSES = ("finetune", "score")
DOMAIN_SCORES = ("taylor", "taylor_plus")
MASK_TARGETS = ("original", "tuned")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")
SPARSITY_TYPES = ("unstructured", "row", "N:M (e.g. 2:4, 4:8)")

# Keys that `save_pretrained` adds beside the recipe; `from_pretrained` reads them back into `record`.
RECORD_KEYS = ("method", "hf_dpruner_version", "base_model", "calibration", "achieved_sparsity", "recovery")


def parse_n_m(sparsity_type: str) -> tuple[int, int] | None:
    """Return ``(N, M)`` for an ``"N:M"`` sparsity type, ``None`` for the other types."""
    match = _NM_PATTERN.match(sparsity_type)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass
class DPrunerConfig:
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
            "matrices use `sparsity`."
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

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        self.sparsity = float(self.sparsity)
        n_m = parse_n_m(self.sparsity_type)
        if n_m is not None:
            n, m = n_m
            if not 0 < n < m:
                raise ValueError(f"sparsity_type {self.sparsity_type!r} needs 0 < N < M (e.g. '2:4', '4:8').")
        elif self.sparsity_type not in ("unstructured", "row"):
            raise ValueError(f"sparsity_type must be one of {', '.join(SPARSITY_TYPES)}; got {self.sparsity_type!r}.")
        if isinstance(self.layer_sparsity, str):
            try:
                self.layer_sparsity = json.loads(self.layer_sparsity)
            except json.JSONDecodeError as err:
                raise ValueError(f"layer_sparsity must be a JSON object such as '{{\"down_proj\": 0.3}}': {err}.") from err
        if self.layer_sparsity is not None:
            if not isinstance(self.layer_sparsity, dict):
                raise TypeError(f"layer_sparsity must be a dict of regex -> ratio, got {type(self.layer_sparsity)}.")
            for pattern, ratio in self.layer_sparsity.items():
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"layer_sparsity key {pattern!r} is not a valid regex: {err}.") from err
                if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
                    raise ValueError(f"layer_sparsity[{pattern!r}] must be in [0, 1), got {ratio!r}.")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not self.target_modules:
                raise ValueError("target_modules is empty; leave it None to prune every Linear of the blocks.")
        for name in ("num_samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self._check_choice("general_estimator", GENERAL_ESTIMATORS)
        self._check_choice("domain_pass", DOMAIN_PASSES)
        self._check_choice("domain_score", DOMAIN_SCORES)
        self._check_choice("apply_masks_to", MASK_TARGETS)
        if self.damping <= 0:
            raise ValueError(f"damping must be > 0, got {self.damping!r}.")
        if self.regularization_lambda < 0:
            raise ValueError(f"regularization_lambda must be >= 0, got {self.regularization_lambda!r}.")

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
        for pattern, ratio in (self.layer_sparsity or {}).items():
            if re.search(pattern, param_name):
                return float(ratio)
        return self.sparsity

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-serializable dict."""
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike, **record: Any) -> Path:
        """Write ``pruning_config.json``: the recipe plus record keys (method, versions, achieved sparsity, ...)."""
        unknown = set(record) - set(RECORD_KEYS)
        if unknown:
            raise ValueError(f"Unknown record keys {sorted(unknown)}; valid: {RECORD_KEYS}.")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / PRUNING_CONFIG_NAME
        out.write_text(json.dumps({**self.to_dict(), **record}, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DPrunerConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - set(RECORD_KEYS)
        if unknown:
            raise ValueError(f"Unknown DPrunerConfig keys {sorted(unknown)}; valid: {sorted(names)}.")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "DPrunerConfig":
        """Read the recipe from a checkpoint folder or a ``pruning_config.json`` file."""
        return cls.from_dict(read_pruning_record(path))


def read_pruning_record(path: str | os.PathLike) -> dict[str, Any]:
    """The full ``pruning_config.json`` (recipe and record) of a folder or file, with clear errors."""
    path = Path(path)
    file = path / PRUNING_CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No {PRUNING_CONFIG_NAME} at {file}; is this a folder saved by hf_dpruner?")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the file is corrupt, re-save the checkpoint.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}.")
    return data
