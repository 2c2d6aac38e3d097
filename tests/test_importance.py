"""Importance scorers (OBS, Fisher, magnitude, domain Taylor), the score cache and the regularizer."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from safetensors import safe_open

from hf_dpruner.importance import (
    DomainImportance,
    FisherImportance,
    MagnitudeImportance,
    OBSImportance,
    general_scorer,
    load_importance,
    save_importance,
)
from hf_dpruner.importance.general import obs_saliency
from hf_dpruner.layerwise import iterate_blocks
from hf_dpruner.regularizer import GeneralImportanceRegularizer
from hf_dpruner.targets import PrunableWeight, decoder_layers, find_prunable_weights

# ---------------------------------------------------------------- OBS


def reference_saliency(weight_out_in: torch.Tensor, inputs: torch.Tensor, damping: float) -> torch.Tensor:
    """Independent OBS saliency: H = 2/n XᵀX (+ unit diagonal for dead inputs) + damping·mean(diag)·I,
    U = upper Cholesky factor of H⁻¹, G = W² / diag(U)²."""
    x = inputs.double().reshape(-1, inputs.shape[-1])
    h = 2.0 / x.shape[0] * x.t() @ x
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h = h + damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    h_inv = torch.linalg.inv(h)
    h_inv = (h_inv + h_inv.t()) / 2
    upper = torch.linalg.cholesky(h_inv).t()  # H⁻¹ = UᵀU with U upper triangular
    assert torch.allclose(upper.t() @ upper, h_inv)
    return weight_out_in.double() ** 2 / torch.diagonal(upper) ** 2


def test_obs_saliency_of_a_single_linear_matches_reference():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=generator)
    inputs = torch.randn(50, 10, generator=generator) @ torch.randn(10, 10, generator=generator)  # correlated
    hessian = 2.0 / 50 * inputs.t() @ inputs
    got = obs_saliency(weight, hessian, damping=0.01)
    expected = reference_saliency(weight, inputs, 0.01)
    assert got.dtype == torch.float32 and got.shape == (6, 10)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)
    # OBS is not magnitude: the ranking differs from W² for correlated inputs
    assert not torch.equal(torch.argsort(got.flatten()), torch.argsort((weight**2).flatten()))


def test_obs_saliency_with_a_diagonal_hessian_is_w2_times_damped_diagonal():
    # H diagonal: H⁻¹ and its Cholesky factor are diagonal, diag(U)² = 1 / (H_qq + damp), so G = W²·(H_qq + damp)
    weight = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    hessian = torch.diag(torch.tensor([2.0, 4.0, 8.0]))
    damp = 0.01 * (14.0 / 3)  # 1% of the mean diagonal
    expected = weight.double() ** 2 * (torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64) + damp)
    torch.testing.assert_close(obs_saliency(weight, hessian, 0.01).double(), expected, rtol=1e-6, atol=1e-9)


def test_obs_saliency_handles_dead_inputs():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 8, generator=generator)
    inputs = torch.randn(30, 8, generator=generator)
    inputs[:, 3] = 0.0  # an input that never fires
    hessian = 2.0 / 30 * inputs.t() @ inputs
    got = obs_saliency(weight, hessian, 0.01)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference_saliency(weight, inputs, 0.01), rtol=1e-4, atol=0)


def _capture_linear_inputs(model, weights, batches) -> dict[str, torch.Tensor]:
    """Inputs of every target module during ordinary full forward passes of the model."""
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [
        w.module.register_forward_hook(
            lambda module, args, output, name=name: captured[name].append(
                args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for name, w in weights.items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in captured.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_obs_importance_on_a_model_matches_full_forward_hessians(model_factory, calibration_batches, arch):
    model = model_factory(arch)
    weights = find_prunable_weights(model)
    batches = calibration_batches(n_batches=3, batch_size=2, length=12, seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = OBSImportance(damping=0.01).score(model, weights, batches, disable_tqdm=True)
    assert set(scores) == set(weights)
    inputs = _capture_linear_inputs(model, weights, batches)
    for name, w in weights.items():
        assert inputs[name].shape[0] == 3 * 2 * 12  # n = number of tokens
        expected = reference_saliency(w.as_out_in(w.weight.detach()), inputs[name], 0.01)
        if w.input_dim == 0:
            expected = expected.t()
        assert scores[name].shape == w.weight.shape and scores[name].dtype == torch.float32
        torch.testing.assert_close(scores[name].double(), expected, rtol=5e-4, atol=0, msg=name)
    for n, p in model.named_parameters():  # scoring does not touch the weights
        assert torch.equal(p, before[n])


def _full_forward_block_outputs(model, batches) -> list[list[torch.Tensor]]:
    outputs: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]
    handles = [
        block.register_forward_hook(
            lambda module, args, output, i=i: outputs[i].append(output[0] if isinstance(output, tuple) else output)
        )
        for i, block in enumerate(decoder_layers(model))
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _replay_block_outputs(model, batches) -> list[list[torch.Tensor]]:
    return [list(step.forward()) for step in iterate_blocks(model, batches, disable_tqdm=True)]


def _check_replay(model, batches):
    full = _full_forward_block_outputs(model, batches)
    replay = _replay_block_outputs(model, batches)
    assert len(replay) == len(full) == model.config.num_hidden_layers
    for layer, (a, b) in enumerate(zip(full, replay, strict=False)):
        assert len(a) == len(b) == len(batches)
        for x, y in zip(a, b, strict=False):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=f"layer {layer}")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_layer_by_layer_replay_equals_full_forward(model_factory, calibration_batches, arch):
    model = model_factory(arch)
    _check_replay(model, calibration_batches(n_batches=2, batch_size=2, length=16, seed=3))


def test_layer_by_layer_replay_with_padding_mask(model_factory, calibration_batches):
    model = model_factory("llama")
    batches = calibration_batches(n_batches=2, batch_size=2, length=16, seed=3)
    for batch in batches:
        mask = torch.ones_like(batch["input_ids"])
        mask[0, :5] = 0  # left padding in the first row
        batch["attention_mask"] = mask
    _check_replay(model, batches)


def test_layer_by_layer_replay_restores_training_mode(model_factory, calibration_batches):
    model = model_factory("llama").train()
    for _ in iterate_blocks(model, calibration_batches(1, 1, 8), disable_tqdm=True):
        assert not model.training
    assert model.training


def test_layer_by_layer_replay_with_mixed_sliding_window_layers(model_factory, calibration_batches):
    model = model_factory("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    _check_replay(model, calibration_batches(n_batches=2, batch_size=2, length=16, seed=3))


def test_general_scorer_factory():
    assert isinstance(general_scorer("obs", 0.05), OBSImportance)
    assert general_scorer("obs", 0.05).damping == 0.05
    assert isinstance(general_scorer("fisher"), FisherImportance)
    with pytest.raises(ValueError, match="Unknown general estimator 'wanda'"):
        general_scorer("wanda")


# ---------------------------------------------------------------- Fisher and magnitude


def test_fisher_importance_equals_half_mean_squared_gradient_times_w2(model_factory, calibration_batches):
    model = model_factory("llama").train()
    weights = find_prunable_weights(model, ["q_proj", "down_proj"])
    batches = calibration_batches(n_batches=3, batch_size=2, length=10, seed=2)
    # freeze one target to check requires_grad is restored
    weights["model.layers.0.self_attn.q_proj.weight"].weight.requires_grad_(False)
    scores = FisherImportance().score(model, weights, batches, disable_tqdm=True)

    assert model.training
    assert not weights["model.layers.0.self_attn.q_proj.weight"].weight.requires_grad
    assert weights["model.layers.1.mlp.down_proj.weight"].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    for w in weights.values():
        w.weight.requires_grad_(True)
    squares = {name: torch.zeros_like(w.weight, dtype=torch.float64) for name, w in weights.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        for name, w in weights.items():
            squares[name] += w.weight.grad.double() ** 2
    for name, w in weights.items():
        expected = 0.5 * (squares[name] / len(batches)) * w.weight.detach().double() ** 2
        assert scores[name].dtype == torch.float32
        torch.testing.assert_close(scores[name].double(), expected, rtol=1e-4, atol=1e-12, msg=name)
        assert scores[name].abs().sum() > 0


def test_magnitude_is_absolute_weight(tiny_gpt2):
    weights = find_prunable_weights(tiny_gpt2)
    scores = MagnitudeImportance().score(tiny_gpt2, weights)
    for name, w in weights.items():
        assert scores[name].dtype == torch.float32
        assert torch.equal(scores[name], w.weight.detach().abs())
        assert scores[name].data_ptr() != w.weight.data_ptr()


# ---------------------------------------------------------------- score cache


def test_save_load_importance_round_trip(tmp_path, tiny_llama):
    weights = find_prunable_weights(tiny_llama)
    scores = MagnitudeImportance().score(tiny_llama, weights)
    path = tmp_path / "cache" / "general.safetensors"
    save_importance(scores, path, description={"estimator": "magnitude", "num_samples": 3})
    assert not path.with_name(path.name + ".tmp").exists()
    loaded = load_importance(path, weights)
    assert set(loaded) == set(scores)
    for name in scores:
        assert torch.equal(loaded[name], scores[name])
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["description"] == '{"estimator": "magnitude", "num_samples": 3}'
    assert set(load_importance(path)) == set(scores)  # without weights: no check


def test_load_importance_rejects_missing_and_extra_keys(tmp_path, tiny_llama):
    weights = find_prunable_weights(tiny_llama)
    scores = MagnitudeImportance().score(tiny_llama, weights)
    missing = dict(scores)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_importance(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_importance(tmp_path / "missing.safetensors", weights)
    subset = find_prunable_weights(tiny_llama, ["q_proj"])
    save_importance(scores, tmp_path / "all.safetensors")
    with pytest.raises(ValueError, match="does not match the model's prunable weights"):
        load_importance(tmp_path / "all.safetensors", subset)


def test_load_importance_rejects_wrong_shapes(tmp_path, tiny_llama):
    weights = find_prunable_weights(tiny_llama)
    scores = MagnitudeImportance().score(tiny_llama, weights)
    scores["model.layers.0.mlp.down_proj.weight"] = scores["model.layers.0.mlp.down_proj.weight"].t()
    save_importance(scores, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"down_proj.weight has shape \(128, 64\).*\(64, 128\)"):
        load_importance(tmp_path / "s.safetensors", weights)


def test_load_importance_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_importance(tmp_path / "none.safetensors")
    save_importance({"a": torch.ones(64, 64)}, tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="Cannot read importance file"):
        load_importance(tmp_path / "s.safetensors")


# ---------------------------------------------------------------- domain importance


def _hand_weight(values) -> dict[str, PrunableWeight]:
    linear = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(values))
    return {"w": PrunableWeight("w", "lin", linear, 0)}


def test_domain_taylor_and_taylor_plus_on_hand_made_gradients():
    values = [[1.0, -2.0], [0.5, 3.0]]
    grad1 = torch.tensor([[0.1, 0.2], [-4.0, 1.0]])  # g·W = [[0.1, -0.4], [-2, 3]]
    grad2 = torch.tensor([[0.0, 1.0], [2.0, -1.0]])  # g·W = [[0, -2], [1, -3]]
    taylor = DomainImportance(_hand_weight(values), "taylor")
    plus = DomainImportance(_hand_weight(values), "taylor_plus")
    for scorer in (taylor, plus):
        scorer.update({"w": grad1})
    # |gW − ½(gW)²| and |gW + ½(gW)²|
    torch.testing.assert_close(taylor.scores["w"], torch.tensor([[0.095, 0.48], [4.0, 1.5]]))
    torch.testing.assert_close(plus.scores["w"], torch.tensor([[0.105, 0.32], [0.0, 7.5]]))
    for scorer in (taylor, plus):
        scorer.update({"w": grad2})
    # second step adds [[0, 4], [0.5, 7.5]] (taylor) and [[0, 0], [1.5, 1.5]] (taylor_plus)
    torch.testing.assert_close(taylor.scores["w"], torch.tensor([[0.095, 4.48], [4.5, 9.0]]))
    torch.testing.assert_close(plus.scores["w"], torch.tensor([[0.105, 0.32], [1.5, 9.0]]))
    assert taylor.num_updates == plus.num_updates == 2
    assert taylor.scores["w"].dtype == torch.float32


def test_domain_importance_reads_dot_grad_by_default():
    weights = _hand_weight([[2.0, 0.0], [-1.0, 1.0]])
    weights["w"].weight.grad = torch.tensor([[0.5, 3.0], [1.0, 2.0]])  # g·W = [[1, 0], [-1, 2]]
    scorer = DomainImportance(weights)
    scorer.update()
    torch.testing.assert_close(scorer.scores["w"], torch.tensor([[0.5, 0.0], [1.5, 0.0]]))


def test_domain_importance_errors():
    with pytest.raises(ValueError, match="Unknown domain score form 'taylor2'"):
        DomainImportance(_hand_weight([[1.0, 1.0], [1.0, 1.0]]), "taylor2")
    scorer = DomainImportance(_hand_weight([[1.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="No gradient for 1 target weights"):
        scorer.update()
    assert scorer.num_updates == 0


# ---------------------------------------------------------------- regularizer


def _regularizer_setup(model, lam=0.3):
    weights = find_prunable_weights(model, ["q_proj", "down_proj"])
    generator = torch.Generator().manual_seed(4)
    importance = {name: torch.rand(w.weight.shape, generator=generator) for name, w in weights.items()}
    return weights, importance, GeneralImportanceRegularizer(weights, importance, lam)


def test_regularizer_is_zero_at_reference_and_equals_hand_sum_after_perturbation(tiny_llama):
    lam = 0.3
    weights, importance, reg = _regularizer_setup(tiny_llama, lam)
    assert reg().item() == 0.0
    original = {name: w.weight.detach().clone() for name, w in weights.items()}
    generator = torch.Generator().manual_seed(9)
    deltas = {name: 0.05 * torch.randn(w.weight.shape, generator=generator) for name, w in weights.items()}
    with torch.no_grad():
        for name, w in weights.items():
            w.weight.add_(deltas[name])
    expected = lam * sum(
        (importance[n].double() * (weights[n].weight.detach().double() - original[n].double()) ** 2).sum()
        for n in weights
    )
    value = reg()
    assert value.dim() == 0 and value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert value.item() > 0
    # gradient is 2λ G (W − W₀)
    value.backward()
    for name, w in weights.items():
        expected_grad = 2 * lam * importance[name] * (w.weight.detach() - original[name])
        torch.testing.assert_close(w.weight.grad, expected_grad, rtol=1e-4, atol=1e-7)
    reg.restore()
    for name, w in weights.items():
        assert torch.equal(w.weight, original[name])
    assert reg().item() == 0.0


def test_regularizer_with_lambda_zero_is_zero(tiny_llama):
    weights, _, reg = _regularizer_setup(tiny_llama, lam=0.0)
    with torch.no_grad():
        for w in weights.values():
            w.weight.add_(1.0)
    assert reg().item() == 0.0


def test_regularizer_lookahead_gradient_formula(tiny_llama):
    lam, lr = 0.3, 0.05
    weights, importance, reg = _regularizer_setup(tiny_llama, lam)
    name = "model.layers.1.mlp.down_proj.weight"
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(weights[name].weight.shape, generator=generator)
    got = reg.lookahead_gradient(name, grad, lr)
    torch.testing.assert_close(got, grad * (1 - 2 * lam * lr * importance[name]))
    # cross-check with autograd: LM gradient g plus the regularizer's gradient at W = W₀ − lr·g
    with torch.no_grad():
        weights[name].weight.sub_(lr * grad)
    reg().backward()
    torch.testing.assert_close(got, grad + weights[name].weight.grad, rtol=1e-4, atol=1e-7)


def test_regularizer_requires_importance_for_every_target(tiny_llama):
    weights = find_prunable_weights(tiny_llama, ["q_proj"])
    importance = {name: torch.ones(w.weight.shape) for name, w in weights.items()}
    del importance["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="lacks 1 target weights, e.g. model.layers.1.self_attn.q_proj.weight"):
        GeneralImportanceRegularizer(weights, importance, 0.1)
