"""Perplexity of a causal LM on text (exp of the mean token negative log-likelihood), and `run_lm_eval`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .lm_eval_bridge import run_lm_eval

__all__ = ["perplexity", "run_lm_eval"]


def _token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        if text and text.strip():
            stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + separator)
    return stream


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str] | Dataset,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    disable_tqdm: bool = False,
) -> dict[str, float | int]:
    """Perplexity over the texts joined with EOS, in windows of `seq_len` tokens.

    With ``stride=None`` (default) windows do not overlap. With ``stride < seq_len`` each window after the first
    starts `stride` tokens later and only its last `stride` tokens are scored, each with up to `seq_len` tokens of
    context. `max_tokens` caps how many tokens of the stream are used. Returns the perplexity, the mean NLL, the
    number of scored tokens and the settings.
    """
    if isinstance(texts, Dataset):
        texts = texts["text"]
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in (0, seq_len={seq_len}], got {stride}.")
    stream = _token_stream(texts, tokenizer)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if len(stream) < 2:
        raise ValueError("Perplexity needs at least 2 tokens of text.")
    # (start, end, first scored position) for each window
    spans = []
    for start in range(0, len(stream) - 1, stride):
        end = min(start + seq_len, len(stream))
        spans.append((start, end, 0 if start == 0 else seq_len - stride))
        if end == len(stream):
            break
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for i in tqdm(range(0, len(spans), batch_size), desc="perplexity", disable=disable_tqdm):
            batch = spans[i : i + batch_size]
            width = max(end - start for start, end, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for row, (start, end, first) in enumerate(batch):
                ids[row, : end - start] = torch.tensor(stream[start:end])
                attention[row, : end - start] = 1
                labels[row, max(first, 1) : end - start] = ids[row, max(first, 1) : end - start]
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(device)
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                  ignore_index=-100, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "num_tokens": total_tokens,
        "seq_len": seq_len,
        "stride": stride,
    }
