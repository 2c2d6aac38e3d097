"""Peer baselines (magnitude, Wanda, SparseGPT): masks against independent references, reconstruction,
exact sparsity, Conv1D, padding and errors; a slow perplexity comparison on the embedded model."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_dpruner import DPrunerConfig
from hf_dpruner.importance.sparsegpt import sparsegpt_prune
from hf_dpruner.importance.wanda import wanda_scores
from hf_dpruner.methods import get_method

BASELINE_METHODS = ("magnitude", "wanda", "sparsegpt")


def prune_baseline(model, method, batches=None, config=None, disable_tqdm=False):
    """One-shot pruning with a registered method, as `prune_model` runs it after building the batches."""
    return get_method(method).prune(model, batches, config or DPrunerConfig(), disable_tqdm=disable_tqdm)


# ---------------------------------------------------------------- independent references


def _blocks(model) -> nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _prunable(model, block) -> dict[str, nn.Module]:
    """Full weight name -> Linear/Conv1D module of one block."""
    names = {module: name for name, module in model.named_modules()}
    return {f"{names[m]}.weight": m for m in block.modules() if isinstance(m, (nn.Linear, Conv1D))}


def _out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if isinstance(module, Conv1D) else tensor


@torch.no_grad()
def _capture_inputs(model, modules: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """Inputs (tokens, features) of `modules` over full forward passes of the whole model."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: captured[name].append(args[0].reshape(-1, args[0].shape[-1]).clone())
        )
        for name, module in modules.items()
    ]
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in captured.items()}


def _prune_lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, scores.argsort(dim=1)[:, :k], False)
    return keep


@torch.no_grad()
def reference_wanda_row(model, batches, sparsity: float) -> dict[str, torch.Tensor]:
    """Wanda's own rule, written out: block after block, a full forward of the model pruned so far gives the
    block's inputs; in every output row prune the `round(s · in)` lowest |W_ij| · ||X_j||_2."""
    masks = {}
    for block in _blocks(model):
        modules = _prunable(model, block)
        inputs = _capture_inputs(model, modules, batches)
        for name, module in modules.items():
            norms = inputs[name].double().pow(2).sum(0).sqrt()
            weight = _out_in(module, module.weight)
            keep = _prune_lowest_per_row(weight.double().abs() * norms, round(sparsity * weight.shape[1]))
            weight[~keep] = 0.0  # a view of the parameter
            masks[name] = _out_in(module, keep)
    return masks


def reference_sparsegpt(weight, hessian, sparsity, sparsity_type, damping, block_size):
    """SparseGPT in fp64 with explicit inverses: column q is eliminated with ``(H_F)⁻¹``, F = columns q..end
    (no Cholesky); per block the mask keeps the highest ``w² / [(H_F)⁻¹]_00`` of the current weights."""
    w = weight.double().clone()
    rows, cols = w.shape
    h = hessian.double() + damping * torch.diagonal(hessian.double()).mean() * torch.eye(cols, dtype=torch.float64)
    inverses = [torch.linalg.inv(h[q:, q:]) for q in range(cols)]
    d2 = torch.tensor([inv[0, 0] for inv in inverses], dtype=torch.float64)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    n_m = tuple(int(x) for x in sparsity_type.split(":")) if ":" in sparsity_type else None
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        saliency = w[:, start:end] ** 2 / d2[start:end]
        if sparsity_type == "row":
            keep[:, start:end] = _prune_lowest_per_row(saliency, round(sparsity * end) - round(sparsity * start))
        elif sparsity_type == "unstructured":
            k = round(sparsity * rows * end) - round(sparsity * rows * start)
            flat = torch.ones(saliency.numel(), dtype=torch.bool)
            flat[saliency.flatten().argsort()[:k]] = False
            keep[:, start:end] = flat.reshape(saliency.shape)
        for q in range(start, end):
            if n_m is not None and q % n_m[1] == 0:
                group = w[:, q : q + n_m[1]] ** 2 / d2[q : q + n_m[1]]
                keep[:, q : q + n_m[1]] = _prune_lowest_per_row(group, n_m[1] - n_m[0])
            pruned = ~keep[:, q]
            inv = inverses[q]
            w[pruned, q:] -= (w[pruned, q] / inv[0, 0]).unsqueeze(1) * inv[0].unsqueeze(0)
            w[pruned, q] = 0.0
    return w, keep


def _correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    scales = torch.logspace(-1, 1, features)  # features of very different sizes, as in LLM activations
    return (torch.randn(n, features, generator=generator) @ mixing) * scales


def _check_exact_sparsity(keep: torch.Tensor, out_in_keep: torch.Tensor, sparsity: float, sparsity_type: str):
    rows, cols = out_in_keep.shape
    if sparsity_type == "unstructured":
        assert int((~keep).sum()) == round(sparsity * keep.numel())
    elif sparsity_type == "row":
        assert ((~out_in_keep).sum(1) == round(sparsity * cols)).all()
    else:
        n, m = (int(x) for x in sparsity_type.split(":"))
        assert (out_in_keep.reshape(rows, cols // m, m).sum(-1) == n).all()


# ---------------------------------------------------------------- Wanda


def test_wanda_scores_orientation_and_shape_check():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.0, 1.0]])  # (out=2, in=3)
    sq_norms = torch.tensor([4.0, 1.0, 0.25])
    expected = torch.tensor([[2.0, 2.0, 1.5], [1.0, 0.0, 0.5]])
    torch.testing.assert_close(wanda_scores(weight, sq_norms), expected)
    torch.testing.assert_close(wanda_scores(weight.t(), sq_norms, input_dim=0), expected.t())  # Conv1D layout
    with pytest.raises(ValueError, match="3 inputs along dim 1"):
        wanda_scores(weight, torch.ones(2))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wanda_row_masks_equal_the_sequential_reference(model_factory, calibration_batches, arch):
    batches = calibration_batches(n_batches=2, batch_size=2, length=16, seed=1)
    model, reference = model_factory(arch), model_factory(arch)
    masks = prune_baseline(model, "wanda", batches, DPrunerConfig(sparsity=0.5, sparsity_type="row"), True)
    expected = reference_wanda_row(reference, batches, 0.5)
    assert set(masks) == set(expected)
    for name, keep in expected.items():
        assert masks[name].dtype == torch.bool and torch.equal(masks[name], keep), name
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    for name, value in params.items():  # same pruned model: Wanda does not update the weights it keeps
        assert torch.equal(value, ref_params[name]), name


def test_wanda_unstructured_compares_the_whole_matrix(model_factory, calibration_batches):
    batches = calibration_batches(n_batches=2, batch_size=2, length=16, seed=1)
    model, reference = model_factory("llama"), model_factory("llama")
    masks = prune_baseline(model, "wanda", batches, DPrunerConfig(sparsity=0.5), disable_tqdm=True)
    modules = _prunable(reference, _blocks(reference)[0])  # first block: its inputs are those of the dense model
    inputs = _capture_inputs(reference, modules, batches)
    for name, module in modules.items():
        scores = module.weight.detach().double().abs() * inputs[name].double().pow(2).sum(0).sqrt()
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[scores.flatten().argsort()[: round(0.5 * scores.numel())]] = False
        assert torch.equal(masks[name], keep.reshape(scores.shape)), name
    row_counts = [(~keep).sum(1) for keep in masks.values()]
    assert any(len(set(c.tolist())) > 1 for c in row_counts)  # rows are not pruned equally


# ---------------------------------------------------------------- SparseGPT on one matrix


@pytest.mark.parametrize("sparsity_type, sparsity", [("unstructured", 0.5), ("row", 0.3), ("2:4", 0.0), ("4:8", 0.0)])
def test_sparsegpt_matches_the_explicit_inverse_reference(sparsity_type, sparsity):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 48, generator=generator)
    x = _correlated_inputs(400, 48, seed=1)
    hessian = 2.0 / x.shape[0] * x.t() @ x
    new, keep = sparsegpt_prune(weight, hessian, sparsity, sparsity_type, damping=0.01, block_size=16)
    ref_new, ref_keep = reference_sparsegpt(weight, hessian, sparsity, sparsity_type, 0.01, block_size=16)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_new, rtol=1e-4, atol=1e-4)
    assert new.dtype == weight.dtype and (new[~keep] == 0).all()
    _check_exact_sparsity(keep, keep, sparsity, sparsity_type)


def test_sparsegpt_reconstruction_beats_plain_masking_and_magnitude():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 64, generator=generator)
    x = _correlated_inputs(512, 64, seed=3)
    hessian = 2.0 / x.shape[0] * x.t() @ x
    new, keep = sparsegpt_prune(weight, hessian, 0.5, damping=0.01)
    magnitude = torch.ones(weight.numel(), dtype=torch.bool)
    magnitude[weight.abs().flatten().argsort()[: weight.numel() // 2]] = False

    def error(w):
        return torch.linalg.norm(x @ weight.t() - x @ w.t()).item()

    reconstructed, same_mask = error(new), error(weight * keep)
    magnitude_mask = error(weight * magnitude.reshape(32, 64))
    assert reconstructed < 0.8 * same_mask
    assert reconstructed < 0.5 * magnitude_mask


def test_sparsegpt_dead_inputs_are_pruned_first():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 32, generator=generator)
    x = _correlated_inputs(200, 32, seed=5)
    x[:, [3, 17]] = 0.0  # inputs that never fire
    hessian = 2.0 / x.shape[0] * x.t() @ x
    for sparsity_type in ("unstructured", "row"):
        new, keep = sparsegpt_prune(weight, hessian, 0.5, sparsity_type)
        assert torch.isfinite(new).all()
        assert not keep[:, [3, 17]].any()
        _check_exact_sparsity(keep, keep, 0.5, sparsity_type)


def test_sparsegpt_argument_errors():
    weight, hessian = torch.randn(4, 6), torch.eye(6)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsegpt_prune(weight, hessian, 0.0, "2:4")
    with pytest.raises(ValueError, match=r"needs \(8, 8\)"):
        sparsegpt_prune(torch.randn(4, 8), hessian, 0.5)
    with pytest.raises(ValueError, match="sparsity_type"):
        sparsegpt_prune(weight, hessian, 0.5, "blocks")


# ---------------------------------------------------------------- SparseGPT in the pipeline


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsegpt_pipeline_is_sequential_and_matches_the_matrix_function(model_factory, calibration_batches, arch):
    batches = calibration_batches(n_batches=2, batch_size=2, length=16, seed=6)
    config = DPrunerConfig(sparsity=0.5, damping=0.01)
    model = model_factory(arch)
    masks = prune_baseline(model, "sparsegpt", batches, config, disable_tqdm=True)
    pruned = dict(model.named_parameters())
    reference = model_factory(arch)
    ref_params = dict(reference.named_parameters())
    for block in _blocks(reference):
        modules = _prunable(reference, block)
        inputs = _capture_inputs(reference, modules, batches)  # earlier blocks already hold the pruned weights
        for name, module in modules.items():
            x = inputs[name].float()
            expected, keep = sparsegpt_prune(_out_in(module, module.weight), 2.0 / x.shape[0] * x.t() @ x, 0.5)
            assert torch.equal(masks[name], _out_in(module, keep)), name
            torch.testing.assert_close(pruned[name], _out_in(module, expected), rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # continue with the pipeline's pruned block, as the next block sees it
            for name in modules:
                ref_params[name].copy_(pruned[name])
    for name, keep in masks.items():
        assert (pruned[name][~keep] == 0).all()


def test_sparsegpt_lowers_first_block_output_error(model_factory, calibration_batches):
    batches = calibration_batches(n_batches=2, batch_size=4, length=16, seed=7)
    dense = model_factory("llama")
    modules = _prunable(dense, _blocks(dense)[0])
    inputs = _capture_inputs(dense, modules, batches)
    sparsegpt, magnitude = model_factory("llama"), model_factory("llama")
    masks = prune_baseline(sparsegpt, "sparsegpt", batches, DPrunerConfig(sparsity=0.5), disable_tqdm=True)
    prune_baseline(magnitude, "magnitude", None, DPrunerConfig(sparsity=0.5), disable_tqdm=True)
    rebuilt, by_magnitude = dict(sparsegpt.named_parameters()), dict(magnitude.named_parameters())
    for name, module in modules.items():
        x, w = inputs[name], module.weight.detach()

        def error(candidate, x=x, w=w):
            return torch.linalg.norm(x @ w.t() - x @ candidate.t()).item()

        assert error(rebuilt[name]) < error(w * masks[name]), name
        assert error(rebuilt[name]) < error(by_magnitude[name]), name


# ---------------------------------------------------------------- all baselines


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", BASELINE_METHODS)
@pytest.mark.parametrize("sparsity_type, sparsity", [("unstructured", 0.3), ("row", 0.3), ("2:4", 0.5)])
def test_exact_sparsity_per_matrix_and_exact_zeros(model_factory, calibration_batches, arch, method, sparsity_type,
                                                    sparsity):
    model = model_factory(arch)
    config = DPrunerConfig(sparsity=sparsity, sparsity_type=sparsity_type)
    masks = prune_baseline(model, method, calibration_batches(2, 2, 12, seed=8), config, disable_tqdm=True)
    modules = {name: m for block in _blocks(model) for name, m in _prunable(model, block).items()}
    assert set(masks) == set(modules)
    for name, keep in masks.items():
        weight = modules[name].weight
        assert keep.dtype == torch.bool and keep.shape == weight.shape
        assert (weight[~keep] == 0).all()
        _check_exact_sparsity(keep, _out_in(modules[name], keep), config.sparsity_for(name), sparsity_type)


def test_magnitude_needs_no_data_and_prunes_the_smallest_per_matrix(model_factory):
    model, original = model_factory("llama"), model_factory("llama")
    masks = prune_baseline(model, "magnitude", config=DPrunerConfig(sparsity=0.5), disable_tqdm=True)
    for name, param in original.named_parameters():
        if name in masks:
            keep = torch.ones(param.numel(), dtype=torch.bool)
            keep[param.detach().abs().flatten().argsort()[: round(0.5 * param.numel())]] = False
            assert torch.equal(masks[name], keep.reshape(param.shape)), name


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_target_modules_and_layer_sparsity_are_honoured(model_factory, calibration_batches, method):
    model, original = model_factory("llama"), model_factory("llama")
    config = DPrunerConfig(sparsity=0.5, target_modules=["q_proj", "down_proj"], layer_sparsity={"down_proj": 0.25})
    masks = prune_baseline(model, method, calibration_batches(2, 2, 12), config, disable_tqdm=True)
    assert sorted(masks) == [
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("mlp.down_proj", "self_attn.q_proj")
    ]
    for name, keep in masks.items():
        expected = 0.25 if "down_proj" in name else 0.5
        assert int((~keep).sum()) == round(expected * keep.numel())
    before = dict(original.named_parameters())
    for name, param in model.named_parameters():
        if name not in masks:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_padding_tokens_are_left_out_of_the_statistics(model_factory, calibration_batches, method):
    def padded(pad_id: int) -> list[dict]:
        batches = calibration_batches(2, 2, 16, seed=9)
        for batch in batches:
            attention = torch.ones_like(batch["input_ids"])
            attention[0, 10:] = 0  # right padding in the first row
            batch["input_ids"] = batch["input_ids"].masked_fill(attention == 0, pad_id)
            batch["attention_mask"] = attention
            batch["labels"] = batch["input_ids"].masked_fill(attention == 0, -100)
        return batches

    config = DPrunerConfig(sparsity=0.5)
    first = prune_baseline(model_factory("llama"), method, padded(0), config, disable_tqdm=True)
    second = prune_baseline(model_factory("llama"), method, padded(77), config, disable_tqdm=True)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_training_mode_is_restored(model_factory, calibration_batches):
    model = model_factory("llama").train()
    prune_baseline(model, "wanda", calibration_batches(1, 1, 8), disable_tqdm=True)
    assert model.training


def test_unknown_method_and_missing_data_errors(model_factory):
    model = model_factory("llama")
    with pytest.raises(ValueError, match="Unknown pruning method 'obs'; valid: dpruner, magnitude, wanda, sparsegpt"):
        prune_baseline(model, "obs", [])
    for method in ("wanda", "sparsegpt"):
        for batches in (None, []):
            with pytest.raises(ValueError, match=f"'{method}' method needs calibration batches"):
                prune_baseline(model, method, batches)


# ---------------------------------------------------------------- the embedded model (slow)


@pytest.mark.slow
def test_wanda_and_sparsegpt_far_better_than_magnitude_on_the_embedded_model():
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.data import CausalLMCollator, build_windows
    from hf_dpruner.evaluation import perplexity
    from hf_dpruner.resources import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = build_windows(load_corpus_texts("general"), tokenizer, seq_len=128, num_samples=8)
    batches = list(DataLoader(windows, batch_size=4, collate_fn=CausalLMCollator(tokenizer.pad_token_id)))
    eval_texts = load_corpus_texts("general", "eval")
    config = DPrunerConfig(sparsity=0.5, sparsity_type="unstructured")
    dense = AutoModelForCausalLM.from_pretrained(path)
    results = {"dense": perplexity(dense, tokenizer, eval_texts, seq_len=256, max_tokens=4096, disable_tqdm=True)}
    for method in BASELINE_METHODS:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        masks = prune_baseline(model, method, batches, config, disable_tqdm=True)
        seconds = time.perf_counter() - start
        assert len(masks) == 7 * dense.config.num_hidden_layers
        pruned = sum(int((~keep).sum()) for keep in masks.values())
        assert pruned == sum(round(0.5 * keep.numel()) for keep in masks.values())
        results[method] = perplexity(model, tokenizer, eval_texts, seq_len=256, max_tokens=4096, disable_tqdm=True)
        results[method]["seconds"] = seconds
        del model
    print({name: (round(r["perplexity"], 2), round(r.get("seconds", 0.0), 1)) for name, r in results.items()})
    ppl = {name: r["perplexity"] for name, r in results.items()}
    assert ppl["dense"] < ppl["wanda"] and ppl["dense"] < ppl["sparsegpt"]
    assert ppl["wanda"] < 0.5 * ppl["magnitude"]
    assert ppl["sparsegpt"] < 0.5 * ppl["magnitude"]
