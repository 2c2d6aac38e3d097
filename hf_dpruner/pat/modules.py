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
    """Where an HSM sits: the module whose output it transforms, and the HSM's key."""

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


def embeddings_tied(model: PreTrainedModel) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


class PATModules(nn.Module):
    """The shared mask and every HSM of a model, plus the forward hooks that apply them."""

    def __init__(self, hidden_size: int, config: PATConfig, sites: list[HSMSite], tied_embeddings: bool) -> None:
        super().__init__()
        self.config = config
        self.sites = sites
        self.mask = SharedChannelMask(hidden_size, config.kept_channels(hidden_size), config.mask_warmup_fraction)
        rank = config.rank_for(hidden_size)
        self.hsms = nn.ModuleDict({
            site.key: HybridSparsificationModule(
                hidden_size, rank, transform=not (site.key == "embed" and tied_embeddings)
            )
            for site in sites
        })
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
        """Hook every site of `model` (the peft-wrapped modules, so LoRA's update passes through the HSM too)."""
        self.detach()
        for site in self.sites:
            module = model.get_submodule(site.module_path)
            hsm = self.hsms[site.key]
            self._handles.append(module.register_forward_hook(self._hook(hsm)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, hsm: HybridSparsificationModule):
        def apply(module, args, output):
            if self._bypassed:
                return output
            return hsm(output, self._fixed_gate if self._fixed_gate is not None else self.mask.gate())

        return apply

    def identity_loss(self) -> torch.Tensor:
        """Sum of the Identity Loss of every HSM with a transform."""
        return sum(h.identity_loss() for h in self.hsms.values() if h.has_transform)


def get_pat_model(model: PreTrainedModel, config: PATConfig | None = None) -> PreTrainedModel | PeftModel:
    """Prepare `model` for Pruning-Aware Tuning: LoRA on the linear layers (unless ``config.lora_r == 0``, then the
    base weights are frozen), HSMs on the residual stream and the shared mask, all trainable.

    Returns the peft model (or `model`); the PAT modules are ``get_pat_modules(returned)``."""
    config = config if config is not None else PATConfig()
    if isinstance(model, PeftModel) or get_pat_modules(model, required=False) is not None:
        raise ValueError("get_pat_model expects a plain transformers model without adapters or PAT modules.")
    check_supported(model)
    hidden_size = model.config.hidden_size
    sites = hsm_sites(model)
    tied = embeddings_tied(model)
    if config.lora_r > 0:
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules or "all-linear", task_type="CAUSAL_LM",
        )
        wrapped = get_peft_model(model, lora)
    else:
        model.requires_grad_(False)
        wrapped = model
    base = wrapped.get_base_model() if isinstance(wrapped, PeftModel) else wrapped
    pat = PATModules(hidden_size, config, sites, tied)
    param = next(base.parameters())
    pat.to(param.device)
    setattr(base, PAT_ATTRIBUTE, pat)
    pat.requires_grad_(True)
    pat.attach(base)
    logger.info(
        f"PAT: {len(sites)} HSMs (rank {config.rank_for(hidden_size)}"
        f"{', mask-only on the tied embeddings' if tied else ''}), "
        f"target {pat.mask.num_kept} of {hidden_size} hidden channels, LoRA r={config.lora_r}."
    )
    return wrapped


def get_pat_modules(model: nn.Module, required: bool = True) -> PATModules | None:
    """The `PATModules` of a model prepared by `get_pat_model` (peft-wrapped or not)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    pat = getattr(base, PAT_ATTRIBUTE, None)
    if pat is None and required:
        raise ValueError(
            f"{type(model).__name__} has no PAT modules: prepare it with hf_dpruner.pat.get_pat_model(model, config)."
        )
    return pat
