"""`PrunedModelMixin` (masks that survive training and saving) and `AutoPrunedModelForCausalLM`."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PreTrainedModel

from .config import PRUNING_CONFIG_NAME, DPrunerConfig, config_from_record, read_pruning_record
from .hub import local_checkpoint, push_folder_to_hub
from .masks import (
    MASKS_NAME,
    apply_masks,
    load_masks,
    save_masks,
    sparsity_report,
    verify_masks_checksum,
)
from .model_card import CARD_NAME, EVAL_RESULTS_NAME, write_model_card
from .utils import file_sha256, replacing_folder
from .version import __version__

# Files of a previous save that would be stale beside the new ones: weights of another sharding or format,
# evaluation results of the previous weights, and the training arguments that transformers' Trainer pickles.
_STALE_FILES = re.compile(
    rf"^((model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?|{re.escape(EVAL_RESULTS_NAME)}"
    r"|training_args\.bin)$"
)
MASK_BUFFER = "pruning_keep_mask"
TRAINING_ARGS_JSON = "training_args.json"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def is_stale_checkpoint_file(name: str) -> bool:
    """Whether a file `name` of a folder being saved over belongs to the previous save and would contradict the new
    one (it is then not carried into the new folder)."""
    return bool(_STALE_FILES.match(name))


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
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        overwrite_card: bool = False,
        *,
        tokenizer=None,
        training_args=None,
        **kwargs,
    ) -> None:
        """Save the standard checkpoint plus masks, pruning config and model card (``README.md``), and `tokenizer`
        when given, in one atomic replacement of the folder (`replacing_folder`): a failed or interrupted save leaves
        the folder as it was, and files of the folder that the save does not write (``.git``, a README of yours,
        tokenizer files) are kept. `training_args` (a `TrainingArguments`) is written as ``training_args.json``.
        Only safetensors, JSON and text are written. A README that hf_dpruner did not write is kept unless
        `overwrite_card`.
        ``push_to_hub=True`` then uploads the folder (``repo_id=`` defaults to its name)."""
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"Cannot save to {target}: it is a file. Choose a folder path for the checkpoint.")
        if not is_main_process:
            return
        self.check_pruned_weights()
        if kwargs.get("safe_serialization") is False:
            raise ValueError("safe_serialization=False would write a pickle: hf_dpruner saves safetensors only.")
        with replacing_folder(target, stale=is_stale_checkpoint_file) as tmp:
            super().save_pretrained(tmp, is_main_process=True, **kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if training_args is not None:
                (tmp / TRAINING_ARGS_JSON).write_text(training_args.to_json_string(), encoding="utf-8")
            save_masks(self.pruning_masks, tmp / MASKS_NAME)
            record = {
                **self.pruning_record,
                "hf_dpruner_version": __version__,
                "achieved_sparsity": self._summary(),
                "masks_sha256": file_sha256(tmp / MASKS_NAME),  # the folder is swapped in whole: the bytes stay
            }
            write_pruning_config(tmp, self.pruning_config, record)
            write_model_card(tmp, overwrite_card, existing=target / CARD_NAME, model_name=target.resolve().name)
        if push_to_hub:
            hub_kwargs = {k: kwargs[k] for k in ("private", "revision", "commit_message", "token") if k in kwargs}
            push_folder_to_hub(target, kwargs.get("repo_id") or target.name, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tokenizer=None,
        **save_kwargs,
    ) -> CommitInfo:
        """Upload the model with its masks, pruning config and model card in one commit (the card is ours, not
        transformers' generic one). Pass `tokenizer` to upload it in the same commit. Other keyword arguments go to
        `save_pretrained` (e.g. ``max_shard_size``, ``safe_serialization``)."""
        for unsupported in ("use_temp_dir", "tags"):
            save_kwargs.pop(unsupported, None)
        with tempfile.TemporaryDirectory(prefix="hf_dpruner-push-") as tmp:
            folder = Path(tmp) / repo_id.split("/")[-1]
            self.save_pretrained(folder, tokenizer=tokenizer, **save_kwargs)
            return push_folder_to_hub(
                folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                commit_description=commit_description, token=token, create_pr=create_pr,
            )

    def _summary(self) -> dict:
        report = self.pruning_sparsity()
        return {k: report[k] for k in ("overall", "num_pruned", "num_targeted", "per_module_type", "per_matrix")}


def write_pruning_config(folder: Path, config: DPrunerConfig | None, record: dict[str, Any]) -> None:
    """``pruning_config.json``: the recipe (when known) and the record of the run."""
    if config is not None:
        config.save_pretrained(folder, **record)
    else:
        (folder / PRUNING_CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


PICKLE_WEIGHTS = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")


def load_causal_lm(
    name_or_path: str | os.PathLike, *model_args, allow_pickle: bool = False, **kwargs
) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` that reads safetensors only (``use_safetensors=True``): a folder whose
    weights exist only as ``pytorch_model.bin`` (a pickle, which can run code when loaded) gets a ValueError saying
    what to do, unless ``allow_pickle=True``."""
    path = Path(name_or_path)
    if not allow_pickle and path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if PICKLE_WEIGHTS.match(p.name))
        if pickled:
            raise ValueError(
                f"{path} holds its weights only as {', '.join(pickled)}, a pickle that can run code when loaded; "
                "hf_dpruner reads safetensors only. Convert the folder to safetensors in an environment you trust "
                "(AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)), or, if you trust the "
                "file, pass allow_pickle=True (--allow-pickle-weights on the command line)."
            )
    kwargs.setdefault("use_safetensors", None if allow_pickle else True)
    return AutoModelForCausalLM.from_pretrained(name_or_path, *model_args, **kwargs)


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    """``base`` with `PrunedModelMixin` first; keeps the name so ``config.architectures`` stays standard."""
    if issubclass(base, PrunedModelMixin):
        return base
    if base not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[base] = type(base.__name__, (PrunedModelMixin, base), {"__qualname__": base.__qualname__})
    return _PRUNED_CLASSES[base]


def _mask_gradient_of_weight(module: torch.nn.Module) -> None:
    """Hook the module's current weight so its gradient is multiplied by the module's keep-mask buffer (which
    follows the module through device moves and casts)."""
    weight = module.weight
    requires_grad = weight.requires_grad
    weight.requires_grad_(True)  # hooks can only be registered on tensors that require grad
    weight.register_hook(lambda grad: _masked_gradient(module, grad))
    weight.requires_grad_(requires_grad)
    weight._hf_dpruner_masked = True


def _masked_gradient(module: torch.nn.Module, grad: torch.Tensor) -> torch.Tensor:
    keep = getattr(module, MASK_BUFFER, None)
    return grad if keep is None else grad * keep.to(grad.dtype)


def _rehook_replaced_weight(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook: a cast or wrapper may have replaced the weight Parameter; hook the new one."""
    if not getattr(module.weight, "_hf_dpruner_masked", False):
        _mask_gradient_of_weight(module)


def _install_mask(module: torch.nn.Module, keep: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    module.register_buffer(MASK_BUFFER, keep, persistent=False)
    if not getattr(module.weight, "_hf_dpruner_masked", False):
        _mask_gradient_of_weight(module)
    return module.register_forward_pre_hook(_rehook_replaced_weight)


def check_masks_fit(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError unless every mask names a ``.weight`` parameter of `model` and has its shape."""
    params = dict(model.named_parameters())
    unknown = sorted(name for name in masks if name not in params or not name.endswith(".weight"))
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


def check_masks_match_record(masks: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> None:
    """Raise ValueError if the masks are not the ones that `record` (a ``pruning_config.json`` content) describes:
    other matrices than its ``achieved_sparsity.per_matrix``, or another pruned or targeted count."""
    achieved = record.get("achieved_sparsity")
    if not isinstance(achieved, Mapping):
        return
    per_matrix = achieved.get("per_matrix")
    if isinstance(per_matrix, Mapping):
        missing, extra = sorted(set(per_matrix) - set(masks)), sorted(set(masks) - set(per_matrix))
        if missing:
            raise ValueError(f"no mask for {len(missing)} matrices that the pruning record lists, e.g. {missing[:3]}.")
        if extra:
            listed = f"masks for {len(extra)} matrices that the pruning record does not list"
            raise ValueError(f"{listed}, e.g. {extra[:3]}.")
    measured = {
        "num_pruned": sum(keep.numel() - int(keep.sum()) for keep in masks.values()),
        "num_targeted": sum(keep.numel() for keep in masks.values()),
    }
    for key, count in measured.items():
        if key in achieved and achieved[key] != count:
            raise ValueError(f"the masks give {key} = {count}, the pruning record says {achieved[key]!r}.")


def load_checkpoint_masks(
    folder: str | os.PathLike, model: torch.nn.Module, record: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Read the ``pruning_masks.safetensors`` of a checkpoint `folder` for `model`, given the folder's
    ``pruning_config.json`` content `record` (``{}`` if none): checks the recorded sha256 (when there is one), the
    file format, that the masks fit the model's weights and that they are the masks the record describes. Every
    error is a ValueError (FileNotFoundError for a missing file) that names the file."""
    folder = Path(folder)
    masks_file, config_file = folder / MASKS_NAME, folder / PRUNING_CONFIG_NAME
    verify_masks_checksum(masks_file, record.get("masks_sha256"), config_file)
    masks = load_masks(masks_file)
    try:
        check_masks_fit(model, masks)
    except ValueError as err:
        raise ValueError(f"{masks_file} does not fit the model loaded from {folder}: {err}") from err
    try:
        check_masks_match_record(masks, record)
    except ValueError as err:
        raise ValueError(
            f"{masks_file} does not match {config_file}: {err} The two files come from different saves; re-save or "
            "re-download the checkpoint."
        ) from err
    return masks


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
    check_masks_fit(model, masks)
    params = dict(model.named_parameters())
    for handle in getattr(model, "_pruning_hook_handles", []):
        handle.remove()
    for module in model.modules():
        module._buffers.pop(MASK_BUFFER, None)
    model.__class__ = _pruned_class(type(model))
    model.pruning_masks = {name: keep.to(device=params[name].device, dtype=torch.bool) for name, keep in masks.items()}
    model.pruning_config = config
    model.pruning_record = dict(record or {})
    if apply:
        model.apply_pruning_masks()
    model.check_pruned_weights()
    modules = dict(model.named_modules())
    model._pruning_hook_handles = [
        _install_mask(modules[name.rsplit(".", 1)[0]], keep) for name, keep in model.pruning_masks.items()
    ]
    return model


class AutoPrunedModelForCausalLM:
    """Loads a checkpoint saved by hf_dpruner (local folder or Hub repo id) with its masks re-attached.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> from hf_dpruner import DPrunerConfig
        >>> from hf_dpruner.methods import prune_model
        >>> args = TrainingArguments("out", report_to=[], disable_tqdm=True)
        >>> pruned, _ = prune_model(model, None, "magnitude", DPrunerConfig(sparsity=0.5), args, None, None)
        >>> pruned.save_pretrained("pruned")  # weights + pruning_masks.safetensors + pruning_config.json
        >>> from hf_dpruner import AutoPrunedModelForCausalLM
        >>> reloaded = AutoPrunedModelForCausalLM.from_pretrained("pruned")
        >>> round(reloaded.pruning_sparsity()["overall"], 2)
        0.5
    """

    def __init__(self, *args, **kwargs) -> None:
        raise OSError("Use AutoPrunedModelForCausalLM.from_pretrained(...).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> PreTrainedModel:
        """Like `AutoModelForCausalLM.from_pretrained`, then reads and checks the masks and pruning config.

        A Hub repo id is first downloaded with `huggingface_hub.snapshot_download` (safetensors, JSON and tokenizer
        files only), so a repo and a local folder go through the same code."""
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        folder = local_checkpoint(pretrained_model_name_or_path, **hub_kwargs)
        masks_file, config_file = folder / MASKS_NAME, folder / PRUNING_CONFIG_NAME
        if not masks_file.is_file():
            if config_file.is_file():  # the checkpoint was saved by hf_dpruner but did not arrive whole
                raise FileNotFoundError(
                    f"{folder} has {PRUNING_CONFIG_NAME} but no {MASKS_NAME}: the checkpoint is incomplete (an "
                    "interrupted download or copy?). Download or copy it again."
                )
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} has no {MASKS_NAME}: it was not saved by hf_dpruner. Load it with "
                "AutoModelForCausalLM, or prune it first."
            )
        data = read_pruning_record(config_file) if config_file.is_file() else {}
        config = config_from_record(data, config_file)  # before the weights load: a bad file fails fast
        try:
            model = load_causal_lm(folder, *args, **kwargs)
        except SafetensorError as err:
            weights = sorted(p.name for p in folder.glob("model*.safetensors")) or ["model.safetensors"]
            raise ValueError(
                f"The weights of {folder} ({', '.join(weights)}) cannot be read: {err}. The file is corrupt or "
                "truncated (an interrupted download or copy?); download or copy the checkpoint again."
            ) from err
        model.config._name_or_path = str(pretrained_model_name_or_path)  # the repo id, as transformers records it
        return attach_checkpoint_masks(model, folder, data, config)


def attach_checkpoint_masks(
    model: PreTrainedModel, folder: str | os.PathLike, data: Mapping[str, Any], config: DPrunerConfig | None
) -> PreTrainedModel:
    """Make `model`, whose weights were loaded from `folder`, a pruned model with the folder's masks, `data` (its
    ``pruning_config.json`` content, ``{}`` if none) and `config` (the recipe in `data`). Errors name the files."""
    folder = Path(folder)
    masks = load_checkpoint_masks(folder, model, data)
    record = {k: data[k] for k in ("method", "base_model", "calibration", "recovery") if k in data}
    try:
        return make_pruned(model, masks, config, record)
    except ValueError as err:
        raise ValueError(f"The weights in {folder} and {folder / MASKS_NAME} disagree: {err}") from err
