"""Nothing we write or upload is a pickle, and no pickle is loaded unless the user opts in."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_dpruner import AutoPrunedModelForCausalLM
from hf_dpruner.commands.cli import main as cli_main
from hf_dpruner.modeling import load_causal_lm

from testing_utils import make_trainer, pruned_tiny, text, word_tokenizer

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def pickles_in(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)


def test_trainer_save_model_writes_no_pickle_and_keeps_the_training_arguments_as_json(tmp_path):
    trainer = make_trainer(tmp_path, processing_class=word_tokenizer())
    trainer.prune()
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "training_args.bin").write_bytes(b"pickle of an earlier save")  # stale: dropped by the save
    (out / "notes.txt").write_text("mine")
    trainer.save_model(str(out))
    assert pickles_in(out) == []
    assert json.loads((out / "training_args.json").read_text())["learning_rate"] == trainer.args.learning_rate
    assert (out / "tokenizer.json").is_file() and (out / "notes.txt").read_text() == "mine"
    loaded = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert loaded.pruning_sparsity()["overall"] == pytest.approx(0.5, abs=1e-3)


def test_cli_outputs_hold_no_pickle(tiny_model_dir, tmp_path):  # noqa: F811
    (tmp_path / "domain.txt").write_text(text(5, 600))
    (tmp_path / "general.txt").write_text(text(6, 400))
    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    assert cli_main(["prune", "--method", "dpruner",
                     "--model", str(tiny_model_dir), "--general-data", str(tmp_path / "general.txt"),
                     "--domain-data", str(tmp_path / "domain.txt"), "--num-samples", "4", "--seq-len", "16",
                     "--output-dir", str(pruned), "--disable-tqdm", "true"]) == 0
    assert cli_main(["recover", str(pruned), "--data", str(tmp_path / "domain.txt"), "--lora-r", "4",
                     "--num-samples", "4", "--seq-len", "16", "--max-steps", "2", "--per-device-train-batch-size",
                     "2", "--disable-tqdm", "true", "--output-dir", str(recovered)]) == 0
    assert (recovered / "adapter" / "adapter_model.safetensors").is_file()
    assert pickles_in(pruned) == [] and pickles_in(recovered) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_push_leaves_pickles_out_and_names_them(tmp_path, fake_hub, caplog):  # noqa: F811
    folder = tmp_path / "med-50"
    pruned_tiny().save_pretrained(folder)
    for name in ("training_args.bin", "optimizer.pt", "sub/rng_state.pth", "x.pkl"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"pickle")
    with caplog.at_level("WARNING"):
        assert cli_main(["push", str(folder), "--repo-id", "me/med-50"]) == 0
    uploaded = fake_hub[-1][2]
    assert "model.safetensors" in uploaded and "pruning_masks.safetensors" in uploaded
    assert not [name for name in uploaded if any(name.endswith(s) for s in PICKLE_SUFFIXES)]
    assert "Not uploading 4 pickle file(s)" in caplog.text and "sub/rng_state.pth" in caplog.text


def test_a_folder_with_only_pickled_weights_is_refused_with_what_to_do(tmp_path):
    folder = tmp_path / "legacy"
    (tmp_path / "t.txt").write_text(text(1, 200))
    model = pruned_tiny()
    AutoModelForCausalLM.from_config(model.config).save_pretrained(folder)
    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    word_tokenizer().save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")  # the legacy format, to be refused
    with pytest.raises(ValueError, match=r"only as pytorch_model\.bin.*Convert.*allow_pickle=True"):
        load_causal_lm(folder)
    assert load_causal_lm(folder, allow_pickle=True).num_parameters() == model.num_parameters()
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        cli_main(["eval", str(folder), "--no-baseline", "--general-data", str(tmp_path / "t.txt"), "--domain-data",
                  str(tmp_path / "t.txt"), "--max-tokens", "32", "--seq-len", "16"])


def test_safe_serialization_off_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pickle"):
        pruned_tiny().save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()
