"""`hf-dpruner` CLI, text loading/windowing and perplexity on tiny models and fabricated files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_dpruner import AutoPrunedModelForCausalLM
from hf_dpruner.commands.cli import main
from hf_dpruner.data import build_windows, load_texts
from hf_dpruner.evaluation import perplexity

from testing_utils import text, word_tokenizer


def test_cli_prune_writes_checkpoint_and_summary(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "general.jsonl").write_text("\n".join(json.dumps({"text": text(i)}) for i in range(10)))
    domain = tmp_path / "domain"
    domain.mkdir()
    for i in range(5):
        (domain / f"doc{i}.txt").write_text(text(100 + i))
    out = tmp_path / "out"
    code = main([
        "prune", "--method", "dpruner",
        "--model", str(tiny_model_dir), "--general-data", str(tmp_path / "general.jsonl"),
        "--domain-data", str(domain), "--sparsity", "0.25", "--sparsity-type", "row", "--num-samples", "6",
        "--seq-len", "16", "--output-dir", str(out), "--disable-tqdm", "true",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "down_proj" in printed and "time: general_importance" in printed and "peak RSS" in printed
    record = json.loads((out / "pruning_config.json").read_text())
    assert record["sparsity"] == 0.25 and record["sparsity_type"] == "row"
    assert record["calibration"]["domain_samples"] == 6 and record["calibration"]["seq_len"] == 16
    assert record["achieved_sparsity"]["overall"] == pytest.approx(0.25, abs=1e-3)
    assert (out / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)
    weight = plain.model.layers[1].mlp.up_proj.weight
    assert ((weight == 0).sum(1) == 16).all()  # 25% of 64 inputs in every row
    assert AutoPrunedModelForCausalLM.from_pretrained(out).pruning_sparsity()["overall"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sparsity", "1.0"], "sparsity must be a number in [0, 1)"),
        (["--sparsity-type", "2:1"], "needs 0 < N < M"),
        (["--target-modules", "nope"], "Unknown target_modules ['nope']"),
        (["--seq-len", "5000"], "fewer than seq_len=5000"),
    ],
)
def test_cli_bad_input_is_explained(tiny_model_dir, tmp_path, flags, message):
    (tmp_path / "d.txt").write_text(text(1, 200))
    with pytest.raises(ValueError) as info:
        main(["prune", "--method", "dpruner", "--model", str(tiny_model_dir), "--general-data", str(tmp_path / "d.txt"),
              "--domain-data", str(tmp_path / "d.txt"), "--output-dir", str(tmp_path / "o"), *flags])
    assert message in str(info.value)


@pytest.mark.parametrize("command", ["prune", "pat"])
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--output-dir", "{tmp}/taken"], "is a file, not a folder"),
        (["--output-dir", "{tmp}/o", "--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    ],
)
def test_bad_flags_are_parser_errors_in_every_subcommand(tiny_model_dir, tmp_path, capsys, command, flags, message):
    (tmp_path / "d.txt").write_text(text(1, 200))
    (tmp_path / "taken").write_text("not a folder")
    data = (["--general-data", str(tmp_path / "d.txt"), "--domain-data", str(tmp_path / "d.txt")] if command == "prune"
            else ["--data", str(tmp_path / "d.txt")])
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", str(tiny_model_dir), *data, *[f.format(tmp=tmp_path) for f in flags]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"hf-dpruner {command}: error:" in err and message in err
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_cli_eval_compares_pruned_and_dense(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "general.txt").write_text(text(3, 300))
    (tmp_path / "domain.txt").write_text(text(4, 300))
    out = tmp_path / "out"
    main(["prune", "--method", "dpruner",
          "--model", str(tiny_model_dir), "--general-data", str(tmp_path / "general.txt"),
          "--domain-data", str(tmp_path / "domain.txt"), "--num-samples", "4", "--seq-len", "16",
          "--output-dir", str(out), "--disable-tqdm", "true"])
    capsys.readouterr()
    eval_args = ["eval", str(out), "--baseline-model", str(tiny_model_dir), "--general-data",
                 str(tmp_path / "general.txt"), "--seq-len", "32"]
    # the recorded domain data is a local file outside the checkpoint: read only when the user names it
    with pytest.raises(ValueError, match=f"pass --domain-data {tmp_path / 'domain.txt'} to use it"):
        main(eval_args)
    assert main([*eval_args, "--domain-data", str(tmp_path / "domain.txt")]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["models"]) == {"dense", "pruned"}
    assert results["settings"]["domain_data"] == str(tmp_path / "domain.txt")
    assert results["settings"]["seq_len"] == 32 and results["settings"]["stride"] == 32
    dense, pruned = results["models"]["dense"], results["models"]["pruned"]
    assert dense["domain"]["num_tokens"] == pruned["domain"]["num_tokens"] > 0
    assert dense["domain"]["perplexity"] != pruned["domain"]["perplexity"]
    printed = capsys.readouterr().out
    assert f"{pruned['general']['perplexity']:.2f}" in printed


def test_cli_dispatcher(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "prune" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown subcommand 'frobnicate'" in capsys.readouterr().err


def test_load_texts_from_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third"}\n')
    (tmp_path / "c.json").write_text('[{"text": "fourth"}, {"text": "  "}]')
    assert load_texts(tmp_path) == ["first document", "second", "third", "fourth"]
    assert load_texts(["x", "", "y"]) == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("   ")
    with pytest.raises(ValueError, match="No non-empty text"):
        load_texts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="Unsupported file type"):
        (tmp_path / "x.docx").write_text("?")
        load_texts(tmp_path / "x.docx")


def test_build_windows_is_deterministic_and_exact():
    tokenizer = word_tokenizer()
    texts = [text(i, 30) for i in range(10)]
    first = build_windows(texts, tokenizer, seq_len=16, num_samples=5, seed=3)
    again = build_windows(texts, tokenizer, seq_len=16, num_samples=5, seed=3)
    other = build_windows(texts, tokenizer, seq_len=16, num_samples=5, seed=4)
    assert first["input_ids"] == again["input_ids"] != other["input_ids"]
    assert len(first) == 5 and {len(ids) for ids in first["input_ids"]} == {16}
    # documents are joined with EOS: the stream is the shuffled documents' tokens + EOS each
    assert tokenizer.eos_token_id in sum(first["input_ids"], [])
    with pytest.raises(ValueError, match="empty"):
        build_windows(["", "  "], tokenizer, 16, 5)


def test_perplexity_matches_hand_computation():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )).eval()
    tokenizer = word_tokenizer()
    texts = [text(7, 20), text(8, 9)]
    ids = tokenizer(texts[0])["input_ids"] + [121] + tokenizer(texts[1])["input_ids"] + [121]  # 31 tokens
    seq_len = 8
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            window = torch.tensor([ids[start : start + seq_len]])
            if window.shape[1] < 2:
                continue
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, window[0, 1:, None]).sum().item()
            count += window.shape[1] - 1
    result = perplexity(model, tokenizer, texts, seq_len=seq_len, batch_size=3, disable_tqdm=True)
    assert result["num_tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    strided = perplexity(model, tokenizer, texts, seq_len=seq_len, stride=4, disable_tqdm=True)
    assert strided["num_tokens"] == len(ids) - 1  # every token but the first scored exactly once
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, texts, seq_len=8, stride=9)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_cli_prune_with_a_baseline_method(tiny_model_dir, tmp_path, method):
    (tmp_path / "domain.txt").write_text(text(5, 400))
    out = tmp_path / method
    assert main(["prune", "--method", method, "--model", str(tiny_model_dir), "--domain-data",
                 str(tmp_path / "domain.txt"), "--sparsity", "0.5", "--num-samples", "4", "--seq-len", "16",
                 "--output-dir", str(out), "--disable-tqdm", "true"]) == 0
    record = json.loads((out / "pruning_config.json").read_text())
    assert record["method"] == method
    assert record["calibration"]["data"] == (None if method == "magnitude" else "domain")
    assert record["achieved_sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert not (out / "training_args.bin").exists()  # only safetensors and JSON in the checkpoint
    assert AutoPrunedModelForCausalLM.from_pretrained(out).pruning_sparsity()["overall"] == pytest.approx(0.5, abs=1e-3)
