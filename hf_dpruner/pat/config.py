"""`PATConfig`: the recipe of a Pruning-Aware Tuning run, stored as ``pat_config.json`` beside the export."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config_base import RecipeConfig

PAT_CONFIG_NAME = "pat_config.json"
# Keys that `save_pretrained` adds beside the recipe (what the run produced).
PAT_RECORD_KEYS = ("method", "hf_dpruner_version", "base_model", "training", "export")
MASK_INITS = ("zeros", "activation", "taylor")
AXES = ("hidden", "neurons")
STRATEGIES = ("learned", "one-shot")


@dataclass
class PATConfig(RecipeConfig):
    """Configuration of a structured pruning run with `PATTrainer`; the export is a standard, smaller checkpoint.

    The default is the best structured recipe measured (docs/pat.md): ``axis="neurons", strategy="one-shot"``
    removes ``pruning_ratio`` of every MLP's neurons with OBS, trains each pruned block to reproduce the dense one,
    then tunes LoRA for the Trainer's steps (export: a smaller ``intermediate_size``). ``strategy="learned"`` is PAT
    (Liu et al. 2024): a channel mask learned while LoRA tunes; with ``axis="hidden"`` as in the paper (HSMs on the
    residual stream, one shared mask, Identity Loss; export: a smaller ``hidden_size``), or one mask per layer on the
    MLP neurons.

    Example:
        >>> PATConfig(pruning_ratio=0.4).strategy  # the one-shot recipe on MLP neurons
        'one-shot'
        >>> paper = PATConfig(axis="hidden", strategy="learned", mask_init="zeros")  # PAT as published
    """

    pruning_ratio: float = field(
        default=0.25,
        metadata={"help": "Fraction of the hidden channels (axis 'hidden') or of each MLP's neurons (axis 'neurons') "
                  "removed, in (0, 1). Axis 'hidden' keeps the nearest multiple of num_attention_heads (transformers "
                  "requires hidden_size to be one)."},
    )
    axis: str = field(
        default="neurons",
        metadata={
            "help": "What is removed: 'neurons' (MLP neurons; export with a smaller intermediate_size; with strategy "
            "'learned' one mask per layer on the input of down_proj, no HSMs) or 'hidden' (the paper, strategy "
            "'learned' only: hidden channels of the residual stream, one mask shared by HSMs after every block; "
            "export with a smaller hidden_size)."
        },
    )
    strategy: str = field(
        default="one-shot",
        metadata={
            "help": "'one-shot' (the default, axis 'neurons' only: greedy OBS removes each MLP's neurons on the "
            "first mask_init_samples windows and refits down_proj, every pruned block is trained to reproduce the "
            "dense block (reconstruction_*), then LoRA tunes the smaller model for the Trainer's steps; the best "
            "structured model measured, docs/pat.md) or 'learned' (PAT: the mask is learned while LoRA tunes; the "
            "mask_*, hsm_*, *_loss_weight and distill_* fields apply to it)."
        },
    )
    reconstruction_samples: int = field(
        default=160,
        metadata={"help": "strategy 'one-shot': training windows on which each pruned block learns to reproduce "
                  "the dense block."},
    )
    reconstruction_general_samples: int = field(
        default=96,
        metadata={"help": "strategy 'one-shot': windows of the bundled general corpus added to them (they keep "
                  "general quality; need the tokenizer as processing_class); 0: none."},
    )
    reconstruction_epochs: int = field(
        default=8, metadata={"help": "strategy 'one-shot': passes over the reconstruction windows per block."}
    )
    reconstruction_learning_rate: float = field(
        default=2e-3, metadata={"help": "strategy 'one-shot': Adam learning rate of the block reconstruction."}
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
    mask_init: str = field(
        default="activation",
        metadata={
            "help": "How the mask logits start: 'activation' (Minitron's activation importance at the RMSNorm "
            "outputs; with axis 'neurons' each neuron's output energy E[h^2] ||W_down[:, j]||^2; the best "
            "measured), 'taylor' (|dL/dgate| at the open gate; axis 'hidden' only), both measured on the first "
            "mask_init_samples training windows, or 'zeros' (the paper: every channel alike, chosen by the first "
            "gradient steps)."
        },
    )
    mask_init_samples: int = field(
        default=16, metadata={"help": "Training windows used to measure the channel importance of mask_init."}
    )
    mask_init_scale: float = field(
        default=1.0,
        metadata={"help": "Initial logits = mask_init_scale x the standardised log channel importance."},
    )
    mask_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the mask logits. Default: 10x the Trainer's learning rate."},
    )
    hsm_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the HSMs' transforms. Default: the Trainer's learning rate."},
    )
    active_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the channel-count loss |N_target - N_open| / hidden_size."},
    )
    identity_loss_weight: float = field(
        default=0.1,
        metadata={"help": "Weight of the Identity Loss sum ||A A^T - I||^2 over the HSM down projections."},
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight a of knowledge distillation from the dense model: loss = (1 - a) * LM loss + a * T^2 * "
            "KL(dense || PAT) per predicted token. The teacher is the same model with LoRA and the PAT modules "
            "switched off (no second copy of the weights; one more forward per batch). 0: the LM loss alone (the "
            "paper); 1: distillation alone."
        },
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature T of the distillation term."}
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
        if self.mask_init not in MASK_INITS:
            raise ValueError(f"mask_init must be one of {MASK_INITS}, got {self.mask_init!r}.")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
        for name in ("reconstruction_samples", "reconstruction_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not isinstance(self.reconstruction_general_samples, int) or self.reconstruction_general_samples < 0:
            raise ValueError("reconstruction_general_samples must be an integer >= 0, got "
                             f"{self.reconstruction_general_samples!r}.")
        if not self.reconstruction_learning_rate > 0:
            raise ValueError(f"reconstruction_learning_rate must be > 0, got {self.reconstruction_learning_rate!r}.")
        if self.axis == "neurons" and self.mask_init == "taylor":
            raise ValueError("mask_init='taylor' scores hidden channels; with axis='neurons' use 'activation' (the "
                             "neurons' output energy) or 'zeros'.")
        if not isinstance(self.mask_init_samples, int) or self.mask_init_samples < 1:
            raise ValueError(f"mask_init_samples must be a positive integer, got {self.mask_init_samples!r}.")
        if not self.mask_init_scale > 0:
            raise ValueError(f"mask_init_scale must be > 0, got {self.mask_init_scale!r}.")
        for name in ("mask_learning_rate", "hsm_learning_rate"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        for name in ("active_loss_weight", "identity_loss_weight", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight!r}.")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}.")
        if not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"lora_r must be an integer >= 0, got {self.lora_r!r}.")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; leave it None for every Linear of the blocks.")
        if self.strategy == "one-shot":
            if self.axis != "neurons":
                raise ValueError("strategy='one-shot' (the default) prunes MLP neurons: set strategy='learned' for "
                                 "PAT's learned mask on the hidden channels, or axis='neurons' (one-shot removal of "
                                 "hidden channels is `width_prune`).")
            if self.lora_r < 1:
                raise ValueError("strategy='one-shot' (the default) tunes the pruned model with LoRA: set lora_r >= 1 "
                                 "(to prune and reconstruct without tuning, use `prune_and_reconstruct`), or "
                                 "strategy='learned' for PAT without LoRA.")
            if self.distill_weight > 0:
                raise ValueError("strategy='one-shot' (the default) does not distil during tuning (the dense model "
                                 "is gone by then; reconstruction already trains toward it): set distill_weight=0, "
                                 "or strategy='learned' to distil while PAT learns its mask.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PATConfig:
        """The config of a recipe dict. A saved record (it has ``method``) written before ``axis`` and ``strategy``
        existed ran PAT on the hidden channels: it reads back as such, not as today's default."""
        if isinstance(data, Mapping) and "method" in data:
            data = {"axis": "hidden", "strategy": "learned", **data}
        return super().from_dict(data)

    def kept_channels(self, hidden_size: int, multiple_of: int = 1) -> int:
        """Channels left after pruning: ``(1 - pruning_ratio) * hidden_size`` rounded to the nearest multiple of
        `multiple_of` (transformers requires ``hidden_size`` to be a multiple of ``num_attention_heads``), at least
        `multiple_of`, at most `hidden_size`."""
        kept = multiple_of * round((1.0 - self.pruning_ratio) * hidden_size / multiple_of)
        return max(multiple_of, min(hidden_size, kept))

    def rank_for(self, hidden_size: int) -> int:
        return self.hsm_rank if self.hsm_rank is not None else max(1, round(0.05 * hidden_size))

    config_name: ClassVar[str] = PAT_CONFIG_NAME
    record_keys: ClassVar[tuple[str, ...]] = PAT_RECORD_KEYS
    missing_hint: ClassVar[str] = "is this a folder exported by hf_dpruner's PAT?"
    remedy: ClassVar[str] = "export again"
    invalid_remedy: ClassVar[str] = "export again"


def read_pat_record(path: str | os.PathLike) -> dict[str, Any]:
    """The full ``pat_config.json`` (recipe and record) of a folder or file, with clear errors."""
    return PATConfig.read_record(path)
