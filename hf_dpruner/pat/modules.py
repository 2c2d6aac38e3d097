"""Insert PAT's HSMs and shared mask into a Llama-family causal LM (optionally with LoRA), and find them again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .config import PATConfig
from .hsm import HybridSparsificationModule
from .mask import SharedChannelMask

logger = logging.get_logger(__name__)

# Decoder-only models with pre-norm RMSNorm blocks, a `model.layers[i].{self_attn.o_proj, mlp.down_proj}` layout and
# no norm on the hidden size other than the block and final norms (Qwen3's q/k norms share `rms_norm_eps`, which the
# export rescales, so it is not listed).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PAT_ATTRIBUTE = "pat_modules"


@dataclass(frozen=True)
class HSMSite:
    """Where a PAT module sits: the module it hooks (an HSM on its output, or a neuron mask on its input), and the
    module's key."""

    key: str
    module_path: str


def check_supported(model: PreTrainedModel) -> None:
    """Raise a clear error for an architecture the PAT export cannot shrink."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"PAT supports the Llama family {SUPPORTED_MODEL_TYPES}; this model is {model_type!r} "
            f"({type(model).__name__}). Its layout (norms, residual producers) is not handled by the export."
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        raise ValueError(f"{type(model).__name__} has no `model.layers`: not a Llama-family causal LM.")


def hsm_sites(model: PreTrainedModel) -> list[HSMSite]:
    """The HSM positions on the residual stream: the embeddings, then each block's attention and FFN outputs."""
    sites = [HSMSite("embed", "model.embed_tokens")]
    for i in range(len(model.model.layers)):
        sites.append(HSMSite(f"{i}_attn", f"model.layers.{i}.self_attn.o_proj"))
        sites.append(HSMSite(f"{i}_mlp", f"model.layers.{i}.mlp.down_proj"))
    return sites


def neuron_sites(model: PreTrainedModel) -> list[HSMSite]:
    """The neuron-mask positions (axis ``"neurons"``): the input of every MLP's ``down_proj``, one per layer."""
    return [HSMSite(f"{i}_neurons", f"model.layers.{i}.mlp.down_proj") for i in range(len(model.model.layers))]


def embeddings_tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


class PATModules(nn.Module):
    """The mask and every HSM of a model, plus the hooks that apply them.

    Axis ``"hidden"``: the shared mask gates every HSM's output on the residual stream. Axis ``"neurons"``: the mask
    has a row per layer (``mask.logits`` is ``[layers, intermediate_size]``) that gates the input of that layer's
    ``down_proj``; there are no HSMs."""

    def __init__(self, config: PATConfig, mask: SharedChannelMask, sites: list[HSMSite],
                 hsms: dict[str, HybridSparsificationModule] | None = None) -> None:
        super().__init__()
        self.config = config
        self.sites = sites
        self.mask = mask
        self.hsms = nn.ModuleDict(hsms or {})
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fixed_gate: torch.Tensor | None = None
        self._bypassed = False

    @contextmanager
    def fixed_gate(self, gate: torch.Tensor) -> Iterator[None]:
        """Within the block, every HSM uses `gate` instead of the mask's (e.g. an all-open gate that requires
        grad, to score the channels)."""
        self._fixed_gate = gate
        try:
            yield
        finally:
            self._fixed_gate = None

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Within the block, the HSMs and the mask are switched off: the model computes what the base model does
        (the distillation teacher, without a second copy of the weights)."""
        self._bypassed = True
        try:
            yield
        finally:
            self._bypassed = False

    def attach(self, model: nn.Module) -> None:
        """Hook every site of `model` (the peft-wrapped modules, so LoRA's update passes through the HSM or sees
        the masked neurons too)."""
        self.detach()
        for row, site in enumerate(self.sites):
            module = model.get_submodule(site.module_path)
            if self.config.axis == "neurons":
                self._handles.append(module.register_forward_pre_hook(self._neuron_hook(row)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(self.hsms[site.key])))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _gate(self) -> torch.Tensor:
        return self._fixed_gate if self._fixed_gate is not None else self.mask.gate()

    def _hook(self, hsm: HybridSparsificationModule):
        def apply(module, args, output):
            if self._bypassed:
                return output
            return hsm(output, self._gate())

        return apply

    def _neuron_hook(self, row: int):
        def apply(module, args):
            if self._bypassed:
                return None
            return (args[0] * self._gate()[row].to(args[0].dtype), *args[1:])

        return apply

    def identity_loss(self) -> torch.Tensor:
        """Sum of the Identity Loss of every HSM with a transform (0 without HSMs)."""
        losses = [h.identity_loss() for h in self.hsms.values() if h.has_transform]
        return sum(losses) if losses else self.mask.logits.new_zeros(())


def lora_model(model: PreTrainedModel, config: PATConfig) -> PeftModel:
    """`model` with the LoRA adapters of `config` (rank, alpha, dropout, targets: every Linear by default)."""
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or "all-linear", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def get_pat_model(model: PreTrainedModel, config: PATConfig | None = None) -> PreTrainedModel | PeftModel:
    """Prepare `model` for Pruning-Aware Tuning: LoRA on the linear layers (unless ``config.lora_r == 0``, then the
    base weights are frozen), HSMs on the residual stream and the shared mask, all trainable.

    Returns the peft model (or `model`); the PAT modules are ``get_pat_modules(returned)``. Without `config`: PAT
    as in the paper's axis, ``PATConfig(axis="hidden", strategy="learned")``."""
    config = config if config is not None else PATConfig(axis="hidden", strategy="learned")
    if config.strategy != "learned":
        raise ValueError(f"get_pat_model prepares PAT's learned mask; strategy={config.strategy!r} learns none. Pass "
                         "the config to PATTrainer (it prunes, reconstructs and tunes), or set strategy='learned'.")
    if isinstance(model, PeftModel) or get_pat_modules(model, required=False) is not None:
        raise ValueError("get_pat_model expects a plain transformers model without adapters or PAT modules.")
    check_supported(model)
    hidden_size = model.config.hidden_size
    tied = embeddings_tied(model)
    if config.lora_r > 0:
        wrapped = lora_model(model, config)
    else:
        model.requires_grad_(False)
        wrapped = model
    base = wrapped.get_base_model() if isinstance(wrapped, PeftModel) else wrapped
    pat = _pat_modules(base, config, tied)
    param = next(base.parameters())
    pat.to(param.device)
    setattr(base, PAT_ATTRIBUTE, pat)
    pat.requires_grad_(True)
    pat.attach(base)
    if config.axis == "neurons":
        logger.info(f"PAT: a neuron mask on each of {len(pat.sites)} MLPs, target {pat.mask.num_kept} of "
                    f"{model.config.intermediate_size} neurons each, LoRA r={config.lora_r}.")
    else:
        logger.info(
            f"PAT: {len(pat.sites)} HSMs (rank {config.rank_for(hidden_size)}"
            f"{', mask-only on the tied embeddings' if tied else ''}), "
            f"target {pat.mask.num_kept} of {hidden_size} hidden channels, LoRA r={config.lora_r}."
        )
    return wrapped


def _pat_modules(model: PreTrainedModel, config: PATConfig, tied: bool) -> PATModules:
    """New PAT modules for `model` on ``config.axis``: the HSMs and their shared mask, or the per-layer neuron
    masks."""
    if config.axis == "neurons":
        size = model.config.intermediate_size
        sites = neuron_sites(model)
        mask = SharedChannelMask(size, config.kept_channels(size), config.mask_warmup_fraction, num_groups=len(sites))
        return PATModules(config, mask, sites)
    hidden = model.config.hidden_size
    sites = hsm_sites(model)
    rank = config.rank_for(hidden)
    hsms = {site.key: HybridSparsificationModule(hidden, rank, transform=not (site.key == "embed" and tied))
            for site in sites}
    kept = config.kept_channels(hidden, multiple_of=model.config.num_attention_heads)
    mask = SharedChannelMask(hidden, kept, config.mask_warmup_fraction)
    return PATModules(config, mask, sites, hsms)


def get_pat_modules(model: nn.Module, required: bool = True) -> PATModules | None:
    """The `PATModules` of a model prepared by `get_pat_model` (peft-wrapped or not)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    pat = getattr(base, PAT_ATTRIBUTE, None)
    if pat is None and required:
        raise ValueError(
            f"{type(model).__name__} has no PAT modules: prepare it with hf_dpruner.pat.get_pat_model(model, config). "
            "A model trained with PATConfig(strategy='one-shot') has none: export it with PATTrainer.export()."
        )
    return pat
