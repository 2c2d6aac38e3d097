"""The registry of pruning methods: a method defined here, outside the package, runs through `prune_model`, the CLI
and the model card without touching the package."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainingArguments

from hf_dpruner import AutoPrunedModelForCausalLM, DPrunerConfig
from hf_dpruner.commands.cli import main as cli_main
from hf_dpruner.masks import compute_masks
from hf_dpruner.methods import (
    PruningMethod,
    get_method,
    method_names,
    prune_model,
    register_method,
)
from hf_dpruner.methods.base import unregister_method
from hf_dpruner.targets import find_prunable_weights

from testing_utils import build_tiny, text


class ToyColumns(PruningMethod):
    """Keeps the weights of the even input columns first (then by |W|), so its masks differ from any real
    method's; records the calibration batches it was given."""

    name = "toy-columns"
    title = "Toy Columns"
    description = "A toy method of the registry test."
    citation = "Nobody. *A toy*. 2026."
    data = "one"
    seen_batches: list = []

    def prune(self, model, batches, config, *, general_batches=None, disable_tqdm=False):
        ToyColumns.seen_batches = list(batches)
        weights = find_prunable_weights(model, config.target_modules)
        scores = {}
        for name, w in weights.items():
            bonus = torch.zeros_like(w.weight)
            bonus[..., ::2] = 1e3  # even input columns first
            scores[name] = w.weight.detach().abs() + bonus
        masks = compute_masks(scores, weights, config)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, keep in masks.items():
                params[name].masked_fill_(~keep, 0.0)
        return masks


@pytest.fixture
def toy_method():
    register_method(ToyColumns)
    yield ToyColumns
    unregister_method(ToyColumns.name)


def test_the_built_in_methods_are_registered_in_order():
    assert method_names()[:4] == ("dpruner", "magnitude", "wanda", "sparsegpt")
    assert get_method("sparsegpt").statistics == "hessian" and get_method("magnitude").data == "none"
    with pytest.raises(ValueError, match=r"Unknown pruning method 'obs'; valid: dpruner, magnitude"):
        get_method("obs")


def test_registration_errors_are_clear(toy_method):
    class Clash(PruningMethod):
        name = "toy-columns"
        title = "clash"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)

    class Nameless(PruningMethod):
        title = "x"

    with pytest.raises(ValueError, match="non-empty `name`"):
        register_method(Nameless)
    with pytest.raises(TypeError, match="PruningMethod subclass"):
        register_method(object)


def test_a_method_defined_outside_the_package_runs_through_prune_model(toy_method, tmp_path):
    from testing_utils import word_tokenizer

    model = build_tiny("llama")
    args = TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=2, report_to=[], disable_tqdm=True)
    config = DPrunerConfig(sparsity=0.5, num_samples=4, seq_len=16)
    pruned, result = prune_model(model, word_tokenizer(), "toy-columns", config, args,
                                 general_texts=None, domain_texts=[text(1, 400)])
    assert len(toy_method.seen_batches) == 2 and toy_method.seen_batches[0]["input_ids"].shape == (2, 16)
    up = dict(pruned.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert (up[:, 1::2] == 0).all() and (up[:, ::2] != 0).all()  # the toy's rule, not magnitude's
    assert result.sparsity["overall"] == pytest.approx(0.5)
    assert pruned.pruning_record["method"] == "toy-columns"
    assert pruned.pruning_record["calibration"] == {"data": "domain", "samples": 4, "seq_len": 16}


def test_a_registered_method_is_a_cli_choice_and_its_card_cites_it(toy_method, tiny_model_dir, tmp_path,  # noqa: F811
                                                                   capsys):
    (tmp_path / "d.txt").write_text(text(5, 600))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        cli_main(["prune", "--help"])
    assert "toy-columns (Toy Columns)" in capsys.readouterr().out
    assert cli_main(["prune", "--method", "toy-columns", "--model", str(tiny_model_dir), "--domain-data",
                     str(tmp_path / "d.txt"), "--num-samples", "4", "--seq-len", "16", "--output-dir", str(out),
                     "--disable-tqdm", "true"]) == 0
    record = json.loads((out / "pruning_config.json").read_text())
    assert record["method"] == "toy-columns"
    card = (out / "README.md").read_text()
    assert "Toy Columns" in card and "A toy method of the registry test." in card and "Nobody. *A toy*" in card
    loaded = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert loaded.pruning_sparsity()["overall"] == pytest.approx(0.5)


def test_an_unregistered_method_is_a_cli_error(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        cli_main(["prune", "--method", "toy-columns", "--model", str(tiny_model_dir), "--output-dir",
                  str(tmp_path / "o")])
    assert "invalid choice: 'toy-columns'" in capsys.readouterr().err
