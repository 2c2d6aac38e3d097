"""`PATConfig`: the recipe of a Pruning-Aware Tuning run, stored as ``pat_config.json`` beside the export."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..utils import read_json_object

PAT_CONFIG_NAME = "pat_config.json"
# Keys that `save_pretrained` adds beside the recipe (what the run produced).
PAT_RECORD_KEYS = ("method", "hf_dpruner_version", "base_model", "training", "export")


@dataclass
class PATConfig:
    """Configuration of PAT (Liu et al. 2024): HSMs on the residual stream, one shared trainable channel mask,
    Identity Loss, LoRA on the linear layers; exported as a model with a smaller ``hidden_size``."""

    pruning_ratio: float = field(
        default=0.25, metadata={"help": "Fraction of the hidden channels removed, in (0, 1)."}
    )
    hsm_rank: int | None = field(
        default=None,
        metadata={
            "help": "Rank of each HSM's low-rank transform. Default: 0.05 x hidden_size, rounded (the paper's setting)."
        },
    )
    mask_warmup_fraction: float = field(
        default=1 / 3,
        metadata={
            "help": "Fraction s0 of the training steps over which the mask anneals from all-open to binary; the "
            "mask is exactly 0/1 with the target channel count from then on (paper: 1/3)."
        },
    )
    mask_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the mask logits. Default: 10x the Trainer's learning rate."},
    )
    active_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the channel-count loss |N_target - N_open| / hidden_size."},
    )
    identity_loss_weight: float = field(
        default=0.1,
        metadata={"help": "Weight of the Identity Loss sum ||A A^T - I||^2 over the HSM down projections."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on the linear layers; 0 trains no LoRA."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get LoRA. Default: every Linear of the decoder blocks (peft 'all-linear')."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.pruning_ratio, (int, float)) or not 0.0 < float(self.pruning_ratio) < 1.0:
            raise ValueError(f"pruning_ratio must be a number in (0, 1), got {self.pruning_ratio!r}.")
        self.pruning_ratio = float(self.pruning_ratio)
        if self.hsm_rank is not None and (not isinstance(self.hsm_rank, int) or self.hsm_rank < 1):
            raise ValueError(f"hsm_rank must be a positive integer or None, got {self.hsm_rank!r}.")
        if not 0.0 < self.mask_warmup_fraction <= 1.0:
            raise ValueError(f"mask_warmup_fraction must be in (0, 1], got {self.mask_warmup_fraction!r}.")
        if self.mask_learning_rate is not None and self.mask_learning_rate <= 0:
            raise ValueError(f"mask_learning_rate must be > 0, got {self.mask_learning_rate!r}.")
        for name in ("active_loss_weight", "identity_loss_weight", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"lora_r must be an integer >= 0, got {self.lora_r!r}.")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; leave it None for every Linear of the blocks.")

    def kept_channels(self, hidden_size: int) -> int:
        """Hidden channels left after pruning: ``round((1 - pruning_ratio) * hidden_size)``, at least 1."""
        return max(1, min(hidden_size, round((1.0 - self.pruning_ratio) * hidden_size)))

    def rank_for(self, hidden_size: int) -> int:
        return self.hsm_rank if self.hsm_rank is not None else max(1, round(0.05 * hidden_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike, **record: Any) -> Path:
        """Write ``pat_config.json``: the recipe plus record keys (method, version, training, export)."""
        unknown = set(record) - set(PAT_RECORD_KEYS)
        if unknown:
            raise ValueError(f"Unknown record keys {sorted(unknown)}; valid: {PAT_RECORD_KEYS}.")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        out = path / PAT_CONFIG_NAME
        out.write_text(json.dumps({**self.to_dict(), **record}, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PATConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names - set(PAT_RECORD_KEYS)
        if unknown:
            raise ValueError(f"Unknown PATConfig keys {sorted(unknown)}; valid: {sorted(names)}.")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PATConfig":
        """Read the recipe from an exported folder or a ``pat_config.json`` file."""
        return cls.from_dict(read_pat_record(path))


def read_pat_record(path: str | os.PathLike) -> dict[str, Any]:
    """The full ``pat_config.json`` (recipe and record) of a folder or file, with clear errors."""
    path = Path(path)
    file = path / PAT_CONFIG_NAME if path.is_dir() else path
    return read_json_object(file, "is this a folder exported by hf_dpruner's PAT?", "export again")
