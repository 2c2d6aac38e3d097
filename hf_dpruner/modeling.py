"""`PrunedModelMixin` (masks that survive training and saving) and `AutoPrunedModelForCausalLM`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import cached_file

from . import __version__
from .config import PRUNING_CONFIG_NAME, DPrunerConfig, read_pruning_record
from .masks import MASKS_NAME, apply_masks, load_masks, save_masks, sparsity_report

# Files of a previous save that a new save must not carry over (they are rewritten or would be stale).
_REWRITTEN_PREFIXES = ("model", "pytorch_model", "pruning_", "config.json", "generation_config.json")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class PrunedModelMixin:
    """Mixed into a transformers model class by `make_pruned`: holds the keep-masks, zeroes the gradients of
    pruned weights (so any optimizer, weight decay included, leaves them at exactly 0) and writes
    ``pruning_masks.safetensors`` and ``pruning_config.json`` with every `save_pretrained`, atomically."""

    pruning_masks: dict[str, torch.Tensor]
    pruning_config: DPrunerConfig | None
    pruning_record: dict[str, Any]

    def apply_pruning_masks(self) -> None:
        """Set every pruned weight to exactly zero again."""
        apply_masks(self, self.pruning_masks)

    def pruning_sparsity(self) -> dict:
        """Achieved sparsity of the masks (overall, per module type, per matrix)."""
        return sparsity_report(self.pruning_masks)

    def check_pruned_weights(self) -> None:
        """Raise ValueError if a weight that the masks prune is not exactly zero."""
        params = dict(self.named_parameters())
        for name, keep in self.pruning_masks.items():
            revived = int((params[name].detach()[~keep.to(params[name].device)] != 0).sum())
            if revived:
                raise ValueError(
                    f"{revived} weights of {name} that the pruning mask removes are non-zero; the weights and the "
                    "masks disagree. Call `model.apply_pruning_masks()` to re-apply the masks."
                )

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False, **kwargs
    ) -> None:
        """Save the standard checkpoint plus masks and pruning config; a failed save leaves no partial folder."""
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"Cannot save to {target}: it is a file. Choose a folder path for the checkpoint.")
        if not is_main_process:
            return
        self.check_pruned_weights()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            super().save_pretrained(tmp, is_main_process=True, **kwargs)
            save_masks(self.pruning_masks, tmp / MASKS_NAME)
            config = self.pruning_config or DPrunerConfig()
            record = {**self.pruning_record, "hf_dpruner_version": __version__, "achieved_sparsity": self._summary()}
            config.save_pretrained(tmp, **record)
            _replace_folder(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if push_to_hub:
            self.push_to_hub(kwargs.get("repo_id") or target.name, token=kwargs.get("token"))

    def _summary(self) -> dict:
        report = self.pruning_sparsity()
        return {k: report[k] for k in ("overall", "num_pruned", "num_targeted", "per_module_type", "per_matrix")}


def _replace_folder(new: Path, target: Path) -> None:
    """Move the finished `new` folder to `target`, keeping unrelated files a user had there (e.g. a tokenizer)."""
    if target.is_dir():
        for item in target.iterdir():
            if (new / item.name).exists() or item.name.startswith(_REWRITTEN_PREFIXES) or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, new / item.name)
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        os.replace(new, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(new, target)


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    """``base`` with `PrunedModelMixin` first; keeps the name so ``config.architectures`` stays standard."""
    if issubclass(base, PrunedModelMixin):
        return base
    if base not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[base] = type(base.__name__, (PrunedModelMixin, base), {"__qualname__": base.__qualname__})
    return _PRUNED_CLASSES[base]


def _zero_pruned_gradients(param: torch.nn.Parameter, keep: torch.Tensor):
    requires_grad = param.requires_grad
    param.requires_grad_(True)  # hooks can only be registered on tensors that require grad
    handle = param.register_hook(lambda grad: grad * keep.to(grad.dtype))
    param.requires_grad_(requires_grad)
    return handle


def make_pruned(
    model: PreTrainedModel,
    masks: Mapping[str, torch.Tensor],
    config: DPrunerConfig | None = None,
    record: Mapping[str, Any] | None = None,
    apply: bool = False,
) -> PreTrainedModel:
    """Turn `model` (in place) into a pruned model that keeps `masks`; returns it.

    The masks must name parameters of the model with their exact shapes. With ``apply=False`` the weights must
    already be zero wherever a mask prunes (e.g. a loaded checkpoint), otherwise ValueError.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(
            f"The masks name {len(unknown)} parameters that {type(model).__name__} does not have, e.g. "
            f"{unknown[0]!r}: the mask file belongs to another model."
        )
    for name, keep in masks.items():
        if tuple(keep.shape) != tuple(params[name].shape):
            raise ValueError(
                f"The mask of {name} has shape {tuple(keep.shape)} but the weight has {tuple(params[name].shape)}: "
                "the mask file belongs to another model."
            )
    for handle in getattr(model, "_pruning_hook_handles", []):
        handle.remove()
    model.__class__ = _pruned_class(type(model))
    model.pruning_masks = {name: keep.to(device=params[name].device, dtype=torch.bool) for name, keep in masks.items()}
    model.pruning_config = config
    model.pruning_record = dict(record or {})
    if apply:
        model.apply_pruning_masks()
    model.check_pruned_weights()
    model._pruning_hook_handles = [
        _zero_pruned_gradients(params[name], keep) for name, keep in model.pruning_masks.items()
    ]
    return model


class AutoPrunedModelForCausalLM:
    """Loads a checkpoint saved by hf_dpruner (local folder or Hub repo id) with its masks re-attached."""

    def __init__(self, *args, **kwargs) -> None:
        raise OSError("Use AutoPrunedModelForCausalLM.from_pretrained(...).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> PreTrainedModel:
        """Like `AutoModelForCausalLM.from_pretrained`, then reads and checks the masks and pruning config."""
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        found = {}
        for name in (MASKS_NAME, PRUNING_CONFIG_NAME):
            found[name] = cached_file(
                pretrained_model_name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
            )
        if found[MASKS_NAME] is None:
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} has no {MASKS_NAME}: it was not saved by hf_dpruner. Load it with "
                "AutoModelForCausalLM, or prune it first."
            )
        masks = load_masks(found[MASKS_NAME])
        record: dict[str, Any] = {}
        config = None
        if found[PRUNING_CONFIG_NAME] is not None:
            data = read_pruning_record(found[PRUNING_CONFIG_NAME])
            config = DPrunerConfig.from_dict(data)
            record = {k: data[k] for k in ("method", "base_model", "calibration") if k in data}
        return make_pruned(model, masks, config, record)
