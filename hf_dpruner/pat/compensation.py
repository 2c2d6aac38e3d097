"""Least-squares compensation of the readers of the residual stream after hidden channels are removed.

Removing hidden channels changes what every RMSNorm on the residual stream hands to the layers that read it
(q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``, an untied LM head after the final
norm): the removed channels are gone and the norm's scale is computed without them. For each norm, with ``y`` its
dense output and ``y′`` the smaller model's output on the same residual input (kept channels only), a reader ``W``
is replaced by the ``W′`` that best reproduces its dense outputs on the calibration tokens:

    W′ = argmin Σ ‖W y − W′ y′‖² = W · Σ y y′ᵀ · (Σ y′ y′ᵀ + λ I)⁻¹,

with ``λ = damping · mean diag(Σ y′ y′ᵀ)``. The statistics come from one forward pass of the dense model (the
residual inputs of the dense trajectory). Without compensation the map is the plain column selection ``W[:, keep]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

Batches = Sequence[Mapping[str, torch.Tensor]]


def _sites(base: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The norms whose outputs are read by weights that can absorb a map, keyed like `channel_subset_state_dict`'s
    ``reader_maps`` (the final norm only when the LM head is not tied to the embeddings)."""
    sites = {}
    for i, layer in enumerate(base.model.layers):
        sites[f"{i}_input_layernorm"] = layer.input_layernorm
        sites[f"{i}_post_attention_layernorm"] = layer.post_attention_layernorm
    if not base.config.tie_word_embeddings:
        sites["final"] = base.model.norm
    return sites


@torch.no_grad()
def reader_maps(
    base: PreTrainedModel, keep: torch.Tensor, batches: Batches, damping: float = 0.01
) -> dict[str, torch.Tensor]:
    """Per norm site, the ``hidden × kept`` float32 map ``M`` such that a reader's weight ``W`` becomes ``W @ M`` in
    the smaller model keeping channels `keep` (sorted indices); fitted on the calibration `batches` of a
    Llama-family `base` (``input_ids``, optionally ``attention_mask``). See the module docstring."""
    if not batches:
        raise ValueError("Compensation needs at least one calibration batch.")
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping!r}.")
    keep = keep.cpu()
    hidden = base.config.hidden_size
    sites = _sites(base)
    cross = {name: torch.zeros(hidden, len(keep), dtype=torch.float64) for name in sites}  # Σ y y′ᵀ
    gram = {name: torch.zeros(len(keep), len(keep), dtype=torch.float64) for name in sites}  # Σ y′ y′ᵀ
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def record(module, args, output):
            x = args[0].detach().float().reshape(-1, hidden).cpu()
            y = output.detach().float().reshape(-1, hidden).cpu()
            if current["mask"] is not None:
                tokens = current["mask"].reshape(-1).bool().cpu()
                x, y = x[tokens], y[tokens]
            # the smaller model's norm on the kept channels: the same mean over d with the removed channels at 0
            x_kept = x[:, keep]
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            scale = torch.rsqrt(x_kept.pow(2).sum(-1, keepdim=True) / hidden + eps)
            y_small = (x_kept * scale * module.weight.detach().float().cpu()[keep]).double()
            cross[name].add_(y.double().t() @ y_small)
            gram[name].add_(y_small.t() @ y_small)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in sites.items()]
    was_training = base.training
    base.eval()
    try:
        for batch in batches:
            current["mask"] = batch.get("attention_mask")
            base(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()
        base.train(was_training)
    maps = {}
    for name in sites:
        g = gram[name]
        g = g + damping * torch.diagonal(g).mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=g.dtype)
        maps[name] = torch.linalg.solve(g, cross[name].t()).t().float()  # Σ y y′ᵀ (Σ y′ y′ᵀ + λI)⁻¹
    return maps
