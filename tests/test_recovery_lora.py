"""Sparsity-preserving LoRA recovery: masked updates, exact merges, adapter and checkpoint round trips, Trainer."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel, Trainer, TrainingArguments

from hf_dpruner import (
    AutoPrunedModelForCausalLM,
    DPrunerConfig,
    get_masked_peft_model,
    load_masked_adapter,
    make_pruned,
    merge_masked_lora,
)
from hf_dpruner.config import PRUNING_CONFIG_NAME
from hf_dpruner.importance import MagnitudeImportance
from hf_dpruner.masks import MASKS_NAME, compute_masks
from hf_dpruner.recovery import MaskedLoraLinear
from hf_dpruner.targets import find_prunable_weights

from testing_utils import build_tiny, make_windows

TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def pruned_model(arch: str, sparsity: float = 0.4) -> PreTrainedModel:
    """A tiny model magnitude-pruned at `sparsity`, masks attached (deterministic: same weights every call)."""
    model = build_tiny(arch)
    config = DPrunerConfig(sparsity=sparsity)
    weights = find_prunable_weights(model)
    masks = compute_masks(MagnitudeImportance().score(model, weights), weights, config)
    return make_pruned(model, masks, config, record={"method": "magnitude", "base_model": "tiny"}, apply=True)


def randomize_lora(peft_model: PeftModel, seed: int = 0) -> None:
    """LoRA's B starts at 0 (a no-op adapter): give every B weight and bias random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def full_deltas(peft_model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Parameter name of each LoRA-wrapped weight -> (its weight, B·A·scaling unmasked, in the weight's layout)."""
    out = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            delta = (module.lora_B["default"].weight @ module.lora_A["default"].weight) * module.scaling["default"]
            weight = module.get_base_layer().weight.detach().clone()
            out[f"{name}.weight"] = (weight, delta.detach().T if module.fan_in_fan_out else delta.detach())
    return out


def assert_merged_exactly(merged: PreTrainedModel, masks: dict, before: dict) -> None:
    """Pruned positions exactly 0, kept positions = W + the full LoRA delta (none zeroed by the masking), measured
    sparsity = mask sparsity; wrapped weights without a mask got the full delta everywhere."""
    params = dict(merged.named_parameters())
    pruned = targeted = 0
    for name, (weight, delta) in before.items():
        merged_weight = params[name].detach()
        keep = masks.get(name, torch.ones_like(merged_weight, dtype=torch.bool))
        assert (merged_weight[~keep] == 0).all(), name
        assert (merged_weight[keep] != 0).all(), name
        torch.testing.assert_close(merged_weight[keep], (weight + delta)[keep], atol=1e-6, rtol=0)
        if name in masks:
            pruned += int((merged_weight == 0).sum())
            targeted += merged_weight.numel()
    assert set(masks) <= set(before)
    assert pruned / targeted == pytest.approx(merged.pruning_sparsity()["overall"], abs=0)


@pytest.mark.parametrize(
    "arch, lora_bias, extra_targets",
    [("llama", False, ["lm_head"]), ("gpt2", False, []), ("gpt2", True, [])],
)
def test_merge_masked_lora_is_exactly_sparse_with_unmerged_logits(arch, lora_bias, extra_targets):
    model = pruned_model(arch)
    masks = {name: keep.clone() for name, keep in model.pruning_masks.items()}
    ids = make_windows(2, 12, seed=1)
    base_logits = logits(model, ids)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch] + extra_targets, lora_bias=lora_bias)
    peft_model = get_masked_peft_model(model, config)
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m, MaskedLoraLinear) for m in layers)
    assert sum(m.keep_mask is not None for m in layers) == len(masks)  # every pruned matrix is masked
    assert all(m.fan_in_fan_out == (arch == "gpt2") for m in layers if m.keep_mask is not None)
    randomize_lora(peft_model)
    before = full_deltas(peft_model)
    unmerged = logits(peft_model, ids)
    assert (unmerged - base_logits).abs().max() > 1e-2  # the adapter does change the model

    merged = merge_masked_lora(peft_model)

    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert_merged_exactly(merged, masks, before)
    merged.check_pruned_weights()
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=0)
    recovery = merged.pruning_record["recovery"]
    assert recovery["method"] == "lora" and recovery["r"] == 4 and recovery["lora_alpha"] == 8
    assert recovery["target_modules"] == sorted(TARGETS[arch] + extra_targets)
    assert merged.pruning_record["method"] == "magnitude"  # the pruning record is kept


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_merge_and_unload_keeps_exact_sparsity(arch):
    model = pruned_model(arch)
    masks = {name: keep.clone() for name, keep in model.pruning_masks.items()}
    ids = make_windows(2, 12, seed=2)
    peft_model = get_masked_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch]))
    randomize_lora(peft_model, seed=1)
    before = full_deltas(peft_model)
    unmerged = logits(peft_model, ids)

    merged = peft_model.merge_and_unload()

    assert merged is model and merged.pruning_masks.keys() == masks.keys()
    assert_merged_exactly(merged, masks, before)
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=0)


def test_stock_lora_breaks_sparsity_and_merge_refuses_it():
    model = pruned_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    randomize_lora(peft_model)
    with pytest.raises(ValueError, match="stock LoRA layers.*load_masked_adapter"):
        merge_masked_lora(peft_model)

    merged = peft_model.merge_and_unload()

    params = dict(merged.named_parameters())
    revived = sum(int((params[name][~keep] != 0).sum()) for name, keep in merged.pruning_masks.items())
    assert revived == merged.pruning_sparsity()["num_pruned"]  # every pruned weight came back
    with pytest.raises(ValueError, match="non-zero"):
        merged.check_pruned_weights()


def test_rank_and_alpha_pattern():
    model = pruned_model("llama")
    masks = {name: keep.clone() for name, keep in model.pruning_masks.items()}
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS["llama"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"model.layers.0.self_attn.q_proj": 16},
    )
    peft_model = get_masked_peft_model(model, config)
    layers = model.model.layers
    expected = {  # module -> (rank, scaling)
        layers[0].self_attn.q_proj: (2, 16 / 2),
        layers[1].self_attn.q_proj: (4, 8 / 4),
        layers[1].mlp.down_proj: (6, 8 / 6),
        layers[0].mlp.down_proj: (4, 8 / 4),
    }
    for module, (rank, scaling) in expected.items():
        assert isinstance(module, MaskedLoraLinear)
        assert module.lora_A["default"].weight.shape[0] == rank
        assert module.scaling["default"] == pytest.approx(scaling)
    randomize_lora(peft_model, seed=2)
    before = full_deltas(peft_model)
    ids = make_windows(2, 12, seed=3)
    unmerged = logits(peft_model, ids)

    merged = merge_masked_lora(peft_model)

    assert_merged_exactly(merged, masks, before)
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=0)
    recovery = merged.pruning_record["recovery"]
    assert recovery["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 6}
    assert recovery["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 16}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_save_and_reload(tmp_path, arch):
    peft_model = get_masked_peft_model(pruned_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch]))
    randomize_lora(peft_model, seed=3)
    ids = make_windows(2, 12, seed=4)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")
    files = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert MASKS_NAME not in files and "model.safetensors" not in files
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    reloaded = load_masked_adapter(pruned_model(arch), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-6, rtol=0)
    assert sum(isinstance(m, MaskedLoraLinear) for m in reloaded.modules()) > 0

    # peft alone rebuilds stock LoRA layers: other logits, and merging them is refused
    stock = PeftModel.from_pretrained(pruned_model(arch), tmp_path / "adapter")
    assert (logits(stock, ids) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="load_masked_adapter"):
        merge_masked_lora(stock)


def test_merged_checkpoint_round_trip(tmp_path):
    peft_model = get_masked_peft_model(
        pruned_model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], rank_pattern={"model.layers.0.mlp.up_proj": 2}),
    )
    randomize_lora(peft_model, seed=4)
    merged = merge_masked_lora(peft_model)
    ids = make_windows(2, 12, seed=5)
    out = tmp_path / "recovered"
    merged.save_pretrained(out)

    saved = json.loads((out / PRUNING_CONFIG_NAME).read_text())
    assert saved["recovery"] == merged.pruning_record["recovery"]
    assert saved["recovery"]["rank_pattern"] == {"model.layers.0.mlp.up_proj": 2}
    assert saved["sparsity"] == 0.4 and saved["method"] == "magnitude"
    assert {MASKS_NAME, "README.md", "model.safetensors"} <= {path.name for path in out.iterdir()}

    loaded = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert loaded.pruning_masks.keys() == merged.pruning_masks.keys()
    for name, keep in merged.pruning_masks.items():
        assert torch.equal(loaded.pruning_masks[name], keep), name
    assert loaded.pruning_record["recovery"] == saved["recovery"]
    assert loaded.pruning_config == merged.pruning_config
    loaded.check_pruned_weights()
    torch.testing.assert_close(logits(loaded, ids), logits(merged, ids), atol=1e-6, rtol=0)

    loaded.save_pretrained(tmp_path / "again")  # the record survives a second save
    assert json.loads((tmp_path / "again" / PRUNING_CONFIG_NAME).read_text())["recovery"] == saved["recovery"]


def test_second_recovery_keeps_the_first_in_the_record():
    first = merge_masked_lora(get_masked_peft_model(pruned_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])))
    first_record = dict(first.pruning_record["recovery"])
    peft_model = get_masked_peft_model(first, LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_lora(peft_model, seed=5)

    second = merge_masked_lora(peft_model)

    second.check_pruned_weights()
    recovery = second.pruning_record["recovery"]
    assert recovery["r"] == 2 and recovery["target_modules"] == ["v_proj"]
    assert recovery["previous"] == first_record and first_record["r"] == 4


def test_stock_trainer_keeps_masks(tmp_path):
    model = pruned_model("llama")
    masks = {name: keep.clone() for name, keep in model.pruning_masks.items()}
    base_weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    peft_model = get_masked_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
    ids = make_windows(16, 12, seed=6)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )
    Trainer(model=peft_model, args=args, train_dataset=dataset).train()

    base = peft_model.get_base_model()
    params = {name.replace(".base_layer", ""): p for name, p in base.named_parameters() if "lora_" not in name}
    for name, weight in base_weights.items():
        assert torch.equal(params[name].detach(), weight), name  # frozen base, pruned entries still exactly 0
    assert all(
        p.abs().max() > 0 for name, p in peft_model.named_parameters() if ".lora_B." in name
    )  # training moved every B away from its zero init
    before = full_deltas(peft_model)
    trained = logits(peft_model.eval(), ids[:2])

    merged = merge_masked_lora(peft_model)

    assert_merged_exactly(merged, masks, before)
    torch.testing.assert_close(logits(merged, ids[:2]), trained, atol=1e-5, rtol=0)


def test_model_without_masks_is_refused():
    plain = build_tiny("llama")
    with pytest.raises(ValueError, match="AutoPrunedModelForCausalLM.from_pretrained.*make_pruned"):
        get_masked_peft_model(plain, LoraConfig(r=4, target_modules=["q_proj"]))
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())  # left untouched


@pytest.mark.parametrize(
    "config, error, match",
    [
        (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), ValueError, "variants \\['use_dora'\\]"),
        (LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"), ValueError, "'pissa'.*valid"),
        (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["down_proj"]), ValueError, "down_proj"),
        (IA3Config(target_modules=["q_proj"], feedforward_modules=[]), TypeError, "LoraConfig, got IA3Config"),
    ],
)
def test_unsupported_configs_are_refused(config, error, match):
    model = pruned_model("llama")
    with pytest.raises(error, match=match):
        get_masked_peft_model(model, config)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_wrong_inputs_are_refused():
    peft_model = get_masked_peft_model(pruned_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="got a PeftModel"):
        get_masked_peft_model(peft_model, LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(TypeError, match="expects a peft.PeftModel.*LlamaForCausalLM"):
        merge_masked_lora(peft_model.get_base_model())
    with pytest.raises(ValueError, match="adapter_names=\\['default', 'default'\\]"):
        peft_model.eval()(input_ids=make_windows(2, 8), adapter_names=["default", "default"])


def test_recover_is_reproducible_by_its_seed_whatever_ran_before(tmp_path):
    """The LoRA adapters are created before the Trainer seeds, so `recover` seeds first: the same seed gives the same
    merged weights even when other code drew random numbers in between."""
    from hf_dpruner.recovery import RecoveryArguments, recover

    from testing_utils import text, word_tokenizer

    def run(draws: int):
        model = pruned_model("llama")  # (builds with a fixed seed)
        torch.rand(draws)  # other work in the same process, after it
        training = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                                     save_strategy="no", disable_tqdm=True, seed=3, learning_rate=1e-2)
        args = RecoveryArguments(lora_r=2, num_samples=4, seq_len=16)
        return recover(model, word_tokenizer(), [text(5, 400)], [], args, training).model.state_dict()

    first, second = run(1), run(1000)
    assert all(torch.equal(first[k], second[k]) for k in first)
