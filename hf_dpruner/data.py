"""Calibration text -> fixed-length token windows, from strings, local files, bundled corpora or `datasets`."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _read_records(path: Path, text_column: str) -> list[str]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else data.get("data", [])
    else:
        from datasets import load_dataset

        rows = load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    texts = []
    for row in rows:
        if isinstance(row, str):
            texts.append(row)
        elif text_column in row:
            texts.append(row[text_column])
        else:
            raise ValueError(f"{path}: a record has no {text_column!r} field (fields: {sorted(row)}).")
    return texts


def _read_path(path: Path, text_column: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"Folder {path} holds no {TEXT_SUFFIXES + RECORD_SUFFIXES} files.")
        return [text for file in files for text in _read_path(file, text_column)]
    if path.suffix in TEXT_SUFFIXES:
        return [path.read_text(encoding="utf-8")]
    if path.suffix in RECORD_SUFFIXES:
        return _read_records(path, text_column)
    raise ValueError(f"Unsupported file type {path.suffix!r} for {path}; use {TEXT_SUFFIXES + RECORD_SUFFIXES}.")


def load_texts(source: str | Path | Sequence[str], split: str = "train", text_column: str = "text") -> list[str]:
    """Documents from a list of strings, a local file or folder (one document per .txt file, one per record in
    .jsonl/.json/.parquet/.csv), a bundled corpus name (``general``, ``medical``, ``legal``) or a `datasets` name."""
    if not isinstance(source, (str, Path)):
        texts = list(source)
    elif Path(source).exists():
        texts = _read_path(Path(source), text_column)
    else:
        texts = _load_named(str(source), split, text_column)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"No non-empty text found in {source!r}.")
    return texts


def _load_named(name: str, split: str, text_column: str) -> list[str]:
    from . import corpora

    if name in corpora.CORPORA:
        return corpora.load_corpus_texts(name, split)
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types for a missing/unreachable dataset
        raise ValueError(
            f"{name!r} is neither a local file/folder, a bundled corpus ({', '.join(corpora.CORPORA)}) nor a "
            f"loadable `datasets` dataset: {err}"
        ) from err
    if text_column not in dataset.column_names:
        raise ValueError(f"Dataset {name!r} has no {text_column!r} column (columns: {dataset.column_names}).")
    return list(dataset[text_column])


def build_windows(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, num_samples: int, seed: int = 0
) -> Dataset:
    """`num_samples` windows of exactly `seq_len` tokens: documents are shuffled with `seed`, tokenized in that
    order, joined with the EOS token and cut into consecutive windows (only as many documents as needed are
    tokenized). Raises ValueError when the texts hold fewer than `seq_len` tokens."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("The calibration data is empty: give at least one non-empty text.")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    needed = seq_len * num_samples
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(texts[index], add_special_tokens=False, verbose=False)["input_ids"] + separator)
        if len(stream) >= needed:
            break
    num_windows = min(num_samples, len(stream) // seq_len)
    if num_windows == 0:
        raise ValueError(
            f"The calibration texts hold {len(stream)} tokens, fewer than seq_len={seq_len}: give more text or "
            f"a smaller --seq-len."
        )
    if num_windows < num_samples:
        logger.warning(f"Only {num_windows} windows of {seq_len} tokens available; asked for {num_samples}.")
    windows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(num_windows)]
    return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]})


def describe_source(data: Any) -> str | None:
    """A name for calibration data in the checkpoint's record: the path, corpus or `datasets` name it came from;
    None for in-memory data with no name."""
    if isinstance(data, (str, Path)):
        return str(data)
    if isinstance(data, Dataset):
        return data.info.dataset_name or data.info.builder_name or None
    return None


def prepare_calibration_dataset(
    data: Dataset | Sequence[str] | str | Path,
    tokenizer: PreTrainedTokenizerBase | None,
    seq_len: int,
    num_samples: int,
    seed: int = 0,
    what: str = "calibration data",
) -> Dataset:
    """A tokenized dataset (``input_ids``) is used as given; text (a ``text`` column, strings, files, corpus
    names) is cut into windows with `build_windows`. Checks emptiness and padding needs."""
    if isinstance(data, Dataset) and "input_ids" in data.column_names:
        if len(data) == 0:
            raise ValueError(f"The {what} dataset is empty.")
        lengths = {len(ids) for ids in data["input_ids"]}
        if len(lengths) > 1 and (tokenizer is None or tokenizer.pad_token_id is None):
            raise ValueError(
                f"The {what} has rows of different lengths, which need padding, but the tokenizer has no pad "
                "token. Set `tokenizer.pad_token = tokenizer.eos_token` or give equal-length windows."
            )
        return data
    if tokenizer is None:
        raise ValueError(f"The {what} is text, so a tokenizer is needed: pass `processing_class=tokenizer`.")
    if isinstance(data, Dataset):
        if "text" not in data.column_names:
            raise ValueError(f"The {what} dataset needs an 'input_ids' or a 'text' column; it has {data.column_names}.")
        if len(data) == 0:
            raise ValueError(f"The {what} dataset is empty.")
        texts = list(data["text"])
    else:
        texts = load_texts(data)
    try:
        return build_windows(texts, tokenizer, seq_len, num_samples, seed)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err


@dataclass
class CausalLMCollator:
    """Stacks windows into a batch with ``labels``; pads ragged rows on the right (pad positions get -100)."""

    pad_token_id: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        length = max(len(x) for x in ids)
        if any(len(x) != length for x in ids) and self.pad_token_id is None:
            raise ValueError("Rows of different lengths need a pad token: set `tokenizer.pad_token`.")
        input_ids = torch.full((len(ids), length), self.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
            given = features[row].get("attention_mask")
            attention_mask[row, : len(x)] = torch.as_tensor(given) if given is not None else 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches_to_device(batches, device: torch.device | str) -> list[dict[str, Any]]:
    """Each batch (a dict) with its tensors moved to `device`."""
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} for batch in batches]


def collate_batches(windows: Dataset, batch_size: int, pad_token_id: int | None, device: torch.device | str = "cpu"
                    ) -> list[dict[str, Any]]:
    """`windows` in order, collated into batches of `batch_size` (`CausalLMCollator`), tensors on `device`."""
    loader = DataLoader(windows, batch_size=batch_size, collate_fn=CausalLMCollator(pad_token_id))
    return batches_to_device(loader, device)


def calibration_batches(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """`num_samples` windows of `seq_len` tokens from `texts` (`build_windows`, shuffled with `seed`), in batches of
    `batch_size` on `device`: the calibration batches every pruning method gets."""
    windows = build_windows(texts, tokenizer, seq_len, num_samples, seed)
    return collate_batches(windows, batch_size, tokenizer.pad_token_id, device)

