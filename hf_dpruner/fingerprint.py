"""Fingerprints of what a stage's output depends on (model, calibration windows, settings), so that a cached
general importance or a domain-pass checkpoint from another run is refused instead of silently reused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from datasets import Dataset

CHUNKS_PER_TENSOR, CHUNK = 16, 256  # evenly spaced runs of contiguous values: few memory pages touched

# TrainingArguments fields that change the domain pass's gradients or their order.
TRAINING_FIELDS = (
    "seed", "data_seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
    "optim", "optim_args", "per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16",
    "gradient_checkpointing", "average_tokens_across_devices",
)


def digest(value: Any) -> str:
    """sha256 (hex, 16 digits) of a JSON-serializable value, keys sorted."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes, dtypes and a sample of every parameter and buffer: 16 evenly spaced runs of 256 values.

    A sample, so that it costs milliseconds on any model size and reads few pages of a memory-mapped checkpoint:
    any different checkpoint, fine-tune or pruned copy changes it; a change of a few individual weights may not."""
    hasher = hashlib.sha256()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        starts = torch.linspace(0, max(flat.numel() - CHUNK, 0), CHUNKS_PER_TENSOR).long().unique().tolist()
        sample = torch.cat([flat[start:start + CHUNK] for start in starts])
        hasher.update(sample.float().cpu().numpy().tobytes())
    return hasher.hexdigest()[:16]


def windows_fingerprint(dataset: Dataset | None) -> str | None:
    """sha256 of the token windows (``input_ids`` and, when present, ``attention_mask``) of a calibration set."""
    if dataset is None:
        return None
    hasher = hashlib.sha256()
    for column in ("input_ids", "attention_mask"):
        if column in dataset.column_names:
            for row in dataset[column]:
                hasher.update(np.asarray(row, dtype=np.int64).tobytes())
                hasher.update(b"|")
    return hasher.hexdigest()[:16]


def training_fingerprint(args: Any) -> str:
    """Digest of the TrainingArguments fields that shape the domain pass (`TRAINING_FIELDS`)."""
    return digest({name: getattr(args, name, None) for name in TRAINING_FIELDS})


def differing_parts(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Keys of `expected` whose values `found` lacks or holds differently (keys whose expected value is None,
    i.e. unknown in this run, are not compared)."""
    return [key for key, value in expected.items() if value is not None and found.get(key) != value]
