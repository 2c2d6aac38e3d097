"""Shared fixtures: tiny random causal LMs (seeded) and random token windows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128

_DECODER_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def build_tiny(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny randomly initialised causal LM (`arch` in llama, mistral, qwen2, gpt2), deterministic per seed."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**_DECODER_KWARGS, **overrides}))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**_DECODER_KWARGS, **overrides}))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**_DECODER_KWARGS, **overrides}))
    elif arch == "gpt2":
        kwargs = dict(
            n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, n_inner=128,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
        )
        model = GPT2LMHeadModel(GPT2Config(**{**kwargs, **overrides}))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    return model.eval()


def make_windows(n: int, length: int = 16, seed: int = 0, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    """`n` random token windows of `length` tokens, shape (n, length), int64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, length), generator=generator)


def make_batches(n_batches: int = 2, batch_size: int = 2, length: int = 16, seed: int = 0) -> list[dict]:
    """Calibration batches ``[{"input_ids": (batch_size, length)}]``."""
    ids = make_windows(n_batches * batch_size, length, seed)
    return [{"input_ids": ids[i * batch_size : (i + 1) * batch_size]} for i in range(n_batches)]


ARCHS = ("llama", "mistral", "qwen2", "gpt2")


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    return build_tiny("llama")


@pytest.fixture
def tiny_mistral() -> PreTrainedModel:
    return build_tiny("mistral")


@pytest.fixture
def tiny_qwen2() -> PreTrainedModel:
    return build_tiny("qwen2")


@pytest.fixture
def tiny_gpt2() -> PreTrainedModel:
    return build_tiny("gpt2")


@pytest.fixture(params=ARCHS)
def tiny_model(request) -> PreTrainedModel:
    """Each tiny architecture in turn."""
    return build_tiny(request.param)


@pytest.fixture
def model_factory() -> Callable[..., PreTrainedModel]:
    """``model_factory(arch, seed=0, **config_overrides)``."""
    return build_tiny


@pytest.fixture
def random_windows() -> Callable[..., torch.Tensor]:
    """``random_windows(n, length=16, seed=0, low=0, high=128)`` -> LongTensor (n, length)."""
    return make_windows


@pytest.fixture
def calibration_batches() -> Callable[..., list[dict]]:
    """``calibration_batches(n_batches=2, batch_size=2, length=16, seed=0)`` -> list of input_ids dicts."""
    return make_batches
