"""The scorer interface and the safetensors cache of importance scores."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..masks import check_finite_scores
from ..targets import PrunableWeight

_FLOAT16_NOTE = "in float32 or bfloat16 (float16 overflows to Inf on large activations)"


class ImportanceScorer(ABC):
    """Scores every prunable weight of a model from calibration batches."""

    name: str = ""

    @abstractmethod
    def score(
        self,
        model: torch.nn.Module,
        weights: Mapping[str, PrunableWeight],
        batches: Sequence[dict[str, torch.Tensor]],
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Return an fp32 score tensor shaped like each weight; higher means more important."""


def save_importance(
    scores: Mapping[str, torch.Tensor],
    path: str | Path,
    description: Mapping | None = None,
    fingerprint: Mapping | None = None,
) -> None:
    """Write scores (in their dtype) to a safetensors file atomically, with a JSON `description` and, to refuse a
    stale cache later, the `fingerprint` of what they were computed from in the metadata."""
    path = Path(path)
    check_finite_scores(scores, f"Not caching importance to {path}", f"recompute them {_FLOAT16_NOTE}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {name: score.detach().to("cpu").contiguous() for name, score in scores.items()}  # in their dtype
    metadata = {"description": json.dumps(dict(description or {}), sort_keys=True)}
    if fingerprint is not None:
        metadata["fingerprint"] = json.dumps(dict(fingerprint), sort_keys=True)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def importance_fingerprint(path: str | Path) -> dict | None:
    """The fingerprint stored by `save_importance` in `path`, ``None`` if the file has none."""
    return _metadata_object(path, "fingerprint")


def importance_description(path: str | Path) -> dict:
    """The description stored by `save_importance` in `path` (``{}`` if the file has none)."""
    return _metadata_object(path, "description") or {}


def _metadata_object(path: str | Path, key: str) -> dict | None:
    """The JSON object under `key` in the safetensors metadata of `path`, ``None`` if absent."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(key)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"Cannot read importance file {path} ({err}); delete it to recompute.") from err
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"Importance file {path} has a corrupt {key} ({err}); delete it to recompute.") from err
    if not isinstance(value, dict):
        raise ValueError(f"Importance file {path} has a corrupt {key}; delete it to recompute.")
    return value


def load_importance(path: str | Path, weights: Mapping[str, PrunableWeight] | None = None) -> dict[str, torch.Tensor]:
    """Read cached scores; with `weights`, check that names and shapes match the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No importance file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            scores = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"Cannot read importance file {path} ({err}); delete it to recompute.") from err
    for name, score in scores.items():
        if not score.is_floating_point():
            raise ValueError(f"Importance file {path}: {name} holds {score.dtype}, not floats; delete it to recompute.")
    check_finite_scores(scores, f"Importance file {path}", f"delete the file to recompute it {_FLOAT16_NOTE}")
    if weights is not None:
        missing, extra = set(weights) - set(scores), set(scores) - set(weights)
        if missing or extra:
            raise ValueError(
                f"Importance file {path} does not match the model's prunable weights: missing "
                f"{sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}, extra {sorted(extra)[:3]}. "
                "It was computed for another model or target_modules; delete it to recompute."
            )
        for name, weight in weights.items():
            if tuple(scores[name].shape) != tuple(weight.weight.shape):
                raise ValueError(
                    f"Importance file {path}: {name} has shape {tuple(scores[name].shape)}, the model's weight "
                    f"{tuple(weight.weight.shape)}. Delete the file to recompute."
                )
    return scores
