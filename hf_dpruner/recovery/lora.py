"""Sparsity-preserving LoRA recovery: wrap a pruned model, reload a saved adapter, merge back into a pruned model."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from ..modeling import MASK_BUFFER, PrunedModelMixin, make_pruned
from .masked_lora_layer import MaskedLoraLinear

logger = logging.get_logger(__name__)

# Initialisations that only set A and B; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) rewrite the base weight.
SUPPORTED_INITS = (True, False, "gaussian", "orthogonal")
_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token")


def get_masked_peft_model(
    model: PreTrainedModel, lora_config: LoraConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """`peft.get_peft_model` for a pruned model: every targeted pruned Linear/Conv1D gets a `MaskedLoraLinear`, so
    training, `merge_and_unload` and `merge_masked_lora` keep its pruned weights at exactly 0.

    `lora_config` is copied, not modified. Other keyword arguments go to `peft.get_peft_model`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> from hf_dpruner import DPrunerConfig
        >>> from hf_dpruner.methods import prune_model
        >>> args = TrainingArguments("out", report_to=[], disable_tqdm=True)
        >>> pruned, _ = prune_model(model, None, "magnitude", DPrunerConfig(sparsity=0.5), args, None, None)
        >>> from peft import LoraConfig
        >>> from hf_dpruner import get_masked_peft_model
        >>> keep = pruned.pruning_masks["model.layers.0.self_attn.q_proj.weight"]
        >>> peft_model = get_masked_peft_model(pruned, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        >>> merged = peft_model.merge_and_unload()  # the merged weights keep the pruned entries at 0
        >>> bool((merged.model.layers[0].self_attn.q_proj.weight[~keep] == 0).all())
        True
    """
    _check_pruned(model, "get_masked_peft_model")
    peft_model = get_peft_model(model, _masked_config(lora_config, model), adapter_name=adapter_name, **kwargs)
    _log_masked_layers(peft_model, adapter_name)
    return peft_model


def load_masked_adapter(
    model: PreTrainedModel,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """`PeftModel.from_pretrained` for an adapter trained with `get_masked_peft_model`.

    The masking is not part of the saved adapter: a plain `PeftModel.from_pretrained` would build stock LoRA layers
    and compute different outputs. Keyword arguments go to `PeftModel.from_pretrained` (``subfolder``,
    ``revision``, ``cache_dir`` and ``token`` also to reading the adapter config)."""
    _check_pruned(model, "load_masked_adapter")
    config = PeftConfig.from_pretrained(str(model_id), **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    peft_model = PeftModel.from_pretrained(
        model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=_masked_config(config, model),
        **kwargs,
    )
    _log_masked_layers(peft_model, adapter_name)
    return peft_model


def merge_masked_lora(peft_model: PeftModel, safe_merge: bool = False) -> PreTrainedModel:
    """Merge the active adapter into the pruned base model, unload peft and return the pruned model, masks attached
    again, with the adapter's settings in ``pruning_record["recovery"]``.

    The pruned weights are exactly 0 afterwards (checked). As after peft's `merge_and_unload`, the parameters stay
    frozen: call ``model.requires_grad_(True)`` to fine-tune the merged model further."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"merge_masked_lora expects a peft.PeftModel from get_masked_peft_model or load_masked_adapter, got "
            f"{type(peft_model).__name__}."
        )
    base = peft_model.get_base_model()
    _check_pruned(base, "merge_masked_lora")
    adapters = list(peft_model.active_adapters)
    if len(adapters) != 1:
        raise ValueError(
            f"merge_masked_lora merges one adapter, but {adapters} are active; choose one with "
            "`peft_model.set_adapter(name)`."
        )
    config = peft_model.peft_config[adapters[0]]
    if not isinstance(config, LoraConfig):
        raise TypeError(f"Adapter {adapters[0]!r} is {type(config).__name__}; merge_masked_lora merges LoRA adapters.")
    unmasked = [
        name
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
        and not isinstance(module, MaskedLoraLinear)
        and getattr(module.get_base_layer(), MASK_BUFFER, None) is not None
    ]
    if unmasked:
        raise ValueError(
            f"{len(unmasked)} pruned layers carry stock LoRA layers, e.g. {unmasked[0]!r}: merging them would revive "
            "pruned weights. Create the adapter with get_masked_peft_model, or load a saved one with "
            "load_masked_adapter instead of PeftModel.from_pretrained."
        )
    model = peft_model.merge_and_unload(safe_merge=safe_merge)
    recovery = _recovery_record(config, adapters[0])
    if "recovery" in model.pruning_record:
        recovery["previous"] = model.pruning_record["recovery"]
    record = {**model.pruning_record, "recovery": recovery}
    model = make_pruned(model, model.pruning_masks, model.pruning_config, record)
    logger.info(
        f"Merged LoRA adapter {adapters[0]!r} into the pruned model; sparsity of the masks "
        f"({model.pruning_sparsity()['overall']:.2%}) kept exactly."
    )
    return model


def _check_pruned(model: nn.Module, caller: str) -> None:
    if isinstance(model, PeftModel):
        raise ValueError(
            f"{caller} got a PeftModel; pass the pruned base model (from AutoPrunedModelForCausalLM.from_pretrained "
            "or make_pruned) without adapters."
        )
    if not isinstance(model, PrunedModelMixin) or not model.pruning_masks:
        raise ValueError(
            f"{caller} needs a pruned model with its keep-masks attached, but {type(model).__name__} has none. Load "
            "the checkpoint with hf_dpruner.AutoPrunedModelForCausalLM.from_pretrained(...) or attach masks with "
            "hf_dpruner.make_pruned(model, masks)."
        )


def _masked_config(config: PeftConfig, model: PrunedModelMixin) -> LoraConfig:
    """A copy of `config`, checked for masked LoRA, with `MaskedLoraLinear` registered for Linear and Conv1D."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"Masked recovery needs a peft.LoraConfig, got {type(config).__name__}.")
    variants = [
        f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)
    ]
    if variants:
        raise ValueError(f"LoRA variants {variants} are not supported with pruning masks; use plain LoRA (unset them).")
    if config.init_lora_weights not in SUPPORTED_INITS:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} is not supported with pruning masks (it rewrites the "
            f"base weights or is a variant); valid: {SUPPORTED_INITS}."
        )
    if config.target_parameters:
        raise ValueError(
            f"target_parameters={config.target_parameters!r} is not supported with pruning masks; target modules "
            "with target_modules."
        )
    pruned_modules = [name.rsplit(".", 1)[0] for name in model.pruning_masks]
    trained_in_full = sorted(
        key for key in config.modules_to_save or [] if any(m == key or m.endswith("." + key) for m in pruned_modules)
    )
    if trained_in_full:
        raise ValueError(
            f"modules_to_save={trained_in_full} names pruned modules; train them through LoRA (target_modules) so "
            "their pruned weights stay 0."
        )
    masked = copy.deepcopy(config)
    masked._register_custom_module({nn.Linear: MaskedLoraLinear, Conv1D: MaskedLoraLinear})
    return masked


def _log_masked_layers(peft_model: PeftModel, adapter_name: str) -> None:
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    masked = sum(isinstance(m, MaskedLoraLinear) and m.keep_mask is not None for m in layers)
    if not masked:
        targets = peft_model.peft_config[adapter_name].target_modules
        logger.warning(f"No LoRA layer wraps a pruned module (target_modules={targets}); the masks play no part.")
    logger.info(f"LoRA on {len(layers)} modules, {masked} of them pruned (masked updates).")


def _recovery_record(config: LoraConfig, adapter_name: str) -> dict[str, Any]:
    """The adapter settings stored in ``pruning_config.json`` under ``recovery``."""
    targets = config.target_modules
    return {
        "method": "lora",
        "adapter_name": adapter_name,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
        "target_modules": targets if targets is None or isinstance(targets, str) else sorted(targets),
    }
