"""Distillation in recovery: the masked LoRA learns the dense teacher's next-token distribution, the loss mixes as
documented, counts the same under gradient accumulation, and the CLI finds the teacher the checkpoint records."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from hf_dpruner import AutoPrunedModelForCausalLM, DPrunerConfig, make_pruned
from hf_dpruner.commands.cli import main as cli_main
from hf_dpruner.distillation import distillation_loss_sum
from hf_dpruner.importance import MagnitudeImportance
from hf_dpruner.masks import compute_masks
from hf_dpruner.recovery import DistillationTrainer, RecoveryArguments, get_masked_peft_model, recover
from hf_dpruner.targets import find_prunable_weights

from testing_utils import build_tiny, make_windows, text, word_tokenizer


def _pruned_and_dense():
    dense = build_tiny("llama")
    model = copy.deepcopy(dense)
    weights = find_prunable_weights(model)
    masks = compute_masks(MagnitudeImportance().score(model, weights), weights, DPrunerConfig(sparsity=0.5))
    return make_pruned(model, masks, DPrunerConfig(sparsity=0.5), {"method": "magnitude"}, apply=True), dense


def _trainer(tmp_path, student, teacher, weight, **overrides):
    from peft import LoraConfig

    peft_model = get_masked_peft_model(student, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    data = Dataset.from_dict({"input_ids": make_windows(8, 16).tolist()}).map(lambda r: {"labels": r["input_ids"]})
    settings = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no",
                    disable_tqdm=True, logging_steps=1)
    args = TrainingArguments(str(tmp_path / "run"), **{**settings, **overrides})
    return DistillationTrainer(model=peft_model, args=args, train_dataset=data, teacher=teacher, distill_weight=weight,
                               distill_temperature=2.0)


def test_the_loss_mixes_the_lm_loss_and_the_kl_to_the_teacher(tmp_path):
    student, dense = _pruned_and_dense()
    trainer = _trainer(tmp_path, student, dense, weight=0.3)
    x = make_windows(2, 16, seed=3)
    inputs = {"input_ids": x, "labels": x}
    model = trainer.model.train()
    with torch.no_grad():
        lm = model(**inputs).loss
        kl, count = distillation_loss_sum(model(input_ids=x).logits, dense(input_ids=x).logits, x, 2.0)
        got = trainer.compute_loss(model, inputs)
    assert count == 2 * 15 and float(kl) > 0
    assert float(got) == pytest.approx(0.7 * float(lm) + 0.3 * float(kl) / count, rel=1e-5)


def test_a_teacher_identical_to_the_student_adds_nothing(tmp_path):
    student, _ = _pruned_and_dense()
    trainer = _trainer(tmp_path, student, copy.deepcopy(student), weight=1.0)
    x = make_windows(2, 16, seed=4)
    with torch.no_grad():
        assert float(trainer.compute_loss(trainer.model.train(), {"input_ids": x, "labels": x})) == pytest.approx(
            0.0, abs=1e-6)


def test_distillation_counts_the_same_under_gradient_accumulation(tmp_path):
    states = []
    for batch, accumulation in ((4, 1), (2, 2)):
        student, dense = _pruned_and_dense()
        trainer = _trainer(tmp_path / str(batch), student, dense, weight=0.6, optim="sgd", max_steps=2,
                           per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer.train()
        states.append({k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad})
        assert "distill_loss" in trainer.state.log_history[0]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("distill_weight", 1.5, "distill_weight must be in"),
    ("distill_temperature", 0.0, "distill_temperature must be > 0"),
])
def test_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        RecoveryArguments(**{field: value})


def test_recover_distils_stays_sparse_and_records_it(tmp_path):
    student, dense = _pruned_and_dense()
    tokenizer = word_tokenizer()
    args = RecoveryArguments(lora_r=2, num_samples=4, seq_len=16, distill_weight=0.5)
    training = TrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                                 save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match="needs a teacher"):
        recover(student, tokenizer, [text(5, 400)], [], args, training)
    result = recover(student, tokenizer, [text(5, 400)], [], args, training, teacher=dense)
    result.model.check_pruned_weights()
    assert result.model.pruning_record["recovery"]["distillation"]["weight"] == 0.5


def test_cli_recover_distils_from_the_teacher_it_is_given(tiny_model_dir, tmp_path):
    (tmp_path / "domain.txt").write_text(text(5, 600))
    pruned_dir, out = tmp_path / "pruned", tmp_path / "recovered"
    assert cli_main(["prune", "--method", "magnitude", "--model", str(tiny_model_dir), "--domain-data",
                     str(tmp_path / "domain.txt"), "--num-samples", "4", "--seq-len", "16",
                     "--output-dir", str(pruned_dir), "--disable-tqdm", "true"]) == 0
    flags = ["--lora-r", "2", "--num-samples", "4", "--seq-len", "16", "--max-steps", "2",
             "--per-device-train-batch-size", "2", "--disable-tqdm", "true", "--output-dir", str(out),
             "--data", str(tmp_path / "domain.txt"), "--distill-weight", "0.5", "--distill-temperature", "2"]
    with pytest.raises(ValueError, match="outside its folder.*pass --teacher"):  # the recorded base model folder
        cli_main(["recover", str(pruned_dir), *flags])
    assert cli_main(["recover", str(pruned_dir), *flags, "--teacher", str(tiny_model_dir)]) == 0
    recovery = json.loads((out / "pruning_config.json").read_text())["recovery"]
    assert recovery["distillation"] == {"weight": 0.5, "temperature": 2.0, "teacher": str(tiny_model_dir)}
    card = " ".join((out / "README.md").read_text().split())
    assert f"distilling from `{tiny_model_dir}` (KL weight 0.5, temperature 2.0)" in card
    before = AutoPrunedModelForCausalLM.from_pretrained(pruned_dir)
    after = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(before.pruning_masks[n], after.pruning_masks[n]) for n in before.pruning_masks)
