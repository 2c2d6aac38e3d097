"""SparseGPT for one weight matrix (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot").

Columns (inputs) are eliminated left to right in blocks of 128. Within a block, the mask is chosen from the
OBS saliency ``w² / d²`` of the *current* (already compensated) weights, ``d`` being the diagonal of the upper
Cholesky factor ``U`` of ``H⁻¹`` (``d_q² = [H_F⁻¹]_qq`` for the columns F not yet eliminated). Each column is
then pruned and its error spread over the remaining columns with the row ``U[q, q:]`` (the OBS update), within
the block at once and beyond it lazily, one matrix product per block.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from ..config import DPrunerConfig, parse_n_m
from ..masks import lowest_k_mask, topk_mask
from ..targets import PrunableWeight

logger = logging.get_logger(__name__)

BLOCK_SIZE = 128



def inverse_hessian_cholesky(
    hessian: torch.Tensor,
    damping: float,
    name: str = "a weight",
    increased_damping: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (fp64) and the boolean mask of dead inputs.

    ``λ = damping · mean(diag(H))``, multiplied by 10 up to four times if the factorisation fails; then a warning
    names the weight (`name`, its parameter name) and the damping used, also recorded as
    ``increased_damping[name]`` when a dict is given. Dead inputs (zero diagonal: they never fired on the
    calibration data) get a unit diagonal so the factorisation exists; their rows and columns of H are zero, so they
    exchange no compensation with the other inputs.
    """
    h = hessian.detach().double().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = diag.mean()
    for attempt in range(5):
        used = damping * 10**attempt
        chol, info = torch.linalg.cholesky_ex(h + used * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0:
                if attempt:
                    logger.warning(
                        f"The calibration Hessian of {name} is not positive definite with damping {damping:g}; "
                        f"damping {used:g} (x{10**attempt}) was used instead, so its importance and weight updates "
                        "rest on a more damped, less accurate Hessian."
                    )
                    if increased_damping is not None:
                        increased_damping[name] = used
                return upper, dead
    raise ValueError(
        f"The calibration Hessian of {name} is not positive definite even with damping {damping * 10**4:g} "
        f"(10000x {damping:g}); check the calibration data for NaN/Inf activations."
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    sparsity_type: str = "unstructured",
    damping: float = 0.01,
    block_size: int = BLOCK_SIZE,
    name: str = "a weight",
    increased_damping: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and reconstruct one weight; returns ``(new weight, keep-mask)``, both (out, in) like `weight`.

    Args:
        weight: the weight as (out_features, in_features) (use `PrunableWeight.as_out_in` for Conv1D).
        hessian: ``H = (2/n) Σ x xᵀ`` over the n calibration inputs of the layer, (in, in).
        sparsity: fraction of weights pruned (ignored for N:M).
        sparsity_type: ``"unstructured"``: every block prunes its share of the matrix, ``round(sparsity ·
            out · in)`` weights in total, comparing all rows; ``"row"``: every row prunes the same share of
            each block, ``round(sparsity · in)`` per row in total; ``"N:M"``: N kept of every M consecutive
            inputs of a row, chosen when the group's first column is reached.
        damping: fraction of the mean Hessian diagonal added to the diagonal (`DPrunerConfig.damping`).
        block_size: columns per block (rounded down to a multiple of M for N:M).
        name, increased_damping: the weight's parameter name, for the warning when its Hessian needs more damping,
            and a dict that then records the damping used (see `inverse_hessian_cholesky`).

    Pruned entries of the returned weight are exactly 0; it has the dtype of `weight` (computed in fp32).
    Inputs that never fired cost nothing to prune on the calibration data: their saliency is 0, so they are
    pruned first (weights of dead inputs that the budget keeps are left unchanged).
    """
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"The Hessian has shape {tuple(hessian.shape)}; the weight {tuple(weight.shape)} needs "
                         f"({cols}, {cols}).")
    n_m = parse_n_m(sparsity_type)
    if n_m is not None:
        n, m = n_m
        if cols % m:
            raise ValueError(f"N:M sparsity {sparsity_type} needs the input size ({cols}) to be a multiple of {m}.")
        block_size = max(m, block_size // m * m)
    elif sparsity_type not in ("unstructured", "row"):
        raise ValueError(f"sparsity_type must be 'unstructured', 'row' or 'N:M' (e.g. '2:4'), got {sparsity_type!r}.")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")

    upper, dead = inverse_hessian_cholesky(hessian, damping, name, increased_damping)
    upper = upper.to(device=weight.device, dtype=torch.float32)
    alive = (~dead).to(device=weight.device, dtype=torch.float32)
    inv_d2 = alive / torch.diagonal(upper) ** 2  # saliency = w² · inv_d2, 0 for dead inputs
    w = weight.detach().float().clone()
    keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        u = upper[start:end, start:end]
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_keep = keep[:, start:end]  # a view: filled in place
        if n_m is None:
            block_keep.copy_(_block_mask(block**2 * inv_d2[start:end], sparsity, sparsity_type, rows, start, end))
        for i in range(end - start):
            if n_m is not None and i % m == 0:
                group = block[:, i : i + m] ** 2 * inv_d2[start + i : start + i + m]
                block_keep[:, i : i + m] = topk_mask(group, m - n)
            column = block[:, i]
            kept = torch.where(block_keep[:, i], column, torch.zeros_like(column))
            errors[:, i] = (column - kept) / u[i, i]
            block[:, i:].addr_(errors[:, i], u[i, i:], alpha=-1.0)
            block[:, i] = kept  # exactly the kept values (0 where pruned), free of rounding from the update
        w[:, start:end] = block
        w[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1.0)
    return w.to(weight.dtype), keep


@torch.no_grad()
def sparsegpt_prune_weight(
    weight: PrunableWeight, hessian: torch.Tensor, config: DPrunerConfig, increased_damping: dict[str, float]
) -> torch.Tensor:
    """Prune one target weight in place with SparseGPT on its input Hessian (``2XᵀX/n``, or a blend): mask selection
    and OBS update at ``config.sparsity_for(name)`` in ``config.sparsity_type``; Hessians that need more damping than
    ``config.damping`` are noted in `increased_damping`. Returns the keep-mask in the weight's layout."""
    new_weight, keep = sparsegpt_prune(
        weight.as_out_in(weight.weight.detach()), hessian, config.sparsity_for(weight.name), config.sparsity_type,
        config.damping, name=weight.name, increased_damping=increased_damping,
    )
    # as_out_in is a transpose for Conv1D (its own inverse) and the identity for nn.Linear: back to the layout
    weight.weight.copy_(weight.as_out_in(new_weight))
    return weight.as_out_in(keep).contiguous()


def _block_mask(saliency: torch.Tensor, sparsity: float, sparsity_type: str, rows: int, start: int, end: int):
    """Keep-mask of one block. Counts are cumulative differences, so the matrix (``"unstructured"``) or each
    row (``"row"``) prunes exactly the count that `masks.compute_mask` would."""
    if sparsity_type == "row":
        return topk_mask(saliency, round(sparsity * end) - round(sparsity * start))
    num_pruned = round(sparsity * (rows * end)) - round(sparsity * (rows * start))
    return lowest_k_mask(saliency.reshape(-1), num_pruned).reshape(saliency.shape)
