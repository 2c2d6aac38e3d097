"""Which weights are prunable: Linear/Conv1D layers of the decoder blocks only."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from hf_dpruner.targets import decoder_layers, find_prunable_weights, module_type

LLAMA_TYPES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_like_models_have_seven_linears_per_layer(model_factory, arch):
    model = model_factory(arch)
    weights = find_prunable_weights(model)
    assert len(weights) == 2 * 7
    for layer in range(2):
        names = {module_type(n) for n, w in weights.items() if w.layer_index == layer}
        assert names == LLAMA_TYPES
    params = dict(model.named_parameters())
    for name, w in weights.items():
        assert name == f"{w.module_name}.weight"
        assert name.startswith(f"model.layers.{w.layer_index}.")
        assert w.weight is params[name]
        assert w.input_dim == 1
        assert isinstance(w.module, torch.nn.Linear)
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.weight.shape == (64, 64)
    assert weights["model.layers.1.mlp.down_proj.weight"].weight.shape == (64, 128)
    assert weights["model.layers.1.self_attn.k_proj.weight"].weight.shape == (32, 64)  # 2 kv heads of 16


def test_gpt2_conv1d_weights_have_input_dim_zero(tiny_gpt2):
    weights = find_prunable_weights(tiny_gpt2)
    expected = {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(weights) == expected
    for w in weights.values():
        assert isinstance(w.module, Conv1D)
        assert w.input_dim == 0
    c_fc = weights["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.weight.shape == (64, 128)  # (in, out)
    assert c_fc.as_out_in(c_fc.weight).shape == (128, 64)
    assert weights["transformer.h.1.attn.c_attn.weight"].weight.shape == (64, 192)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_embeddings_lm_head_and_norms_are_never_targets(model_factory, arch):
    model = model_factory(arch)
    names = set(find_prunable_weights(model))
    for name, _ in model.named_parameters():
        if any(part in name for part in ("embed", "wte", "wpe", "lm_head", "norm", "ln_")):
            assert name not in names
    assert all(name.endswith(".weight") for name in names)
    assert not any(name.endswith(".bias") for name in names)


def test_decoder_layers_finds_the_block_list(tiny_llama, tiny_gpt2):
    assert decoder_layers(tiny_llama) is tiny_llama.model.layers
    assert decoder_layers(tiny_gpt2) is tiny_gpt2.transformer.h


def test_target_modules_subset(tiny_llama):
    weights = find_prunable_weights(tiny_llama, ["q_proj", "down_proj"])
    assert set(weights) == {
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    }


def test_target_modules_dotted_suffix_and_gpt2_c_proj(tiny_gpt2):
    both = find_prunable_weights(tiny_gpt2, ["c_proj"])
    assert set(both) == {f"transformer.h.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp")}
    attn_only = find_prunable_weights(tiny_gpt2, ["attn.c_proj"])
    assert set(attn_only) == {f"transformer.h.{i}.attn.c_proj.weight" for i in range(2)}


def test_suffix_does_not_match_a_partial_name(tiny_llama):
    with pytest.raises(ValueError, match="Unknown target_modules"):
        find_prunable_weights(tiny_llama, ["proj"])  # not a whole name component


def test_unknown_target_modules_list_available_names(tiny_llama):
    with pytest.raises(ValueError) as info:
        find_prunable_weights(tiny_llama, ["q_proj", "qkv"])
    message = str(info.value)
    assert "['qkv']" in message
    for name in LLAMA_TYPES:
        assert name in message


def test_module_type():
    assert module_type("model.layers.0.mlp.down_proj.weight") == "down_proj"
    assert module_type("transformer.h.1.attn.c_attn.weight") == "c_attn"
