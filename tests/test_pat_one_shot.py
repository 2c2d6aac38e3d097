"""`PATConfig()`, the default (`axis="neurons", strategy="one-shot"`): OBS neurons + block reconstruction, then
LoRA, in PATTrainer."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_dpruner.pat.trainer as pat_trainer_module
from hf_dpruner.commands.cli import main
from hf_dpruner.pat import (
    PAT_CONFIG_NAME,
    PATConfig,
    export_pat_model,
    get_pat_model,
    get_pat_modules,
    prune_and_reconstruct,
    prune_mlp_neurons,
    reconstruct_to_teacher,
)

from testing_utils import build_tiny, export_with_masked_logits, make_batches, pat_trainer, text

ONE_SHOT = dict(axis="neurons", strategy="one-shot", pruning_ratio=0.25, lora_r=4, reconstruction_samples=8,
                reconstruction_general_samples=0, reconstruction_epochs=2, mask_init_samples=8)


@pytest.mark.parametrize("field,value,message", [
    ("strategy", "greedy", "strategy must be one of"),
    ("axis", "hidden", "or axis='neurons'"),
    ("lora_r", 0, "set lora_r >= 1"),
    ("distill_weight", 0.5, "set distill_weight=0"),
    ("reconstruction_samples", 0, "reconstruction_samples must be a positive integer"),
    ("reconstruction_epochs", 1.5, "reconstruction_epochs must be a positive integer"),
    ("reconstruction_general_samples", -1, "reconstruction_general_samples must be an integer >= 0"),
    ("reconstruction_learning_rate", 0.0, "reconstruction_learning_rate must be > 0"),
])
def test_the_one_shot_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        PATConfig(**{**ONE_SHOT, field: value})


def test_the_default_is_the_one_shot_recipe_and_the_errors_say_how_to_learn_a_mask():
    config = PATConfig()
    assert (config.axis, config.strategy, config.lora_r) == ("neurons", "one-shot", 8)
    for field, value in (("axis", "hidden"), ("lora_r", 0), ("distill_weight", 0.5)):
        with pytest.raises(ValueError, match="strategy='learned'"):
            PATConfig(**{field: value})
    assert PATConfig(axis="hidden", strategy="learned", distill_weight=0.5).distill_weight == 0.5
    with pytest.raises(ValueError, match="get_pat_model prepares PAT's learned mask; strategy='one-shot'"):
        get_pat_model(build_tiny("llama"), PATConfig())
    assert get_pat_modules(get_pat_model(build_tiny("llama"), None)).config.axis == "hidden"


def test_prune_and_reconstruct_is_obs_then_reconstruction_and_leaves_the_dense_model_alone():
    dense = build_tiny("llama")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    calibration, reconstruction = make_batches(2, 2, 16, seed=1), make_batches(3, 2, 16, seed=2)
    small = prune_and_reconstruct(dense, 32, calibration, reconstruction, epochs=2, lr=1e-3, precision="float32",
                                  disable_tqdm=True)
    expected = prune_mlp_neurons(dense, 32, calibration, selection="obs")
    obs_only = {k: v.clone() for k, v in expected.state_dict().items()}
    reconstruct_to_teacher(expected, dense, reconstruction, epochs=2, lr=1e-3, precision="float32",
                           disable_tqdm=True)
    assert small.config.intermediate_size == 96
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(small.state_dict()[key], value, msg=key)
    assert any(not torch.equal(obs_only[k], v) for k, v in small.state_dict().items())  # reconstruction trained
    for key, value in dense.state_dict().items():
        assert torch.equal(before[key], value), key


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_one_shot_trains_lora_on_the_smaller_model_and_exports_it(tmp_path, arch, tied):
    model = build_tiny(arch, tie_word_embeddings=tied)
    dense_params = model.num_parameters()
    trainer = pat_trainer(model, tmp_path, PATConfig(**ONE_SHOT))
    assert isinstance(trainer.model, PeftModel) and trainer.pat is None
    assert trainer.model.get_base_model().config.intermediate_size == 96
    trained = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert trained and all(p.requires_grad for p in trained)
    assert any(p.detach().abs().max() > 0 for p in trained)  # lora_B starts at zero: the LoRA steps ran
    assert model.config.intermediate_size == 128  # the caller's dense model is not pruned in place
    out = tmp_path / "export"
    small, _ = export_with_masked_logits(trainer, out)
    assert small.config.intermediate_size == 96 and small.config.hidden_size == 64
    assert small.num_parameters() == dense_params - 2 * 32 * 3 * 64  # 32 neurons x (gate row, up row, down col)
    record = json.loads((out / PAT_CONFIG_NAME).read_text())
    assert record["strategy"] == "one-shot" and record["axis"] == "neurons"
    assert record["export"]["intermediate_size"] == {"before": 128, "after": 96}
    assert record["export"]["parameters"] == {"before": dense_params, "after": small.num_parameters()}
    assert record["training"]["steps"] == 12
    card = (out / "README.md").read_text()
    assert "`intermediate_size` 128 → 96" in card and '"one-shot"' in card
    assert "one-shot neuron recipe" in card and "Optimal Brain" in card and "annealed" not in card
    with pytest.raises(ValueError, match="'one-shot'\\) has none: export it with PATTrainer.export"):
        export_pat_model(trainer.model, tmp_path / "wrong")  # the masked-model export does not apply here
    assert not (tmp_path / "wrong").exists()


def test_one_shot_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="pass the base model"):
        pat_trainer(get_peft_model(build_tiny("llama"), LoraConfig(r=2, target_modules="all-linear")), tmp_path,
                    PATConfig(**ONE_SHOT), train=False)
    trainer = pat_trainer(build_tiny("llama"), tmp_path, PATConfig(**ONE_SHOT), train=False)
    with pytest.raises(ValueError, match="train\\(\\) prunes the model first"):
        trainer.export(tmp_path / "early")
    assert not (tmp_path / "early").exists()
    with pytest.raises(ValueError, match="cannot resume"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run"))
    general = pat_trainer(build_tiny("llama"), tmp_path, PATConfig(**{**ONE_SHOT, "reconstruction_general_samples": 4}),
                          train=False)
    with pytest.raises(ValueError, match="pass processing_class=tokenizer, or set reconstruction_general_samples=0"):
        general.train()


def test_cli_one_shot_reconstructs_on_domain_and_general_windows(tiny_model_dir, tmp_path, capsys, monkeypatch):
    corpora = []

    def fake_corpus(name, split="train"):
        corpora.append((name, split))
        return [text(100 + i, 200) for i in range(5)]

    monkeypatch.setattr(pat_trainer_module, "load_corpus_texts", fake_corpus)
    (tmp_path / "train.txt").write_text("\n".join(text(i, 200) for i in range(10)))
    out = tmp_path / "out"
    assert main([
        "pat", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.txt"),  # the default recipe
        "--pruning-ratio", "0.5", "--reconstruction-samples", "4",
        "--reconstruction-general-samples", "2", "--reconstruction-epochs", "1", "--max-steps", "2",
        "--seq-len", "16", "--output-dir", str(out), "--disable-tqdm", "true", "--report-to", "none",
    ]) == 0
    assert corpora == [("general", "train")]
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex('{\n  "intermediate_size"'):])
    before = summary["intermediate_size"]["before"]
    assert summary["intermediate_size"]["after"] == before // 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == before // 2
    assert json.loads((out / PAT_CONFIG_NAME).read_text())["strategy"] == "one-shot"
