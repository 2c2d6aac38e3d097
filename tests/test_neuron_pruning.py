"""One-shot MLP-neuron pruning (the smaller-intermediate_size peer of PAT): which neurons go, what the smaller model
computes, and the least-squares refit of down_proj."""

from __future__ import annotations

import pytest
import torch

from hf_dpruner.pat import neurons_for_parameters, prune_mlp_neurons

from testing_utils import build_tiny, make_batches


def _down_inputs(model, batches):
    """Per layer, the concatenated inputs of down_proj over the batches."""
    seen = [[] for _ in model.model.layers]
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, i=i: seen[i].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return [torch.cat(s) for s in seen]


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)])
def test_the_lowest_energy_neurons_go_and_the_smaller_model_computes_the_zeroed_ones(arch, tied):
    model = build_tiny(arch, tie_word_embeddings=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = make_batches(3, 2, 16)
    size = model.config.intermediate_size
    small = prune_mlp_neurons(model, size // 4, batches)
    assert small.config.intermediate_size == size - size // 4
    assert small.config.hidden_size == model.config.hidden_size
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is unchanged
    kept = []
    for i, h in enumerate(_down_inputs(model, batches)):
        score = h.double().pow(2).sum(0) * model.model.layers[i].mlp.down_proj.weight.double().pow(2).sum(0)
        keep = torch.argsort(score, descending=True)[: size - size // 4].sort().values
        kept.append(keep)
        assert torch.equal(small.model.layers[i].mlp.up_proj.weight, model.model.layers[i].mlp.up_proj.weight[keep])
    # the full model with the removed neurons zeroed computes the smaller model's logits
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, keep=keep: (args[0] * torch.zeros(size).index_fill_(0, keep, 1.0),))
        for layer, keep in zip(model.model.layers, kept, strict=True)]
    x = make_batches(1, 2, 16, seed=7)[0]
    with torch.no_grad():
        expected = model(**x).logits
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(small(**x).logits, expected, atol=2e-5, rtol=1e-4)
    assert small.num_parameters() == model.num_parameters() - 3 * (size // 4) * 64 * model.config.num_hidden_layers


def test_the_refit_lowers_the_down_proj_error_on_the_calibration_tokens():
    model = build_tiny("llama")
    batches = make_batches(4, 2, 16)
    plain = prune_mlp_neurons(model, 48, batches)
    refit = prune_mlp_neurons(model, 48, batches, compensate=True)
    dense_h = _down_inputs(model, batches)[0]
    dense = dense_h @ model.model.layers[0].mlp.down_proj.weight.t()
    errors = {}
    for name, small in (("plain", plain), ("refit", refit)):
        h = _down_inputs(small, batches)[0]  # layer 0 sees the same inputs: the kept neurons' activations
        errors[name] = (h @ small.model.layers[0].mlp.down_proj.weight.t() - dense).pow(2).sum().item()
    assert errors["refit"] < 0.8 * errors["plain"], errors
    # same neurons, only down_proj refitted
    assert torch.equal(refit.model.layers[0].mlp.gate_proj.weight, plain.model.layers[0].mlp.gate_proj.weight)


def test_bad_input_is_refused_with_a_clear_error():
    model = build_tiny("llama")
    batches = make_batches(1, 2, 16)
    with pytest.raises(ValueError, match=r"num_removed must be an integer in \(0, 128\)"):
        prune_mlp_neurons(model, 128, batches)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        prune_mlp_neurons(model, 8, [])
    with pytest.raises(ValueError, match="PAT supports the Llama family"):
        prune_mlp_neurons(build_tiny("gpt2"), 8, batches)
    # the parameter budget: 3 * hidden * layers parameters per neuron
    per_neuron = 3 * 64 * model.config.num_hidden_layers
    assert neurons_for_parameters(model, 10 * per_neuron) == 10
    assert neurons_for_parameters(model, 10**9) == 127
