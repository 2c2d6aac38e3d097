"""The reconstruction recipe and cross-calibration: the blended Hessian, block reconstruction, and the two registry
methods built on them (`cross-calibration`, `dpruner-recon`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_dpruner import AutoPrunedModelForCausalLM, DPrunerConfig
from hf_dpruner.commands.cli import main as cli_main
from hf_dpruner.importance.sparsegpt import sparsegpt_prune
from hf_dpruner.layerwise import BlockStep, capture_block_inputs
from hf_dpruner.methods import get_method
from hf_dpruner.methods.dual_blockwise import rebatch
from hf_dpruner.reconstruction import (
    autocast_dtype,
    blended_hessian,
    native_bfloat16,
    output_error,
    reconstruct_block,
    relative_error,
)
from hf_dpruner.targets import decoder_layers

from testing_utils import build_tiny, make_batches, text


def _inputs_and_targets(model, batches, index=0):
    """The dense block `index`'s inputs (hidden, args, kwargs) per batch and its outputs."""
    hidden, calls = capture_block_inputs(model, batches)
    block = decoder_layers(model)[0]
    step = BlockStep(index, block, hidden, calls[index])
    targets = step.forward()
    return block, [(h, a, k) for h, (a, k) in zip(hidden, calls[index], strict=True)], targets


def _prune_block_by_magnitude(block, sparsity=0.5):
    """Zero the smallest half of every Linear weight of the block; {param: keep-mask}."""
    masks = {}
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                k = int(w.numel() * sparsity)
                threshold = w.abs().flatten().kthvalue(k).values
                keep = w.abs() > threshold
                w.mul_(keep)
                masks[w] = keep
    return masks


def _pruned_block_and_twin(model):
    """Block 0 pruned by magnitude, its inputs and dense targets, its masks, and a copy with the copy's masks."""
    block, inputs, targets = _inputs_and_targets(model, make_batches(4, 2, 16))
    masks = _prune_block_by_magnitude(block)
    twin = copy.deepcopy(block)
    twin_masks = {dict(twin.named_parameters())[n]: masks[p] for n, p in block.named_parameters() if p in masks}
    return block, inputs, targets, masks, twin, twin_masks


def test_blended_hessian_normalises_each_text_by_its_token_count():
    gd, gg = torch.randn(6, 4), torch.randn(10, 4)
    domain, general = (gd.t() @ gd, 6), (gg.t() @ gg, 10)
    expected = 2 * (0.75 * gd.t() @ gd / 6 + 0.25 * gg.t() @ gg / 10)
    torch.testing.assert_close(blended_hessian(domain, general, 0.25), expected)
    assert torch.equal(blended_hessian(domain, general, 0.0), domain[0] * (2.0 / 6))
    assert torch.equal(blended_hessian(domain, None, 0.7), domain[0] * (2.0 / 6))
    with pytest.raises(ValueError, match=r"general_weight must be in \[0, 1\]"):
        blended_hessian(domain, general, 1.5)


def test_obs_update_on_the_blended_hessian_lowers_held_out_error_against_masking_alone():
    torch.manual_seed(0)
    mix = torch.randn(32, 32)
    domain_x, general_x = torch.randn(400, 32) @ mix, torch.randn(400, 32)
    held_out = torch.cat([torch.randn(200, 32) @ mix, torch.randn(200, 32)])
    weight = torch.randn(16, 32)
    hessian = blended_hessian((domain_x.t() @ domain_x, 400), (general_x.t() @ general_x, 400), 0.5)
    updated, keep = sparsegpt_prune(weight, hessian, 0.5)
    assert int((~keep).sum()) == 16 * 16 and bool((updated[~keep] == 0).all())
    masked = weight * keep
    error_updated = ((held_out @ (updated - weight).t()) ** 2).mean()
    error_masked = ((held_out @ (masked - weight).t()) ** 2).mean()
    assert error_updated < 0.8 * error_masked


def test_block_reconstruction_lowers_the_error_and_keeps_the_masks_exact():
    model = build_tiny("llama")
    block, inputs, targets = _inputs_and_targets(model, make_batches(4, 2, 16))
    masks = _prune_block_by_magnitude(block)
    counts = {p: int(m.sum()) for p, m in masks.items()}
    before, after = reconstruct_block(block, inputs, targets, masks, epochs=30, lr=3e-3,
                                      generator=torch.Generator().manual_seed(0))
    assert before > 0.01 and after < 0.5 * before
    assert after == pytest.approx(relative_error(block, inputs, targets))
    for p, keep in masks.items():
        assert bool((p[~keep] == 0).all()) and int((p != 0).sum()) <= counts[p]
        assert not p.requires_grad or p.grad is None  # gradients released, flags restored
    assert all(p.requires_grad for p in block.parameters())  # the model's own flags are back


def test_block_reconstruction_in_bfloat16_autocast_lowers_the_error_and_keeps_the_masks_exact():
    block, inputs, targets, masks, twin, twin_masks = _pruned_block_and_twin(build_tiny("llama"))
    before, after = reconstruct_block(block, inputs, targets, masks, epochs=30, lr=3e-3, autocast=torch.bfloat16,
                                      generator=torch.Generator().manual_seed(0))
    _, fp32_after = reconstruct_block(twin, inputs, targets, twin_masks, epochs=30, lr=3e-3,
                                      generator=torch.Generator().manual_seed(0))
    assert before > 0.01 and after < 0.5 * before
    assert after == pytest.approx(fp32_after, rel=0.2)  # the same optimisation, in a coarser arithmetic
    assert any(not torch.equal(p, q) for p, q in zip(block.parameters(), twin.parameters(), strict=True))
    for p, keep in masks.items():
        assert p.dtype == torch.float32 and bool((p[~keep] == 0).all())


def test_reconstruction_precision_resolves_to_an_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if native_bfloat16(cpu) else None)
    assert autocast_dtype("auto", torch.device("meta")) is None and not native_bfloat16(torch.device("meta"))
    with pytest.raises(ValueError, match="precision must be 'auto', 'float32' or 'bfloat16', got 'fp8'"):
        autocast_dtype("fp8", cpu)
    with pytest.raises(ValueError, match="reconstruction_precision must be one of"):
        DPrunerConfig(reconstruction_precision="half")


def test_dpruner_recon_follows_reconstruction_precision():
    domain, general = make_batches(2, 2, 16, seed=0), make_batches(2, 2, 16, seed=1)
    weights = {}
    for precision in ("float32", "bfloat16"):
        model = build_tiny("llama")
        config = DPrunerConfig(sparsity=0.5, reconstruction_epochs=2, reconstruction_precision=precision)
        get_method("dpruner-recon").prune(model, domain, config, general_batches=general, disable_tqdm=True)
        weights[precision] = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    assert not torch.equal(weights["float32"], weights["bfloat16"])
    assert torch.equal(weights["float32"] == 0, weights["bfloat16"] == 0)  # the same masks: OBS runs in float32


def test_block_reconstruction_without_measuring_trains_the_same_weights():
    block, inputs, targets, masks, twin, twin_masks = _pruned_block_and_twin(build_tiny("llama"))
    _, after = reconstruct_block(block, inputs, targets, masks, epochs=2, lr=3e-3,
                                 generator=torch.Generator().manual_seed(0))
    assert reconstruct_block(twin, inputs, targets, twin_masks, epochs=2, lr=3e-3,
                             generator=torch.Generator().manual_seed(0), measure=False) is None
    for (name, p), q in zip(block.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    with torch.no_grad():
        outputs = [twin(hidden, *args, **kwargs) for hidden, args, kwargs in inputs]
    outputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
    assert output_error(outputs, targets) == pytest.approx(after)


def test_block_reconstruction_leaves_an_exact_block_unchanged():
    model = build_tiny("llama")
    block, inputs, targets = _inputs_and_targets(model, make_batches(2, 2, 16))
    masks = {m.weight: torch.ones_like(m.weight, dtype=torch.bool) for m in block.modules()
             if isinstance(m, torch.nn.Linear)}
    state = copy.deepcopy(block.state_dict())
    before, after = reconstruct_block(block, inputs, targets, masks, epochs=3, lr=1e-2)
    assert before == 0.0 and after == 0.0
    for key, value in block.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_block_reconstruction_argument_errors():
    model = build_tiny("llama")
    block, inputs, targets = _inputs_and_targets(model, make_batches(2, 2, 16))
    with pytest.raises(ValueError, match="2 input batches but 1 targets"):
        reconstruct_block(block, inputs, targets[:1], {}, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="1 batch weights for 2 batches"):
        reconstruct_block(block, inputs, targets, {}, epochs=1, lr=1e-3, batch_weights=[1.0])


def test_rebatch_joins_windows_of_equal_length():
    batches = make_batches(5, 1, 16) + make_batches(1, 1, 8)
    joined = rebatch(batches, 2)
    assert [tuple(b["input_ids"].shape) for b in joined] == [(2, 16), (2, 16), (1, 16), (1, 8)]
    assert torch.equal(torch.cat([b["input_ids"] for b in joined[:3]]),
                       torch.cat([b["input_ids"] for b in batches[:5]]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cross_calibration_with_general_weight_0_equals_sparsegpt_bit_for_bit(arch):
    batches = make_batches(2, 2, 16)
    config = DPrunerConfig(sparsity=0.5, general_weight=0.0, reconstruction_batch_size=1)
    reference = build_tiny(arch)
    ref_masks = get_method("sparsegpt").prune(reference, batches, config, disable_tqdm=True)
    model = build_tiny(arch)
    masks = get_method("cross-calibration").prune(model, batches, config, disable_tqdm=True)
    assert masks.keys() == ref_masks.keys()
    for name in masks:
        assert torch.equal(masks[name], ref_masks[name]), name
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_general_text_changes_the_masks_and_is_required_when_weighted():
    domain, general = make_batches(2, 2, 16, seed=0), make_batches(2, 2, 16, seed=1)
    config = DPrunerConfig(sparsity=0.5, general_weight=0.5)
    only_domain = get_method("cross-calibration").prune(build_tiny("llama"), domain,
                                                        DPrunerConfig(sparsity=0.5, general_weight=0.0))
    blended = get_method("cross-calibration").prune(build_tiny("llama"), domain, config, general_batches=general)
    assert any(not torch.equal(blended[n], only_domain[n]) for n in blended)
    with pytest.raises(ValueError, match="got no general calibration batches"):
        get_method("cross-calibration").prune(build_tiny("llama"), domain, config)


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_dpruner_recon_keeps_exact_masks_and_lowers_the_last_block_error(sparsity_type):
    domain, general = make_batches(2, 2, 16, seed=0), make_batches(2, 2, 16, seed=1)
    dense = build_tiny("llama")
    outputs = {}
    for label, epochs in (("sparsegpt", 0), ("recon", 20)):
        model = build_tiny("llama")
        config = DPrunerConfig(sparsity=0.5, sparsity_type=sparsity_type, reconstruction_epochs=epochs,
                               reconstruction_lr=3e-3)
        method = get_method("dpruner-recon")
        masks = method.prune(model, domain, config, general_batches=general, disable_tqdm=True)
        params = dict(model.named_parameters())
        for name, keep in masks.items():
            assert bool((params[name][~keep] == 0).all())
            if sparsity_type == "2:4":
                assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all())
            else:
                assert int((~keep).sum()) == round(0.5 * keep.numel())
        if epochs:
            assert set(method.block_errors) == {0, 1}
            assert all(0.0 < error < 1.0 for error in method.block_errors.values())  # after reconstruction
        with torch.no_grad():
            outputs[label] = model(**domain[0], output_hidden_states=True).hidden_states[-1]
    with torch.no_grad():
        target = dense(**domain[0], output_hidden_states=True).hidden_states[-1]
    assert (outputs["recon"] - target).pow(2).mean() < (outputs["sparsegpt"] - target).pow(2).mean()


def test_the_new_methods_run_through_the_cli(tiny_model_dir, tmp_path):
    (tmp_path / "d.txt").write_text(text(5, 600))
    (tmp_path / "g.txt").write_text(text(6, 600))
    for method in ("cross-calibration", "dpruner-recon"):
        out = tmp_path / method
        assert cli_main(["prune", "--method", method, "--model", str(tiny_model_dir), "--sparsity", "0.5",
                         "--domain-data", str(tmp_path / "d.txt"), "--general-data", str(tmp_path / "g.txt"),
                         "--num-samples", "4", "--seq-len", "16", "--output-dir", str(out), "--disable-tqdm", "true",
                         "--reconstruction-epochs", "1"]) == 0
        record = json.loads((out / "pruning_config.json").read_text())
        assert record["method"] == method and record["calibration"]["data"] == "domain+general"
        assert record["reconstruction_epochs"] == 1 and record["calibration"]["samples"] == 4
        assert record["general_weight"] == get_method(method).default_general_weight  # resolved, not null
        errors = record["calibration"].get("block_errors")  # the sensitivity RankAdaptor's model reads
        if method == "dpruner-recon":
            assert set(errors) == {"0", "1"} and all(0.0 < e < 1.0 for e in errors.values())
        else:
            assert errors is None  # no reconstruction, no error measured
        loaded = AutoPrunedModelForCausalLM.from_pretrained(out)
        assert loaded.pruning_sparsity()["overall"] == pytest.approx(0.5)
        assert get_method(method).title in (out / "README.md").read_text()


def test_the_reconstruction_recipe_is_the_cli_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["prune", "--help"])
    title = get_method("dpruner-recon").title
    assert f"dpruner-recon ({title}, default)" in " ".join(capsys.readouterr().out.split())
    from hf_dpruner.commands.prune import PruneArguments

    assert PruneArguments().method == "dpruner-recon"
