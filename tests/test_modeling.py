"""Pruned models: checkpoint format, plain and pruned loading, masks kept through training, casts and saves."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from hf_dpruner import (
    AutoPrunedModelForCausalLM,
    DPrunerConfig,
    PrunedModelMixin,
    make_pruned,
)
from hf_dpruner.config import PRUNING_CONFIG_NAME
from hf_dpruner.importance import MagnitudeImportance
from hf_dpruner.masks import MASKS_NAME, compute_masks, load_masks
from hf_dpruner.targets import find_prunable_weights

ARCH_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def prune(model: PreTrainedModel, config: DPrunerConfig | None = None) -> PreTrainedModel:
    config = config or DPrunerConfig(sparsity=0.5)
    weights = find_prunable_weights(model, config.target_modules)
    masks = compute_masks(MagnitudeImportance().score(model, weights), weights, config)
    return make_pruned(model, masks, config, record={"method": "magnitude", "base_model": "tiny"}, apply=True)


def assert_pruned_zero(model, masks) -> None:
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        weight = params[name].detach()
        assert (weight[~keep.to(weight.device)] == 0).all(), name


def measured_sparsity(model, names) -> tuple[float, dict[str, float]]:
    params = dict(model.named_parameters())
    zeros = {name: int((params[name] == 0).sum()) for name in names}
    total = sum(params[name].numel() for name in names)
    return sum(zeros.values()) / total, {name: zeros[name] / params[name].numel() for name in names}


def token_dataset(n: int = 8, length: int = 12, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


# ---------------------------------------------------------------- checkpoint format and loading


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_save_and_load_round_trip(model_factory, random_windows, tmp_path, arch):
    model = prune(model_factory(arch))
    masks = {name: keep.clone() for name, keep in model.pruning_masks.items()}
    assert isinstance(model, PrunedModelMixin)
    assert type(model).__name__ == ARCH_CLASSES[arch]
    assert_pruned_zero(model, masks)
    ids = random_windows(2, 10, seed=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits

    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", PRUNING_CONFIG_NAME, MASKS_NAME} <= files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp/backup folders left
    assert json.loads((out / "config.json").read_text())["architectures"] == [ARCH_CLASSES[arch]]
    assert set(load_masks(out / MASKS_NAME)) == set(masks)

    # a plain transformers load: standard class, zeros in place, same logits
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain).__name__ == ARCH_CLASSES[arch]
    assert not isinstance(plain, PrunedModelMixin)
    assert_pruned_zero(plain, masks)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, logits)

    # the pruned load re-attaches equal masks, config and record
    loaded = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, PrunedModelMixin)
    assert set(loaded.pruning_masks) == set(masks)
    for name, keep in masks.items():
        assert loaded.pruning_masks[name].dtype == torch.bool
        assert torch.equal(loaded.pruning_masks[name], keep)
    assert loaded.pruning_config == DPrunerConfig(sparsity=0.5)
    assert loaded.pruning_record == {"method": "magnitude", "base_model": "tiny"}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)

    # recorded sparsity == sparsity measured on the loaded weights
    record = json.loads((out / PRUNING_CONFIG_NAME).read_text())
    overall, per_matrix = measured_sparsity(plain, masks)
    achieved = record["achieved_sparsity"]
    assert achieved["overall"] == pytest.approx(overall, abs=1e-12)
    assert achieved["overall"] == pytest.approx(0.5, abs=1e-3)
    assert achieved["num_pruned"] == sum(int((~k).sum()) for k in masks.values())
    assert achieved["num_targeted"] == sum(k.numel() for k in masks.values())
    assert set(achieved["per_matrix"]) == set(masks)
    for name, value in per_matrix.items():
        assert achieved["per_matrix"][name] == pytest.approx(value, abs=1e-12)
    assert record["method"] == "magnitude" and record["base_model"] == "tiny"
    assert record["hf_dpruner_version"]


def test_loaded_model_saves_again_identically(model_factory, tmp_path):
    prune(model_factory("llama")).save_pretrained(tmp_path / "a")
    AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    for name in ("model.safetensors", MASKS_NAME):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / PRUNING_CONFIG_NAME).read_text()) == json.loads(
        (tmp_path / "b" / PRUNING_CONFIG_NAME).read_text()
    )


def test_partial_targets_and_n_m_round_trip(model_factory, tmp_path):
    config = DPrunerConfig(sparsity_type="2:4", target_modules=["q_proj", "up_proj"])
    model = prune(model_factory("qwen2"), config)
    assert len(model.pruning_masks) == 4
    model.save_pretrained(tmp_path)
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.pruning_config == config
    for keep in loaded.pruning_masks.values():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
    assert json.loads((tmp_path / PRUNING_CONFIG_NAME).read_text())["achieved_sparsity"]["overall"] == 0.5


def test_load_with_dtype_keeps_zeros(model_factory, tmp_path):
    model = prune(model_factory("llama"))
    model.save_pretrained(tmp_path)
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert_pruned_zero(loaded, model.pruning_masks)


# ---------------------------------------------------------------- masks survive training and casts


def _train_steps(model, optimizer, ids, steps=3):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
        lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.1),  # L2 form: decay enters the gradient
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adamw", "adam-l2", "sgd-momentum"],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_optimizer_steps_keep_pruned_weights_zero(model_factory, random_windows, make_optimizer, arch):
    model = prune(model_factory(arch))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model, make_optimizer(model.parameters()), random_windows(4, 12, seed=2))
    assert_pruned_zero(model, model.pruning_masks)
    params = dict(model.named_parameters())
    for name, keep in model.pruning_masks.items():
        assert not torch.equal(params[name][keep], before[name][keep])  # kept weights did train


def test_pruned_gradients_are_zero(model_factory, random_windows):
    model = prune(model_factory("llama"))
    ids = random_windows(2, 12)
    model(input_ids=ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    for name, keep in model.pruning_masks.items():
        assert (params[name].grad[~keep] == 0).all()
        assert (params[name].grad[keep] != 0).any()


def test_stock_trainer_keeps_pruned_weights_zero(model_factory, tmp_path):
    model = prune(model_factory("llama"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        weight_decay=0.1,
        optim="adamw_torch",
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(12))
    trainer.train()
    assert trainer.state.global_step == 3
    assert_pruned_zero(model, model.pruning_masks)
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n][k], before[n][k]) for n, k in model.pruning_masks.items())

    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / MASKS_NAME).is_file()
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, keep in model.pruning_masks.items():
        assert torch.equal(loaded.pruning_masks[name], keep)
        assert torch.equal(dict(loaded.named_parameters())[name], params[name].detach())


def test_bfloat16_cast_keeps_zeros_and_masks(model_factory, random_windows, tmp_path):
    model = prune(model_factory("mistral"))
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert_pruned_zero(model, model.pruning_masks)
    _train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), random_windows(2, 8))
    assert_pruned_zero(model, model.pruning_masks)  # the gradient hooks survive the cast
    model.save_pretrained(tmp_path)
    loaded = AutoPrunedModelForCausalLM.from_pretrained(tmp_path)
    assert_pruned_zero(loaded, model.pruning_masks)


def test_make_pruned_again_replaces_gradient_hooks(model_factory, random_windows):
    model = prune(model_factory("llama"))
    old = {name: keep.clone() for name, keep in model.pruning_masks.items()}
    # re-prune with a keep-all mask: previously pruned positions must get gradients again
    make_pruned(model, {name: torch.ones_like(keep) for name, keep in old.items()})
    ids = random_windows(2, 12)
    model(input_ids=ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    for name, keep in old.items():
        assert (params[name].grad[~keep] != 0).any(), name


def test_masks_survive_a_cast_that_replaces_parameters(model_factory, random_windows):
    model = prune(model_factory("llama"))
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    _train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), random_windows(2, 8))
    assert_pruned_zero(model, model.pruning_masks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_after_moving_a_pruned_model_to_cuda(model_factory, random_windows):
    model = prune(model_factory("llama")).to("cuda")
    ids = random_windows(2, 8).cuda()
    _train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), ids)
    assert_pruned_zero(model, model.pruning_masks)


# ---------------------------------------------------------------- errors


def test_mask_with_wrong_shape_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match=r"has shape \(64, 128\) but the weight has \(128, 64\)"):
        make_pruned(tiny_llama, {"model.layers.0.mlp.up_proj.weight": torch.ones(64, 128, dtype=torch.bool)})
    assert not isinstance(tiny_llama, PrunedModelMixin)


def test_mask_for_unknown_parameter_is_rejected(tiny_llama):
    with pytest.raises(ValueError, match="does not have, e.g. 'model.layers.7.mlp.up_proj.weight'"):
        make_pruned(tiny_llama, {"model.layers.7.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)})


def test_non_zero_weights_under_a_pruning_mask_are_rejected(tiny_llama):
    keep = torch.ones(128, 64, dtype=torch.bool)
    keep[3, 5] = False
    with pytest.raises(ValueError, match="1 weights of model.layers.0.mlp.up_proj.weight"):
        make_pruned(tiny_llama, {"model.layers.0.mlp.up_proj.weight": keep}, apply=False)
    make_pruned(tiny_llama, {"model.layers.0.mlp.up_proj.weight": keep}, apply=True)
    assert tiny_llama.model.layers[0].mlp.up_proj.weight[3, 5] == 0


def test_saving_revived_weights_is_rejected(model_factory, tmp_path):
    model = prune(model_factory("llama"))
    name, keep = next(iter(model.pruning_masks.items()))
    with torch.no_grad():
        dict(model.named_parameters())[name][~keep] = 1.0
    with pytest.raises(ValueError, match="non-zero"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.apply_pruning_masks()
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / MASKS_NAME).is_file()


def test_saving_to_a_file_path_is_rejected(model_factory, tmp_path):
    model = prune(model_factory("llama"))
    target = tmp_path / "file.bin"
    target.write_text("x")
    with pytest.raises(ValueError, match="it is a file"):
        model.save_pretrained(target)
    assert target.read_text() == "x"


def test_non_main_process_writes_nothing(model_factory, tmp_path):
    prune(model_factory("llama")).save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failed_save_leaves_no_folder(model_factory, tmp_path, monkeypatch, error):
    model = prune(model_factory("llama"))

    def failing(self, save_directory, *args, **kwargs):
        (save_directory / "model.safetensors").write_bytes(b"half written")
        raise error("interrupted")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing)
    with pytest.raises(error):
        model.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_checkpoint(model_factory, tmp_path, monkeypatch):
    model = prune(model_factory("llama"))
    out = tmp_path / "out"
    model.save_pretrained(out)
    snapshot = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr("hf_dpruner.modeling.save_masks", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        model.save_pretrained(out)
    assert os.listdir(tmp_path) == ["out"]
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == snapshot


def test_saving_into_existing_folder_keeps_user_files_and_replaces_weights(model_factory, tmp_path):
    out = tmp_path / "out"
    model = prune(model_factory("llama"))
    model.save_pretrained(out)
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("keep me")
    (out / "model.safetensors.index.json").write_text("{}")  # stale file from an older sharded save

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    model.save_pretrained(out)

    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "notes" / "a.txt").read_text() == "keep me"
    assert not (out / "model.safetensors.index.json").exists()
    assert os.listdir(tmp_path) == ["out"]  # no temp or backup folders
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_saving_into_a_git_clone_keeps_git_files(model_factory, tmp_path):
    out = tmp_path / "out"
    model = prune(model_factory("llama"))
    model.save_pretrained(out)
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    model.save_pretrained(out)
    assert (out / ".gitattributes").is_file()
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"


def test_saving_into_existing_folder_keeps_user_files_named_model_something(model_factory, tmp_path):
    out = tmp_path / "out"
    model = prune(model_factory("llama"))
    model.save_pretrained(out)
    (out / "model_card.md").write_text("my notes")
    model.save_pretrained(out)
    assert (out / "model_card.md").read_text() == "my notes"


def test_loading_a_folder_without_masks_is_file_not_found(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=MASKS_NAME):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path)


def test_loading_a_truncated_mask_file_is_a_value_error(model_factory, tmp_path):
    prune(model_factory("llama")).save_pretrained(tmp_path)
    data = (tmp_path / MASKS_NAME).read_bytes()
    (tmp_path / MASKS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path)


def test_loading_masks_of_another_model_is_a_value_error(model_factory, tmp_path):
    prune(model_factory("llama")).save_pretrained(tmp_path / "llama")
    prune(model_factory("llama", intermediate_size=96)).save_pretrained(tmp_path / "other")
    os.replace(tmp_path / "other" / MASKS_NAME, tmp_path / "llama" / MASKS_NAME)
    with pytest.raises(ValueError, match="sha256"):  # the recorded checksum catches the swap first
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "llama")
    record_file = tmp_path / "llama" / PRUNING_CONFIG_NAME
    record = json.loads(record_file.read_text())
    del record["masks_sha256"]  # a checkpoint saved before checksums were recorded
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="belongs to another model"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path / "llama")


def test_loading_weights_that_disagree_with_masks_is_a_value_error(model_factory, tmp_path):
    prune(model_factory("llama")).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors[name] = torch.ones_like(tensors[name])
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.self_attn.v_proj.weight that the pruning mask removes"):
        AutoPrunedModelForCausalLM.from_pretrained(tmp_path)


def test_auto_pruned_class_cannot_be_instantiated():
    with pytest.raises(OSError, match="from_pretrained"):
        AutoPrunedModelForCausalLM()
