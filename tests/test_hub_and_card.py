"""Model cards, Hub upload (with a mocked HfApi: no network here), loading from a repo id, optimum-cli."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import torch
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.repocard_data import (
    eval_results_to_model_index,
    model_index_to_eval_results,
)

import hf_dpruner.hub as hub
from hf_dpruner import AutoPrunedModelForCausalLM
from hf_dpruner.commands.cli import main as cli_main
from hf_dpruner.model_card import build_model_card, write_model_card

from testing_utils import CALIBRATION, build_tiny, pruned_tiny, text, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
def eval_results(general=61.5, domain=33.25):
    return {
        "settings": {"seq_len": 128, "stride": 128, "max_tokens": 2048, "general_data": "general",
                     "domain_data": "medical", "split": "eval"},
        "models": {"dense": {"general": {"perplexity": 20.0}, "domain": {"perplexity": 10.0}},
                   "pruned": {"general": {"perplexity": general}, "domain": {"perplexity": domain},
                              "lm_eval": {"dpruner_mmlu_medical": {"acc": 0.3125, "acc_stderr": 0.02}}}},
    }


# ---- the card ----

def test_saved_card_has_hub_metadata_and_the_recipe(tmp_path):
    model = pruned_tiny()
    model.save_pretrained(tmp_path / "med-50")
    card = ModelCard.load(tmp_path / "med-50" / "README.md")
    data = card.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.base_model_relation == "quantized"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"pruned", "d-pruner", "sparsity-50", "unstructured-sparsity", "medical", "hf_dpruner"} <= set(data.tags)
    assert data.datasets is None  # bundled corpora are not Hub datasets
    text = card.text
    assert "| **overall** (36,864 of 73,728 weights) | **50.0%** |" in text
    assert "| domain | medical | 4 | 64 |" in text
    assert "| `regularization_lambda` | `0.1` |" in text
    assert 'AutoPrunedModelForCausalLM.from_pretrained("med-50")' in text
    assert "arXiv:2405.06275" in text
    assert "not faster" in text  # the honest limit of unstructured sparsity
    # the metadata survives a parse -> dict -> ModelCardData round trip (what the Hub reads)
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()


def test_card_carries_measured_results_into_model_index(tmp_path):
    card = build_model_card(
        {"method": "dpruner", "base_model": "org/base", "sparsity": 0.5, "sparsity_type": "2:4",
         "calibration": {**CALIBRATION, "general_data": "allenai/c4", "domain_data": "medical"},
         "achieved_sparsity": {"overall": 0.5, "num_pruned": 8, "num_targeted": 16,
                               "per_module_type": {"q_proj": 0.5}}},
        eval_results(), repo_id="me/tiny-50",
    )
    parsed = ModelCard(str(card))  # parse the rendered text back, as the Hub does
    results = {(r.metric_name, r.metric_value) for r in parsed.data.eval_results}
    assert results == {("general perplexity", 61.5), ("domain perplexity", 33.25), (None, 0.3125)}
    assert parsed.data.model_name == "tiny-50"
    assert parsed.data.datasets == ["allenai/c4"]
    assert "sparsity-50" in parsed.data.tags and "n-m-sparsity" in parsed.data.tags
    name, index_results = model_index_to_eval_results(eval_results_to_model_index("tiny-50", parsed.data.eval_results))
    assert name == "tiny-50" and len(index_results) == 3
    assert "| pruned | 61.50 | 33.25 |" in parsed.text and "| dense | 20.00 | 10.00 |" in parsed.text
    assert "| pruned | dpruner_mmlu_medical | acc | 0.3125 |" in parsed.text
    assert 'from_pretrained("me/tiny-50")' in parsed.text


def test_license_is_inherited_from_a_local_base_model(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    model = pruned_tiny(base_model=str(base))
    model.save_pretrained(tmp_path / "out")
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert data.license == "mit"
    assert data.base_model is None  # a local folder is not a Hub id


def test_a_user_readme_is_kept_unless_overwrite_card(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my own notes\n")
    model = pruned_tiny()
    model.save_pretrained(out)
    assert (out / "README.md").read_text() == "# my own notes\n"
    model.save_pretrained(out, overwrite_card=True)
    assert "hf_dpruner" in ModelCard.load(out / "README.md").data.tags


def test_generated_card_is_refreshed_and_stale_eval_results_dropped(tmp_path):
    out = tmp_path / "out"
    model = pruned_tiny()
    model.save_pretrained(out)
    (out / "eval_results.json").write_text(json.dumps(eval_results()))
    write_model_card(out)  # what `hf-dpruner eval` does after measuring
    assert "| pruned | 61.50 | 33.25 |" in (out / "README.md").read_text()
    model.save_pretrained(out)  # new weights: the old results no longer describe them
    assert not (out / "eval_results.json").exists()
    assert "Not measured yet" in (out / "README.md").read_text()


def test_cli_prune_then_eval_puts_the_measured_perplexities_into_the_card(tiny_model_dir, tmp_path):  # noqa: F811
    (tmp_path / "domain.txt").write_text(text(5, 400))
    (tmp_path / "general.txt").write_text(text(6, 400))
    out = tmp_path / "out"
    data = ["--general-data", str(tmp_path / "general.txt"), "--domain-data", str(tmp_path / "domain.txt")]
    assert cli_main(["prune", "--method", "dpruner",
                     "--model", str(tiny_model_dir), *data, "--num-samples", "4", "--seq-len", "16",
                     "--output-dir", str(out), "--disable-tqdm", "true"]) == 0
    before = ModelCard.load(out / "README.md")
    assert before.data.eval_results is None and "Not measured yet" in before.text
    assert cli_main(["eval", str(out), "--baseline-model", str(tiny_model_dir), *data, "--seq-len", "16",
                     "--max-tokens", "128"]) == 0
    measured = json.loads((out / "eval_results.json").read_text())["models"]
    after = ModelCard.load(out / "README.md")
    values = {r.metric_name: r.metric_value for r in after.data.eval_results}
    assert values == {"general perplexity": round(measured["pruned"]["general"]["perplexity"], 4),
                      "domain perplexity": round(measured["pruned"]["domain"]["perplexity"], 4)}
    dense = measured["dense"]
    assert f"| dense | {dense['general']['perplexity']:.2f} | {dense['domain']['perplexity']:.2f} |" in after.text
    assert f"`{tmp_path / 'domain.txt'}`" in after.text  # the calibration data is named


# ---- upload ----

def saved_checkpoint(folder: Path) -> Path:
    pruned_tiny().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    return folder


def test_cli_push_uploads_the_whole_checkpoint_in_one_commit(tmp_path, fake_hub, capsys):
    folder = saved_checkpoint(tmp_path / "med-50")
    (folder / "eval_results.json").write_text(json.dumps(eval_results()))
    code = cli_main(["push", str(folder), "--repo-id", "me/med-50", "--private", "--revision", "v1"])
    assert code == 0
    assert fake_hub[0] == ("create_repo", "me/med-50", True, True)
    assert fake_hub[1] == ("create_branch", "me/med-50", "v1")
    (_, repo_id, files, message, revision, token, card) = fake_hub[2]
    assert len(fake_hub) == 3  # one commit
    assert (repo_id, revision, token) == ("me/med-50", "v1", "hf_test_token")
    assert files == ["README.md", "config.json", "eval_results.json", "generation_config.json", "model.safetensors",
                     "pruning_config.json", "pruning_masks.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert message == "Upload model pruned with dpruner (50.0% sparsity)"
    assert 'from_pretrained("me/med-50")' in card and "| pruned | 61.50 | 33.25 |" in card
    assert "pushed: https://hub/me/med-50/commit/1" in capsys.readouterr().out


def test_push_without_login_says_how_to_log_in(tmp_path, monkeypatch):
    folder = saved_checkpoint(tmp_path / "out")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(LocalTokenNotFoundError, match="hf auth login"):
        hub.push_folder_to_hub(folder, "me/out")


def test_push_of_a_folder_that_is_not_a_pruned_checkpoint_is_refused(tmp_path, fake_hub):
    build_tiny("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="pruning_config.json, pruning_masks.safetensors"):
        hub.push_folder_to_hub(tmp_path / "dense", "me/dense")
    assert fake_hub == []


@pytest.mark.parametrize("repo_id", ["me/med/50", "me/med 50", "me/--med"])
def test_an_invalid_repo_id_is_refused_before_any_upload(tmp_path, fake_hub, repo_id):
    folder = saved_checkpoint(tmp_path / "out")
    with pytest.raises(ValueError, match=f"Invalid Hub repo id '{repo_id}'"):
        hub.push_folder_to_hub(folder, repo_id)
    assert fake_hub == []


def test_model_push_to_hub_uploads_masks_card_and_tokenizer(fake_hub):
    model = pruned_tiny()
    model.push_to_hub("me/tiny-50", tokenizer=word_tokenizer(), commit_message="first")
    (_, repo_id, files, message, _, _, card) = fake_hub[-1]
    assert {"pruning_masks.safetensors", "pruning_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert message == "first"
    assert ModelCard(card).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # ours, not a generic card


# ---- download ----

def test_loading_a_repo_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    folder = saved_checkpoint(tmp_path / "snapshot")
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    model = AutoPrunedModelForCausalLM.from_pretrained("me/med-50", revision="v1")
    local = AutoPrunedModelForCausalLM.from_pretrained(folder)
    assert seen["repo_id"] == "me/med-50" and seen["revision"] == "v1"
    assert "*.bin" in seen["ignore_patterns"] and "*.pkl" in seen["ignore_patterns"]  # safetensors/JSON only
    assert model.config._name_or_path == "me/med-50"
    assert set(model.pruning_masks) == set(local.pruning_masks)
    assert all(torch.equal(model.pruning_masks[n], local.pruning_masks[n]) for n in local.pruning_masks)
    assert model.pruning_record["calibration"]["domain_data"] == "medical"


def test_a_snapshot_without_masks_is_a_clear_error(tmp_path, monkeypatch):
    build_tiny("llama").save_pretrained(tmp_path / "dense")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kwargs: str(tmp_path / "dense"))
    with pytest.raises(FileNotFoundError, match="has no pruning_masks.safetensors"):
        AutoPrunedModelForCausalLM.from_pretrained("me/dense")


# ---- optimum-cli and packaging ----

def test_optimum_cli_lists_and_forwards_our_commands(tmp_path):
    cli = shutil.which("optimum-cli")
    assert cli, "optimum-cli is installed with optimum"
    listed = subprocess.run([cli, "dpruner", "--help"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    for name in ("prune", "eval", "push", "data"):
        assert name in listed.stdout
    forwarded = subprocess.run([cli, "dpruner", "push", "--help"], capture_output=True, text=True, timeout=120)
    assert forwarded.returncode == 0
    assert "usage: hf-dpruner push" in forwarded.stdout and "--repo-id" in forwarded.stdout
    refused = subprocess.run([cli, "dpruner", "push", str(tmp_path), "--repo-id", "me/x"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "is not a pruned checkpoint" in refused.stderr


def test_every_package_folder_is_packaged():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_dpruner").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert "hf_dpruner.model_cards" in listed and (ROOT / "model_cards" / "pruned_model.md").is_file()


def test_card_of_a_lora_recovered_model_says_so():
    recovery = {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                "rank_pattern": {"model.layers.0.self_attn.q_proj": 4}}
    card = ModelCard(str(build_model_card({"method": "dpruner", "base_model": "org/base", "recovery": recovery})))
    assert card.data.base_model_relation == "finetune" and "lora-recovered" in card.data.tags
    assert "## Recovery" in card.text and "rank 8, alpha 16" in card.text
    assert "`{'model.layers.0.self_attn.q_proj': 4}`" in card.text
    plain = ModelCard(str(build_model_card({"method": "dpruner", "base_model": "org/base"})))
    assert plain.data.base_model_relation == "quantized" and "## Recovery" not in plain.text
