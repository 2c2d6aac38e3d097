"""Export a PAT-tuned model as a standard transformers checkpoint with a smaller ``hidden_size`` (or, with
``axis="neurons"``, a smaller ``intermediate_size``).

Every HSM's ``T`` is folded into the neighbouring weights, LoRA is merged, the closed channels are dropped and the
RMSNorms are rescaled, so the exported model computes what the masked model computed, with fewer parameters. On the
neuron axis LoRA is merged and each MLP keeps its open neurons (rows of ``gate_proj``/``up_proj``, columns of
``down_proj``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from ..config import PRUNING_CONFIG_NAME
from ..masks import MASKS_NAME
from ..model_card import CARD_NAME
from ..modeling import is_stale_checkpoint_file
from ..utils import replacing_folder
from ..version import __version__
from .config import PATConfig
from .modules import PAT_ATTRIBUTE, PATModules, get_pat_modules
from .neuron_pruning import neuron_subset_state_dict, smaller_mlp_model

logger = logging.get_logger(__name__)

PRODUCERS = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
CONSUMERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
READ_AFTER = {path: "input_layernorm" if path.startswith("self_attn.") else "post_attention_layernorm"
              for path in CONSUMERS}  # the norm whose output each consumer reads


def _effective(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of a Linear/Embedding, with the active LoRA adapters merged in (without modifying it)."""
    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        weight = base.weight.detach().float().clone()
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                weight += module.get_delta_weight(adapter).detach().float()
        bias = base.bias
    else:
        weight, bias = module.weight.detach().float(), getattr(module, "bias", None)
    return weight.cpu(), None if bias is None else bias.detach().float().cpu()


def _put(state: dict[str, torch.Tensor], prefix: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    state[f"{prefix}.weight"] = weight.contiguous()
    if bias is not None:
        state[f"{prefix}.bias"] = bias.contiguous()


def exported_config(model: PreTrainedModel, kept: int):
    """The base config with ``hidden_size = kept``, ``head_dim`` set explicitly and ``rms_norm_eps`` rescaled."""
    config = copy.deepcopy(model.config)
    hidden = config.hidden_size
    config.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    config.hidden_size = kept
    # The closed channels are 0, so mean_d(x^2) + eps = (d'/d) (mean_d'(x^2) + eps d/d'): RMSNorm over the kept
    # channels with eps * d/d' and gains * sqrt(d/d') gives exactly the old outputs.
    config.rms_norm_eps = config.rms_norm_eps * hidden / kept
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


@torch.no_grad()
def channel_subset_state_dict(
    base: PreTrainedModel,
    keep: torch.Tensor,
    transforms: Mapping[str, torch.Tensor] | None = None,
    reader_maps: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The weights of `base` (a Llama-family model, LoRA merged if present) keeping only the hidden channels `keep`
    (sorted indices), keyed like its state dict. ``transforms[site key]`` (``hidden × hidden``) is first folded into
    that residual producer (``"embed"``, ``"{i}_attn"``, ``"{i}_mlp"``); RMSNorm gains are scaled by ``√(d/d′)``
    (pair with `exported_config`'s ``rms_norm_eps · d/d′``). ``reader_maps[norm site]`` (``hidden × kept``, from
    `compensation.reader_maps`) replaces the column selection ``W[:, keep]`` of the weights reading that norm's
    output by ``W @ map``."""
    transforms = transforms or {}
    reader_maps = reader_maps or {}
    keep = keep.cpu()
    scale = (base.config.hidden_size / len(keep)) ** 0.5
    state: dict[str, torch.Tensor] = {}
    embed, _ = _effective(base.model.embed_tokens)
    if "embed" in transforms:
        embed = embed @ transforms["embed"].t()
    state["model.embed_tokens.weight"] = embed[:, keep].contiguous()
    for i, layer in enumerate(base.model.layers):
        prefix = f"model.layers.{i}"
        for key, path in PRODUCERS.items():
            weight, bias = _effective(layer.get_submodule(path))
            t = transforms.get(f"{i}_{key}")
            if t is not None:
                weight, bias = t @ weight, None if bias is None else t @ bias
            _put(state, f"{prefix}.{path}", weight[keep], None if bias is None else bias[keep])
        for path in CONSUMERS:
            weight, bias = _effective(layer.get_submodule(path))
            m = reader_maps.get(f"{i}_{READ_AFTER[path]}")
            _put(state, f"{prefix}.{path}", weight[:, keep] if m is None else weight @ m, bias)
        for name in NORMS:
            state[f"{prefix}.{name}.weight"] = getattr(layer, name).weight.detach().float().cpu()[keep] * scale
    state["model.norm.weight"] = base.model.norm.weight.detach().float().cpu()[keep] * scale
    if not base.config.tie_word_embeddings:
        head, head_bias = _effective(base.get_output_embeddings())
        m = reader_maps.get("final")
        _put(state, "lm_head", head[:, keep] if m is None else head @ m, head_bias)
    return state


def merged_state_dict(base: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The float32 CPU weights of `base` keyed like a plain model's state dict: LoRA merged (without modifying
    `base`), no adapter or PAT entries."""
    state = {}
    for key, value in base.state_dict().items():
        if "lora_" in key or key.startswith(f"{PAT_ATTRIBUTE}."):
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().float().cpu()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            _put(state, name, *_effective(module))
    return state


def exported_state_dict(model: PreTrainedModel | PeftModel, pat: PATModules) -> tuple[dict[str, torch.Tensor], int]:
    """The weights of the smaller model, keyed like the base model's state dict."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    keep = pat.mask.kept_indices().cpu()
    transforms = {key: hsm.transform_matrix() for key, hsm in pat.hsms.items() if hsm.has_transform}
    return channel_subset_state_dict(base, keep, transforms), len(keep)


def smaller_model(base: PreTrainedModel, state: dict[str, torch.Tensor], kept: int) -> PreTrainedModel:
    """A new model of `base`'s class and dtype with ``hidden_size = kept``, holding `state` (float32 tensors)."""
    config = exported_config(base, kept)
    dtype = next(base.parameters()).dtype
    small = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = small.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"The PAT export does not cover this {config.model_type} variant: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}."
        )
    if config.tie_word_embeddings:
        small.tie_weights()
    small = small.to(dtype).eval()
    small.generation_config = copy.deepcopy(base.generation_config)
    return small


def export_pat_model(
    model: PreTrainedModel | PeftModel,
    output_dir: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    record: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Build the smaller standard model from a PAT-tuned `model` (left unchanged) and, with `output_dir`, save it
    there with the tokenizer, ``pat_config.json`` and a model card (written to a temp folder, then renamed).

    The masked model and the export compute the same logits once the mask is binary (after the warm-up); exporting
    earlier drops channels the model still uses, which is warned about."""
    pat = get_pat_modules(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not pat.mask.is_binary:
        logger.warning(
            f"The PAT mask is not binary yet (step {int(pat.mask.step)} of warm-up {pat.mask.warmup_steps}): the "
            "export keeps the top channels, but its outputs differ from the masked model's. Train past the warm-up."
        )
    if pat.config.axis == "neurons":
        keep = pat.mask.kept_indices().cpu()
        kept, size = keep.shape[-1], "intermediate_size"
        small = smaller_mlp_model(base, neuron_subset_state_dict(merged_state_dict(base), keep), kept)
    else:
        state, kept = exported_state_dict(model, pat)
        small, size = smaller_model(base, state, kept), "hidden_size"
    if output_dir is not None:
        _save(small, Path(output_dir), tokenizer, pat.config, base, {size: {"before": getattr(base.config, size),
                                                                            "after": kept}}, record or {})
    return small


def export_one_shot_model(
    model: PeftModel,
    config: PATConfig,
    dense: dict[str, int],
    output_dir: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    record: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """The standard model of a ``strategy="one-shot"`` run: the neuron-pruned `model` with its LoRA merged (`model`
    unchanged); with `output_dir`, saved like `export_pat_model`. `dense` holds the dense model's
    ``intermediate_size`` and ``parameters`` for the record."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    kept = base.config.intermediate_size
    small = smaller_mlp_model(base, merged_state_dict(base), kept)
    if output_dir is not None:
        _save(small, Path(output_dir), tokenizer, config, base,
              {"intermediate_size": {"before": dense["intermediate_size"], "after": kept}}, record or {},
              parameters_before=dense["parameters"])
    return small


def _save(small: PreTrainedModel, output_dir: Path, tokenizer, config: PATConfig, base: PreTrainedModel,
          sizes: dict[str, dict[str, int]], record: dict[str, Any], parameters_before: int | None = None) -> None:
    from .card import write_pat_card

    # weights, masks and pruning config of an earlier save to this folder would contradict the smaller model
    stale = {MASKS_NAME, PRUNING_CONFIG_NAME}
    with replacing_folder(output_dir, stale=lambda name: name in stale or is_stale_checkpoint_file(name)) as tmp:
        small.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        before = parameters_before or base_parameter_count(base)
        export = {**sizes, "parameters": {"before": before, "after": small.num_parameters()}}
        config.save_pretrained(tmp, method="pat", hf_dpruner_version=__version__,
                               base_model=record.get("base_model", getattr(base.config, "_name_or_path", None)),
                               training=record.get("training", {}), export=export)
        write_pat_card(tmp, model_name=output_dir.name, existing=output_dir / CARD_NAME)
    changes = ", ".join(f"{name} {size['before']} -> {size['after']}" for name, size in sizes.items())
    logger.info(f"PAT export: {changes}, saved to {output_dir}.")


def base_parameter_count(base: PreTrainedModel) -> int:
    """Parameters of the base model alone (no LoRA, no PAT modules)."""
    total = 0
    seen = set()
    for name, param in base.named_parameters():
        if "lora_" in name or name.startswith("pat_modules.") or id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
    return total
