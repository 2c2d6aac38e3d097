"""Which MLP neurons to remove when ``down_proj`` is refitted afterwards: greedy Optimal-Brain-Surgeon selection.

Removing neuron ``j`` (column ``j`` of ``down_proj``'s weight ``W``) and refitting the kept columns by least squares
on the calibration inputs ``h`` (Gram matrix ``G = Σ h hᵀ + λI``) raises the output error by

    ‖W[:, j]‖² / [G⁻¹]_jj,

the structured form of OBS (as in ZipLM / SlimGPT). The greedy loop removes the neuron of least cost, applies the
optimal update of the remaining columns, ``W ← W − W[:, j] · G⁻¹[j, :] / G⁻¹_jj``, and downdates ``G⁻¹`` to the
remaining neurons; the final ``W`` on the kept columns is the least-squares refit of ``prune_mlp_neurons``'s
``compensate=True`` for that set. Unlike the energy score ``E[h_j²] · ‖W[:, j]‖²``, the cost accounts for how well
the other neurons can stand in for the removed one.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def obs_neuron_selection(
    gram: torch.Tensor, weight: torch.Tensor, num_removed: int, damping: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept neurons (sorted indices) and the refitted ``down_proj`` weight on them (``out × kept``, in
    `weight`'s dtype), from the ``Σ h hᵀ`` `gram` of ``down_proj``'s inputs and its `weight` (``out × neurons``).

    Example:
        >>> h = torch.randn(256, 8, dtype=torch.float64)
        >>> keep, refit = obs_neuron_selection(h.t() @ h, torch.randn(4, 8), 3)
        >>> keep.shape, refit.shape
        (torch.Size([5]), torch.Size([4, 5]))
    """
    size = gram.shape[0]
    if gram.shape != (size, size) or weight.shape[1] != size:
        raise ValueError(f"gram must be neurons × neurons and weight out × neurons, got {tuple(gram.shape)} and "
                         f"{tuple(weight.shape)}.")
    if not 0 <= num_removed < size:
        raise ValueError(f"num_removed must be in [0, {size}), got {num_removed!r}.")
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping!r}.")
    g = gram.double().cpu()
    g = g + damping * torch.diagonal(g).mean().clamp_min(1e-12) * torch.eye(size, dtype=g.dtype)
    inverse = torch.linalg.inv(g)
    w = weight.detach().double().cpu().clone()
    alive = torch.ones(size, dtype=torch.bool)
    for _ in range(num_removed):
        cost = w.pow(2).sum(0) / torch.diagonal(inverse).clamp_min(1e-30)
        cost[~alive] = float("inf")
        j = int(cost.argmin())
        row, pivot = inverse[j].clone(), float(inverse[j, j])
        w.addr_(w[:, j].clone(), row, alpha=-1.0 / pivot)  # the optimal update of the other columns
        inverse.addr_(row, row, alpha=-1.0 / pivot)  # G⁻¹ of the remaining neurons (row/column j become 0)
        alive[j] = False
        w[:, j] = 0.0
    keep = alive.nonzero().flatten()
    return keep, w[:, keep].to(weight.dtype).contiguous()
