"""One-shot MLP-neuron pruning (the smaller-intermediate_size peer of PAT): which neurons go, what the smaller model
computes, and the least-squares refit of down_proj."""

from __future__ import annotations

import pytest
import torch

from hf_dpruner.pat import (
    neurons_for_parameters,
    obs_neuron_selection,
    prune_mlp_neurons,
    reconstruct_to_teacher,
    width_prune,
)

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


def test_obs_selection_leaves_a_lower_refit_error_than_the_energy_choice():
    model = build_tiny("llama")
    batches = make_batches(4, 2, 16)
    dense_h = _down_inputs(model, batches)[0]
    dense = dense_h @ model.model.layers[0].mlp.down_proj.weight.t()
    errors = {}
    for selection in ("energy", "obs"):
        small = prune_mlp_neurons(model, 48, batches, compensate=True, selection=selection)
        h = _down_inputs(small, batches)[0]
        errors[selection] = (h @ small.model.layers[0].mlp.down_proj.weight.t() - dense).pow(2).sum().item()
    assert errors["obs"] < errors["energy"], errors


def test_obs_selection_is_the_exhaustive_best_on_a_small_problem_and_its_refit_is_least_squares():
    torch.manual_seed(0)
    h = torch.randn(64, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    weight = torch.randn(3, 6, dtype=torch.float64)
    gram = h.t() @ h
    damped = gram + 0.01 * torch.diagonal(gram).mean() * torch.eye(6, dtype=torch.float64)

    def refit(keep):  # the damped least-squares refit of the kept columns, and the error it leaves
        w = torch.linalg.solve(damped[keep][:, keep], damped[keep] @ weight.t()).t()
        residual = torch.zeros_like(weight)
        residual[:, keep] = w
        residual = residual - weight
        return w, float(torch.einsum("oi,ij,oj->", residual, damped, residual))

    keep, weights = obs_neuron_selection(gram, weight, 1)
    torch.testing.assert_close(weights, refit(keep)[0])
    best = min(range(6), key=lambda j: refit(torch.tensor([i for i in range(6) if i != j]))[1])
    assert best not in keep.tolist() and len(keep) == 5  # one removal: greedy OBS is exact
    with pytest.raises(ValueError, match="num_removed must be in"):
        obs_neuron_selection(gram, weight, 6)


def test_reconstruction_to_the_teacher_lowers_every_blocks_error_and_the_logit_error():
    dense = build_tiny("llama")
    batches = make_batches(16, 4, 32)
    small = prune_mlp_neurons(dense, 64, batches, selection="obs")
    x = make_batches(1, 2, 16, seed=5)[0]
    with torch.no_grad():
        target = dense(**x).logits
        before = (small(**x).logits - target).pow(2).mean().item()
    errors = reconstruct_to_teacher(small, dense, batches, epochs=10, lr=3e-4, precision="float32", disable_tqdm=True)
    assert len(errors) == dense.config.num_hidden_layers
    assert all(after < start for start, after in errors), errors
    with torch.no_grad():
        after = (small(**x).logits - target).pow(2).mean().item()
    assert after < before, (before, after)  # held-out tokens: closer to the teacher, not only on the calibration
    with pytest.raises(ValueError, match="same hidden size"):
        reconstruct_to_teacher(width_prune(dense, 0.25, batches), dense, batches)


def test_bad_input_is_refused_with_a_clear_error():
    model = build_tiny("llama")
    batches = make_batches(1, 2, 16)
    with pytest.raises(ValueError, match=r"num_removed must be an integer in \(0, 128\)"):
        prune_mlp_neurons(model, 128, batches)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        prune_mlp_neurons(model, 8, [])
    with pytest.raises(ValueError, match="PAT supports the Llama family"):
        prune_mlp_neurons(build_tiny("gpt2"), 8, batches)
    with pytest.raises(ValueError, match="selection must be one of"):
        prune_mlp_neurons(model, 8, batches, selection="taylor")
    # the parameter budget: 3 * hidden * layers parameters per neuron
    per_neuron = 3 * 64 * model.config.num_hidden_layers
    assert neurons_for_parameters(model, 10 * per_neuron) == 10
    assert neurons_for_parameters(model, 10**9) == 127
