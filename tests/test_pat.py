"""PAT: HSMs, the shared mask schedule, the Identity Loss, the trainer and the export of a smaller model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.testing_utils import CaptureLogger

from hf_dpruner.commands.cli import SUBCOMMANDS, main
from hf_dpruner.pat import (
    PAT_CONFIG_NAME,
    HybridSparsificationModule,
    PATConfig,
    PATTrainer,
    SharedChannelMask,
    export_pat_model,
    get_pat_model,
    get_pat_modules,
)
from hf_dpruner.pat.export import logger as export_logger

from testing_utils import PAT_LEARNED, build_tiny, export_with_masked_logits, make_windows, pat_trainer, text


def test_new_hsm_with_open_gate_is_exactly_the_identity():
    torch.manual_seed(0)
    hsm = HybridSparsificationModule(64, 4)
    x = torch.randn(2, 5, 64)
    assert torch.equal(hsm(x, torch.ones(64)), x)
    assert torch.equal(hsm.transform_matrix(), torch.eye(64))
    with torch.no_grad():
        hsm.up.normal_()
    assert not torch.allclose(hsm(x, torch.ones(64)), x)
    # the transform is what the module computes
    assert torch.allclose(hsm(x, torch.ones(64)), x @ hsm.transform_matrix().t(), atol=1e-5)


def test_gate_zeroes_closed_channels():
    hsm = HybridSparsificationModule(8, 2)
    gate = torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 1])
    out = hsm(torch.randn(3, 8), gate)
    assert torch.all(out[:, gate == 0] == 0) and torch.all(out[:, gate == 1] != 0)


def test_identity_loss_is_zero_for_orthonormal_rows_only():
    hsm = HybridSparsificationModule(32, 4)
    assert float(hsm.identity_loss().detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        hsm.down.mul_(2.0)  # rows of norm 2: A A^T = 4 I, loss = 4 * 3^2
    assert float(hsm.identity_loss().detach()) == pytest.approx(36.0, rel=1e-5)
    assert HybridSparsificationModule(32, 4, transform=False).identity_loss() == 0


def test_mask_schedule_opens_everything_then_ends_binary_with_the_target_count():
    mask = SharedChannelMask(64, 48, warmup_fraction=1 / 3)
    with torch.no_grad():
        mask.logits.copy_(torch.linspace(-1, 1, 64))
    mask.set_progress(0, 30)
    assert mask.warmup_steps == 10
    assert torch.allclose(mask.gate(), torch.ones(64)) and mask.temperature() == 0.0
    temperatures = []
    for step in range(1, 10):
        mask.set_progress(step, 30)
        assert not mask.is_binary
        temperatures.append(mask.temperature())
        assert mask.offset() == pytest.approx(max(0.0, 0.5 - step / 10))
    assert temperatures == sorted(temperatures) and temperatures[0] == pytest.approx(1.0)
    for step in (10, 20, 30):
        mask.set_progress(step, 30)
        gate = mask.gate()
        assert mask.is_binary and math.isinf(mask.temperature())
        assert set(gate.detach().unique().tolist()) == {0.0, 1.0}
        assert int(gate.sum()) == 48
        assert torch.equal(gate.detach().bool()[16:], torch.ones(48, dtype=torch.bool))  # the largest logits
    # straight-through: the logits still get gradients in the binary phase
    mask.gate().sum().backward()
    assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0


def test_active_loss_pulls_gates_towards_the_target():
    mask = SharedChannelMask(10, 6)
    mask.set_progress(2, 30)  # soft phase, every gate at 0.5 + 0.3
    loss = mask.active_loss()
    assert float(loss) == pytest.approx(0.4)  # |6 - 10| / 10
    loss.backward()
    assert torch.all(mask.logits.grad > 0)  # descending the loss lowers every logit


def test_config_validation_and_round_trip(tmp_path):
    for bad, message in [({"pruning_ratio": 0.0}, "pruning_ratio"), ({"pruning_ratio": 1.0}, "pruning_ratio"),
                         ({"hsm_rank": 0}, "hsm_rank"), ({"mask_warmup_fraction": 0}, "mask_warmup_fraction"),
                         ({"lora_r": -1}, "lora_r"), ({"identity_loss_weight": -1}, "identity_loss_weight"),
                         ({"lora_target_modules": []}, "lora_target_modules")]:
        with pytest.raises(ValueError, match=message):
            PATConfig(**bad)
    config = PATConfig(**PAT_LEARNED, pruning_ratio=0.5, hsm_rank=3, lora_target_modules="q_proj")
    assert config.lora_target_modules == ["q_proj"]
    assert config.kept_channels(576) == 288 and PATConfig().rank_for(576) == 29
    # the hidden axis keeps a multiple of the heads: 0.9 x 576 = 518.4 -> 522 = 58 x 9 (SmolLM2's 9 heads)
    assert PATConfig(**PAT_LEARNED, pruning_ratio=0.1).kept_channels(576, multiple_of=9) == 522
    assert PATConfig(**PAT_LEARNED, pruning_ratio=0.4).kept_channels(576, multiple_of=9) == 342
    assert PATConfig(**PAT_LEARNED, pruning_ratio=0.99).kept_channels(576, multiple_of=9) == 9
    config.save_pretrained(tmp_path, method="pat")
    assert PATConfig.from_pretrained(tmp_path) == config
    # a record from before `axis` and `strategy` existed is PAT on the hidden channels, not today's default
    legacy = {k: v for k, v in json.loads((tmp_path / PAT_CONFIG_NAME).read_text()).items()
              if k not in ("axis", "strategy")}
    (tmp_path / PAT_CONFIG_NAME).write_text(json.dumps(legacy))
    assert PATConfig.from_pretrained(tmp_path) == config
    assert PATConfig.from_dict({"pruning_ratio": 0.5}).strategy == "one-shot"  # not a record: the defaults
    with pytest.raises(ValueError, match="Unknown PATConfig keys"):
        PATConfig.from_dict({"pruning_ratio": 0.5, "sparsity": 0.5})
    (tmp_path / PAT_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PATConfig.from_pretrained(tmp_path)


def test_unsupported_architecture_is_refused():
    with pytest.raises(ValueError, match="PAT supports the Llama family"):
        get_pat_model(build_tiny("gpt2"), PATConfig(**PAT_LEARNED))


@pytest.mark.parametrize("arch,tied,lora_r", [("llama", False, 4), ("llama", True, 4), ("mistral", False, 0),
                                              ("qwen2", True, 4)])
def test_export_computes_the_same_logits_with_fewer_parameters(tmp_path, arch, tied, lora_r):
    model = build_tiny(arch, tie_word_embeddings=tied)
    dense_params = model.num_parameters()
    trainer = pat_trainer(model, tmp_path, PATConfig(**PAT_LEARNED, pruning_ratio=0.25, hsm_rank=4, lora_r=lora_r))
    pat = get_pat_modules(trainer.model)
    assert pat.mask.is_binary and int(pat.mask.gate().detach().sum()) == 48
    if lora_r:  # training moved the HSMs and LoRA away from the identity
        assert any(h.up.abs().sum() > 0 for h in pat.hsms.values() if h.has_transform)
    out = tmp_path / "export"
    small, plain = export_with_masked_logits(trainer, out)  # plain transformers, no custom code, same outputs
    assert small.config.hidden_size == 48 and small.config.head_dim == 16
    assert small.num_parameters() < dense_params
    assert small.config.tie_word_embeddings == tied
    assert type(plain).__name__ == type(model).__name__
    record = json.loads((out / PAT_CONFIG_NAME).read_text())
    assert record["export"]["hidden_size"] == {"before": 64, "after": 48}
    assert record["export"]["parameters"] == {"before": dense_params, "after": small.num_parameters()}
    assert record["training"]["steps"] == 12
    card = (out / "README.md").read_text()
    assert "`hidden_size` 64 → 48" in card and "pat" in card


def test_export_before_the_mask_is_binary_warns_and_differs():
    model = get_pat_model(build_tiny("llama"), PATConfig(**PAT_LEARNED, lora_r=0, hsm_rank=2))
    x = make_windows(2, 8)
    with torch.no_grad():
        masked = model(input_ids=x).logits  # step 0: every channel open, the model is still the dense one
        with CaptureLogger(export_logger) as captured:
            small = export_pat_model(model)
        assert small.config.hidden_size == 48
        assert (small(input_ids=x).logits - masked).abs().max() > 1e-3
    assert "not binary yet" in captured.out


def test_a_failed_export_leaves_no_folder(tmp_path, monkeypatch):
    model = get_pat_model(build_tiny("llama"), PATConfig(**PAT_LEARNED, lora_r=0))
    get_pat_modules(model).mask.set_progress(10, 10)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_dpruner.pat.card.write_pat_card", broken)
    with pytest.raises(OSError, match="disk full"):
        export_pat_model(model, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_gradient_accumulation_counts_the_pat_terms_once(tmp_path):
    """2 micro-batches of 2 with accumulation equal one batch of 4 (SGD, so a doubled term would show)."""
    states = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = build_tiny("llama")
        config = PATConfig(**PAT_LEARNED, lora_r=0, hsm_rank=2, mask_warmup_fraction=1.0, identity_loss_weight=10.0)
        trainer = pat_trainer(model, tmp_path, config, steps=3, optim="sgd", per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation)
        states.append({k: v.detach().clone() for k, v in get_pat_modules(trainer.model).state_dict().items()})
    assert states[0]["mask.logits"].abs().sum() > 0
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-5)


def test_cli_pat_exports_a_smaller_model(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    (tmp_path / "train.txt").write_text("\n".join(text(i, 200) for i in range(10)))
    out = tmp_path / "out"
    code = main([
        "pat", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.txt"), "--pruning-ratio", "0.5",
        "--axis", "hidden", "--strategy", "learned",
        "--max-steps", "6", "--seq-len", "16", "--hsm-rank", "2", "--output-dir", str(out), "--disable-tqdm", "true",
        "--report-to", "none",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex('{\n  "hidden_size"'):])
    assert summary["hidden_size"] == {"before": 64, "after": 32}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.hidden_size == 32 and (out / "tokenizer.json").is_file()
    assert json.loads((out / PAT_CONFIG_NAME).read_text())["training"]["data"] == str(tmp_path / "train.txt")
    # `hf-dpruner eval` reads the base model and the training data from pat_config.json, but local paths outside
    # the export only when the user names them
    (tmp_path / "general.txt").write_text(text(99, 400))
    eval_args = ["eval", str(out), "--general-data", str(tmp_path / "general.txt"), "--seq-len", "16",
                 "--max-tokens", "64"]
    with pytest.raises(ValueError, match="names calibration.domain_data .*pass --domain-data"):
        main(eval_args)
    with pytest.raises(ValueError, match=f"names base_model .*pass --baseline-model {tiny_model_dir}"):
        main([*eval_args, "--domain-data", str(tmp_path / "train.txt")])
    assert main([*eval_args, "--domain-data", str(tmp_path / "train.txt"), "--baseline-model",
                 str(tiny_model_dir)]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["models"]["dense"]["path"] == str(tiny_model_dir)
    assert results["settings"]["domain_data"] == str(tmp_path / "train.txt")
    assert results["models"]["pruned"]["domain"]["perplexity"] > 1


def test_cli_pat_needs_max_steps(tiny_model_dir, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit):
        main(["pat", "--model", str(tiny_model_dir), "--max-steps", "-1", "--output-dir", str(tmp_path / "o")])


def test_resume_from_a_checkpoint_restores_the_pat_modules(tmp_path):
    """6 steps in one go equal 3 steps, a checkpoint, and 3 more steps resumed in a new trainer."""
    config = PATConfig(**PAT_LEARNED, hsm_rank=2, lora_r=2)
    straight = pat_trainer(build_tiny("llama"), tmp_path / "a", config, steps=6)
    expected = get_pat_modules(straight.model).state_dict()

    first = pat_trainer(build_tiny("llama"), tmp_path / "b", config, steps=6, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "b" / "run" / "checkpoint-3"
    assert (checkpoint / "pat_modules.safetensors").is_file()
    del first
    dataset = Dataset.from_dict({"input_ids": make_windows(32, 16).tolist()})
    args = TrainingArguments(str(tmp_path / "c"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", disable_tqdm=True)
    resumed = PATTrainer(model=build_tiny("llama"), args=args, pat_config=config, train_dataset=dataset)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = get_pat_modules(resumed.model).state_dict()
    assert int(got["mask.step"]) == int(expected["mask.step"])
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5)


def test_the_seed_decides_the_adapters_whatever_ran_before(tmp_path):
    """The LoRA adapters and HSMs are created before `Trainer.__init__` seeds, so `PATTrainer` seeds first."""
    def build(draws: int, seed: int):
        model = build_tiny("llama")
        torch.rand(draws)  # other work in the same process
        args = TrainingArguments(str(tmp_path / "run"), max_steps=1, report_to=[], save_strategy="no", seed=seed)
        dataset = Dataset.from_dict({"input_ids": make_windows(8, 16).tolist()})
        trainer = PATTrainer(model=model, args=args, pat_config=PATConfig(**PAT_LEARNED, lora_r=2),
                             train_dataset=dataset)
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_A" in k}

    first, second, other = build(1, 3), build(1000, 3), build(1, 4)
    assert first and all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("subcommand", sorted(SUBCOMMANDS))
def test_every_subcommand_prints_its_help(subcommand, capsys):
    try:
        code = main([subcommand, "--help"])
    except SystemExit as exit:
        code = exit.code
    assert code == 0
    assert "usage" in capsys.readouterr().out.lower()
