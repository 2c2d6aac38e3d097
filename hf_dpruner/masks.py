"""Scores -> keep-masks (per matrix, per row, N:M), applying them, and 1-bit packing for checkpoints."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import DPrunerConfig
from .targets import PrunableWeight, module_type
from .utils import file_sha256

MASKS_NAME = "pruning_masks.safetensors"
_NON_FINITE_REMEDY = (
    "check the calibration data, and score in float32 or bfloat16 (float16 overflows to Inf on large activations)"
)


def check_finite_scores(scores: Mapping[str, torch.Tensor], source: str, remedy: str = _NON_FINITE_REMEDY) -> None:
    """Raise ValueError naming the first score tensor that holds NaN or Inf (`source` says where it came from)."""
    for name, score in scores.items():
        finite = torch.isfinite(score)
        if not finite.all():
            nan = int(torch.isnan(score).sum())
            raise ValueError(
                f"{source}: the importance scores of {name} hold NaN or Inf ({nan} NaN, {int((~finite).sum()) - nan} "
                f"Inf), so no mask can be computed from them; {remedy}."
            )


def topk_mask(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep-mask over the last dim: prune the `num_pruned` lowest scores of every row (ties: lowest index first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if num_pruned > 0:
        order = torch.argsort(scores.float(), dim=-1, stable=True)
        keep.scatter_(-1, order[..., :num_pruned], False)
    return keep


def lowest_k_mask(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Keep-mask over a flat tensor pruning its `num_pruned` lowest scores; same result as `topk_mask` (ties:
    lowest index first) via a k-th value selection, which is much faster than sorting large matrices."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if num_pruned <= 0:
        return keep
    scores = scores.float()
    threshold = torch.kthvalue(scores, num_pruned).values
    keep[scores < threshold] = False
    missing = num_pruned - int((~keep).sum())
    keep[torch.nonzero(scores == threshold).flatten()[:missing]] = False
    return keep


def compute_mask(
    scores: torch.Tensor, sparsity: float, sparsity_type: str, input_dim: int = 1, name: str = "weight"
) -> torch.Tensor:
    """Keep-mask (True = keep) for one weight from its importance scores (higher = more important).

    ``unstructured``: the ``round(sparsity * numel)`` lowest scores of the matrix are pruned;
    ``row``: the same count in every output row; ``"N:M"``: N kept in every M consecutive inputs.
    `input_dim` is the dim of the weight that indexes inputs (1 for nn.Linear, 0 for Conv1D); `name` (the
    parameter's) goes into the error raised for NaN or Inf scores.
    """
    check_finite_scores({name: scores}, "Mask computation")
    out_in = scores.t() if input_dim == 0 else scores
    if sparsity_type == "unstructured":
        keep = lowest_k_mask(out_in.reshape(-1), round(sparsity * out_in.numel())).reshape(out_in.shape)
    elif sparsity_type == "row":
        keep = topk_mask(out_in, round(sparsity * out_in.shape[1]))
    else:
        n, m = (int(x) for x in sparsity_type.split(":"))
        rows, cols = out_in.shape
        if cols % m:
            raise ValueError(f"N:M sparsity {sparsity_type} needs the input size ({cols}) to be a multiple of {m}.")
        keep = topk_mask(out_in.reshape(rows, cols // m, m), m - n).reshape(rows, cols)
    return keep.t() if input_dim == 0 else keep


def compute_masks(
    scores: Mapping[str, torch.Tensor],
    weights: Mapping[str, PrunableWeight],
    config: DPrunerConfig,
    disable_tqdm: bool = True,
) -> dict[str, torch.Tensor]:
    """Keep-masks for every scored weight, honouring `sparsity_type` and `layer_sparsity`."""
    return {
        name: compute_mask(
            score, config.sparsity_for(name), config.sparsity_type, weights[name].input_dim, name
        ).to(weights[name].weight.device)
        for name, score in tqdm(scores.items(), desc="masks", disable=disable_tqdm)
    }


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set every pruned weight to exactly zero (in place)."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"Mask {name!r} names no parameter of {type(model).__name__}.")
        param = params[name]
        param.mul_(keep.to(device=param.device, dtype=param.dtype))


def sparsity_report(masks: Mapping[str, torch.Tensor]) -> dict:
    """Achieved sparsity: overall, per module type and per matrix (fractions of pruned weights)."""
    per_matrix = {name: 1.0 - keep.float().mean().item() for name, keep in masks.items()}
    totals: dict[str, list[int]] = {}
    for name, keep in masks.items():
        pruned_total = totals.setdefault(module_type(name), [0, 0])
        pruned_total[0] += keep.numel() - int(keep.sum())
        pruned_total[1] += keep.numel()
    pruned = sum(p for p, _ in totals.values())
    total = sum(t for _, t in totals.values())
    return {
        "overall": pruned / total if total else 0.0,
        "num_pruned": pruned,
        "num_targeted": total,
        "per_module_type": {k: p / t for k, (p, t) in sorted(totals.items())},
        "per_matrix": per_matrix,
    }


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """1 bit per weight: a flat uint8 tensor (numpy bit order, big-endian within a byte)."""
    return torch.from_numpy(np.packbits(keep.detach().cpu().numpy().astype(bool).reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"Packed mask of {packed.numel()} {packed.dtype} bytes does not fit shape {tuple(shape)}.")
    bits = np.unpackbits(packed.numpy(), count=numel)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write bit-packed masks with their shapes in the safetensors metadata (key ``shapes``, JSON).

    The bytes depend only on the masks, so equal masks give an equal sha256: hence a single metadata key (safetensors
    writes several in no fixed order) and sorted names."""
    shapes = {name: list(keep.shape) for name, keep in sorted(masks.items())}
    packed = {name: pack_mask(keep) for name, keep in masks.items()}
    save_file(packed, str(path), metadata={"shapes": json.dumps(shapes)})


def _recorded_shapes(metadata: Mapping[str, str], path: Path) -> dict[str, tuple[int, ...]]:
    """The ``shapes`` metadata of a mask file: parameter name -> shape, each a list of non-negative ints."""
    if "shapes" not in metadata:
        raise ValueError(f"{path} is not an hf_dpruner mask file (no 'shapes' metadata).")
    try:
        shapes = json.loads(metadata["shapes"])
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: the 'shapes' metadata is not valid JSON ({err}).") from err
    if not isinstance(shapes, dict):
        raise ValueError(f"{path}: the 'shapes' metadata must map parameter names to shapes, got {shapes!r:.80}.")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape
        ):
            raise ValueError(f"{path}: the recorded shape of {name} must be a list of sizes >= 0, got {shape!r:.80}.")
    return {name: tuple(shape) for name, shape in shapes.items()}


def _unpack_entry(packed: torch.Tensor, shape: tuple[int, ...], name: str, path: Path) -> torch.Tensor:
    try:
        return unpack_mask(packed, shape)
    except ValueError as err:
        raise ValueError(f"{path}: the mask of {name} is malformed ({err}). Re-save or re-download the file.") from err


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read masks written by `save_masks`; a truncated or foreign file gives a clear ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No mask file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = _recorded_shapes(handle.metadata() or {}, path)
            keys = set(handle.keys())
            if keys != set(shapes):
                raise ValueError(f"{path}: tensors {sorted(keys ^ set(shapes))} lack a recorded shape or data.")
            return {name: _unpack_entry(handle.get_tensor(name), shapes[name], name, path) for name in sorted(keys)}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"Cannot read the mask file {path} ({err}); it is corrupt or truncated. Re-save or re-download it."
        ) from err


def verify_masks_checksum(path: str | Path, expected: str | None, recorded_in: str | Path) -> None:
    """Raise ValueError if the mask file's sha256 differs from `expected` (the hash in `recorded_in`); ``None``
    (a checkpoint saved before checksums were recorded) skips the check."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"The mask file {path} has sha256 {actual}, but {recorded_in} records {expected}: the file is corrupt or "
            "truncated, or comes from another save. Re-save the checkpoint, or re-download it (force_download=True)."
        )
