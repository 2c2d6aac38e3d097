"""Fixtures: tiny random causal LMs (seeded), random token windows, a tiny model folder. The helpers behind them are
in testing_utils.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel

import hf_dpruner.hub

from testing_utils import (
    ARCHS,
    FakeHfApi,
    build_tiny,
    make_batches,
    make_windows,
    save_tiny_model_folder,
)


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


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama and its word-level tokenizer saved in a folder."""
    folder = tmp_path / "tiny"
    save_tiny_model_folder(folder)
    return folder


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(hf_dpruner.hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(hf_dpruner.hub, "get_token", lambda: "hf_test_token")
    return FakeHfApi.calls
