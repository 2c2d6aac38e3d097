"""PAT on the MLP-neuron axis (``PATConfig(axis="neurons")``): per-layer masks, their start, the export."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_dpruner.commands.cli import main
from hf_dpruner.pat import PAT_CONFIG_NAME, PATConfig, SharedChannelMask, get_pat_model, get_pat_modules

from testing_utils import NEURONS_LEARNED, build_tiny, export_with_masked_logits, make_windows, pat_trainer, text


def test_a_grouped_mask_keeps_the_top_k_of_each_row_and_counts_each_row():
    mask = SharedChannelMask(6, 2, num_groups=3)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([[5.0, 4, 0, 0, 0, 0], [0, 0, 0, 0, 2, 3], [1, 0, 9, 0, 0, 0]]))
    assert mask.kept_indices().tolist() == [[0, 1], [4, 5], [0, 2]]
    mask.set_progress(10, 10)
    assert mask.is_binary and mask.gate().detach().sum(-1).tolist() == [2.0, 2.0, 2.0]
    assert mask.num_open() == 6 and float(mask.active_loss()) == 0.0
    mask.set_progress(0, 10)  # all open: 6 of 6 per row against a target of 2, the mean over the rows
    assert mask.num_open() == 18 and float(mask.active_loss()) == pytest.approx(4 / 6)


def test_the_config_refuses_an_unknown_axis_and_taylor_on_neurons():
    with pytest.raises(ValueError, match="axis must be one of"):
        PATConfig(axis="heads")
    with pytest.raises(ValueError, match="axis='neurons' use 'activation'"):
        PATConfig(axis="neurons", mask_init="taylor")


def test_the_neuron_masks_start_from_each_neurons_output_energy(tmp_path):
    model = build_tiny("llama")
    x = make_windows(32, 16)[:16]  # the training windows mask_init measures (the first 16 of pat_trainer's)
    inputs = []  # the dense model's down_proj inputs h, gathered independently of the library
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
               for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=x)
    for handle in handles:
        handle.remove()
    expected = [
        torch.topk(h.pow(2).sum((0, 1)) * layer.mlp.down_proj.weight.detach().pow(2).sum(0), 96).indices.sort().values
        for h, layer in zip(inputs, model.model.layers, strict=True)
    ]
    trainer = pat_trainer(model, tmp_path, PATConfig(**NEURONS_LEARNED, pruning_ratio=0.25, lora_r=4), train=False)
    importance = trainer.initialize_mask()
    assert importance.shape == (2, 128)
    kept = trainer.pat.mask.kept_indices()
    assert kept.shape == (2, 96)
    for layer in range(2):
        assert kept[layer].tolist() == expected[layer].tolist()


@pytest.mark.parametrize("arch,tied,lora_r", [("llama", False, 4), ("qwen2", True, 4), ("mistral", False, 0)])
def test_neuron_pat_exports_a_smaller_intermediate_size_with_the_same_logits(tmp_path, arch, tied, lora_r):
    model = build_tiny(arch, tie_word_embeddings=tied)
    dense_params = model.num_parameters()
    trainer = pat_trainer(model, tmp_path, PATConfig(**NEURONS_LEARNED, pruning_ratio=0.25, lora_r=lora_r))
    pat = get_pat_modules(trainer.model)
    assert not pat.hsms and pat.mask.is_binary
    assert pat.mask.gate().detach().sum(-1).tolist() == [96.0, 96.0]
    out = tmp_path / "export"
    small, _ = export_with_masked_logits(trainer, out)
    assert small.config.intermediate_size == 96 and small.config.hidden_size == 64
    assert small.num_parameters() == dense_params - 2 * 32 * 3 * 64  # 32 neurons x (gate row, up row, down col)
    record = json.loads((out / PAT_CONFIG_NAME).read_text())
    assert record["axis"] == "neurons"
    assert record["export"]["intermediate_size"] == {"before": 128, "after": 96}
    assert "hidden_size" not in record["export"]
    card = (out / "README.md").read_text()
    assert "`intermediate_size` 128 → 96" in card and "MLP neurons" in card and "Hybrid Sparsification" not in card


def test_the_distillation_teacher_sees_every_neuron(tmp_path):
    """With the PAT modules bypassed and the adapters off, the neuron-masked model is the dense model again."""
    model = build_tiny("llama")
    x = make_windows(2, 10)
    with torch.no_grad():
        dense = model(input_ids=x).logits
    wrapped = get_pat_model(model, PATConfig(**NEURONS_LEARNED, pruning_ratio=0.5, lora_r=4))
    assert isinstance(wrapped, PeftModel)
    pat = get_pat_modules(wrapped)
    pat.mask.set_progress(10, 10)
    with torch.no_grad():
        masked = wrapped(input_ids=x).logits
        with wrapped.disable_adapter(), pat.bypassed():
            teacher = wrapped(input_ids=x).logits
    assert (masked - dense).abs().max() > 1e-3
    torch.testing.assert_close(teacher, dense)


def test_cli_pat_on_the_neuron_axis(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "train.txt").write_text("\n".join(text(i, 200) for i in range(10)))
    out = tmp_path / "out"
    assert main([
        "pat", "--model", str(tiny_model_dir), "--data", str(tmp_path / "train.txt"), "--axis", "neurons",
        "--strategy", "learned", "--pruning-ratio", "0.5", "--max-steps", "4", "--seq-len", "16", "--output-dir",
        str(out), "--disable-tqdm", "true", "--report-to", "none",
    ]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex('{\n  "intermediate_size"'):])
    before = summary["intermediate_size"]["before"]
    assert summary["intermediate_size"]["after"] == before // 2
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == before // 2
