"""Least-squares compensation of the readers of the residual stream after hidden channels are removed.

Removing hidden channels changes what every RMSNorm on the residual stream hands to the layers that read it
(q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``, an untied LM head after the final
norm): the removed channels are gone and the norm's scale is computed without them. For each norm, with ``y`` its
dense output and ``y′`` the smaller model's output on the same residual input (kept channels only), a reader ``W``
is replaced by the ``W′`` that best reproduces its dense outputs on the calibration tokens:

    W′ = argmin Σ ‖W y − W′ y′‖² = W · Σ y y′ᵀ · (Σ y′ y′ᵀ + λ I)⁻¹,

with ``λ = damping · mean diag(Σ y′ y′ᵀ)``. A first fit takes ``y′`` from the dense model's residual stream (one
forward pass); a refit takes it from the compensated smaller model's own residual stream, so the readers also
absorb the errors of the layers before them. Without compensation the map is the plain column selection
``W[:, keep]``.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .calibration import Batches, CalibrationBatch, calibration_pass


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


def _kept_norm_output(module: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor, hidden: int) -> torch.Tensor:
    """The smaller model's RMSNorm output on the kept channels of the residual `x` (tokens × hidden): the dense
    norm's formula with the removed channels at 0 (what `channel_subset_state_dict`'s rescaled norm computes)."""
    x_kept = x[:, keep]
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    scale = torch.rsqrt(x_kept.pow(2).sum(-1, keepdim=True) / hidden + eps)
    return x_kept * scale * module.weight.detach().float().cpu()[keep]


@torch.no_grad()
def reader_maps(
    base: PreTrainedModel,
    keep: torch.Tensor,
    batches: Batches,
    damping: float = 0.01,
    small: PreTrainedModel | None = None,
) -> dict[str, torch.Tensor]:
    """Per norm site, the ``hidden × kept`` float32 map ``M`` such that a reader's weight ``W`` becomes ``W @ M`` in
    the smaller model keeping channels `keep` (sorted indices); fitted on the calibration `batches` of a
    Llama-family `base` (``input_ids``, optionally ``attention_mask``). See the module docstring.

    With `small` (a smaller model built from `base` and `keep`, e.g. by a first fit), ``y′`` is that model's own norm
    output on its own residual stream, so the fit also corrects the errors of the layers before (the dense outputs
    ``y`` stay the targets)."""
    if not batches:
        raise ValueError("Compensation needs at least one calibration batch.")
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping!r}.")
    keep = keep.cpu()
    hidden = base.config.hidden_size
    sites = _sites(base)
    small_sites = _sites(small) if small is not None else {}
    cross = {name: torch.zeros(hidden, len(keep), dtype=torch.float64) for name in sites}  # Σ y y′ᵀ
    gram = {name: torch.zeros(len(keep), len(keep), dtype=torch.float64) for name in sites}  # Σ y′ y′ᵀ
    dense_out: dict[str, torch.Tensor] = {}
    small_out: dict[str, torch.Tensor] = {}
    current = CalibrationBatch()

    def dense_hook(name: str):
        def record(module, args, output):
            dense_out[name] = current.tokens(output, hidden)
            if small is None:
                small_out[name] = _kept_norm_output(module, current.tokens(args[0], hidden), keep, hidden)

        return record

    def small_hook(name: str):
        def record(module, args, output):
            small_out[name] = current.tokens(output, len(keep))

        return record

    def accumulate() -> None:
        for name in sites:
            y, y_small = dense_out.pop(name), small_out.pop(name)  # per batch in float32, summed in float64
            cross[name].add_(y.t() @ y_small)
            gram[name].add_(y_small.t() @ y_small)

    handles = [module.register_forward_hook(dense_hook(name)) for name, module in sites.items()]
    handles += [module.register_forward_hook(small_hook(name)) for name, module in small_sites.items()]
    calibration_pass([base] + ([small] if small is not None else []), batches, current, handles, accumulate)
    maps = {}
    for name in sites:
        g = gram[name]
        g = g + damping * torch.diagonal(g).mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=g.dtype)
        maps[name] = torch.linalg.solve(g, cross[name].t()).t().float()  # Σ y y′ᵀ (Σ y′ y′ᵀ + λI)⁻¹
    return maps
