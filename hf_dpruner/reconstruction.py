"""Tensor math of the reconstruction recipe: a calibration Hessian that blends domain and general inputs, and
block-wise reconstruction (train a pruned block's kept weights to reproduce the dense block's outputs).

Both are functions of tensors and modules; the orchestration (which block, which inputs) lives in
`methods.dual_blockwise`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn


def blended_hessian(
    domain: tuple[torch.Tensor, int], general: tuple[torch.Tensor, int] | None, general_weight: float
) -> torch.Tensor:
    """``H = 2 · ((1 − a) · X_dᵀX_d / n_d + a · X_gᵀX_g / n_g)`` from the ``(XᵀX, token count)`` of each text.

    Each part is normalised by its own token count, so `general_weight` (``a`` in [0, 1]) is the share of the
    general text whatever the two calibration sets' sizes; ``a = 0`` (or no general part) is SparseGPT's
    ``(2/n) XᵀX`` on the domain text exactly.
    """
    if not 0.0 <= general_weight <= 1.0:
        raise ValueError(f"general_weight must be in [0, 1], got {general_weight!r}.")
    gram, count = domain
    hessian = gram * (2.0 / count)
    if general is None or general_weight == 0.0:
        return hessian
    general_gram, general_count = general
    return hessian * (1.0 - general_weight) + general_gram * (2.0 * general_weight / general_count)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (CUDA with bfloat16 support; a CPU with AVX512-BF16 or AMX),
    so that autocasting to it is faster than float32 rather than emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a reconstruction `precision` ('auto', 'float32', 'bfloat16') on `device`; None is
    float32 (no autocast)."""
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    if precision in ("auto", "float32"):
        return None
    raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}.")


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to `dtype` on `device`'s type; disabled (plain float32) when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def reconstruct_block(
    block: nn.Module,
    inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
    targets: Sequence[torch.Tensor],
    masks: Mapping[nn.Parameter, torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_weights: Sequence[float] | None = None,
    anchor: Callable[[], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    measure: bool = True,
    autocast: torch.dtype | None = None,
) -> tuple[float, float] | None:
    """Train the masked parameters of `block` so that ``block(hidden, *args, **kwargs)`` reproduces `targets`.

    Args:
        block: a decoder block; only the parameters in `masks` are trained (the others are left untouched).
        inputs: one ``(hidden states, args, kwargs)`` per calibration batch (the pruned model's block inputs).
        targets: the dense block's outputs for the same batches (the dense model's own trajectory).
        masks: parameter -> bool keep-mask of the same shape; pruned entries stay exactly 0.
        epochs: passes over the batches (in a shuffled order, one Adam step per batch).
        lr: Adam learning rate.
        batch_weights: weight of each batch's mean squared error in the loss (default 1 each).
        anchor: optional extra loss term (e.g. a penalty that keeps important weights near their values).
        generator: for the batch order (reproducible runs).
        measure: measure the errors (two more passes over the batches); False returns None, for callers that
            run the block on the same inputs afterwards anyway (see `output_error`).
        autocast: run the training passes' forward and backward autocast to this dtype (e.g. ``torch.bfloat16``,
            see `autocast_dtype`); the parameters, the optimizer state and the loss stay in their own dtype.

    Returns:
        ``(error before, error after)``: the weighted mean squared error over all batches, relative to the
        targets' weighted mean square, measured before the first and after the last step.
    """
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} input batches but {len(targets)} targets.")
    params = list(masks)
    weights = list(batch_weights) if batch_weights is not None else [1.0] * len(inputs)
    if len(weights) != len(inputs):
        raise ValueError(f"{len(weights)} batch weights for {len(inputs)} batches.")
    flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(p in masks)
    was_training = block.training
    block.eval()  # no dropout: reproduce the deterministic outputs
    try:
        before = relative_error(block, inputs, targets, weights) if measure else None
        if epochs > 0 and params:
            optimizer = torch.optim.Adam(params, lr=lr)
            total = sum(weights) / len(weights)
            with torch.enable_grad():
                for _ in range(epochs):
                    for i in torch.randperm(len(inputs), generator=generator).tolist():
                        hidden, args, kwargs = inputs[i]
                        with autocast_to(hidden.device, autocast):
                            out = _first(block(hidden, *args, **kwargs))
                        loss = (out.float() - targets[i].float()).pow(2).mean() * (weights[i] / total)
                        if anchor is not None:
                            loss = loss + anchor()
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        with torch.no_grad():
                            for p, keep in masks.items():
                                p.mul_(keep)
            del optimizer
        after = relative_error(block, inputs, targets, weights) if measure else None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        block.train(was_training)
    return (before, after) if measure else None


@torch.no_grad()
def relative_error(
    block: nn.Module,
    inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
    targets: Sequence[torch.Tensor],
    batch_weights: Sequence[float] | None = None,
) -> float:
    """Weighted ``Σ ||block(x) − y||² / Σ ||y||²`` over the batches (0 = the targets exactly); one batch's output
    at a time."""
    weights = list(batch_weights) if batch_weights is not None else [1.0] * len(inputs)
    outputs = (_first(block(hidden, *args, **kwargs)) for hidden, args, kwargs in inputs)
    return output_error(outputs, targets, weights)


@torch.no_grad()
def output_error(
    outputs: Iterable[torch.Tensor], targets: Sequence[torch.Tensor], batch_weights: Sequence[float] | None = None
) -> float:
    """Weighted ``Σ ||output − target||² / Σ ||target||²`` over the batches (0 = the targets exactly)."""
    weights = list(batch_weights) if batch_weights is not None else [1.0] * len(targets)
    error = norm = 0.0
    for out, target, weight in zip(outputs, targets, weights, strict=True):
        error += weight * float((out.float() - target.float()).pow(2).sum())
        norm += weight * float(target.float().pow(2).sum())
    return error / max(norm, 1e-30)
