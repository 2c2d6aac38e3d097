"""Raised Hessian damping is never silent: a warning names the weight and the damping used, and the run's record
(``pruning_config.json``, ``calibration.increased_damping``) and model card list the weights, for every path that
factorises a Hessian (OBS general importance, SparseGPT)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hf_dpruner import DPrunerConfig
from hf_dpruner.importance import inverse_hessian_cholesky, sparsegpt_prune
from hf_dpruner.importance.general import obs_saliency

from testing_utils import build_tiny, make_trainer, training_args, windows

NAME = "model.layers.0.mlp.down_proj.weight"
# eigenvalues -0.5 and 2.5, mean diagonal 1: damping 0.01 and 0.1 of the mean diagonal fail, 1.0 succeeds
INDEFINITE = torch.tensor([[1.0, 1.5], [1.5, 1.0]])


def test_indefinite_hessian_warns_with_the_weight_and_the_damping_used(caplog):
    increased: dict[str, float] = {}
    with caplog.at_level(logging.WARNING):
        upper, dead = inverse_hessian_cholesky(INDEFINITE, 0.01, NAME, increased)
    assert increased == {NAME: 1.0}
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert NAME in record.getMessage()
    assert "with damping 0.01; damping 1 (x100) was used" in record.getMessage()
    # the factor is the one of H + 1.0 · mean(diag H) · I, not of a more damped matrix
    expected = torch.linalg.cholesky(torch.linalg.inv(INDEFINITE.double() + torch.eye(2, dtype=torch.float64)),
                                     upper=True)
    torch.testing.assert_close(upper, expected)
    assert not dead.any()


def test_positive_definite_hessian_is_silent(caplog):
    increased: dict[str, float] = {}
    with caplog.at_level(logging.WARNING):
        inverse_hessian_cholesky(torch.tensor([[2.0, 0.5], [0.5, 1.0]]), 0.01, NAME, increased)
    assert increased == {}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_hessian_that_no_damping_fixes_names_the_weight():
    with pytest.raises(ValueError, match=f"Hessian of {NAME} is not positive definite even with damping 100 "):
        inverse_hessian_cholesky(-torch.eye(3), 0.01, NAME)


def test_obs_and_sparsegpt_record_the_raised_damping_per_weight(caplog):
    increased: dict[str, float] = {}
    with caplog.at_level(logging.WARNING):
        obs_saliency(torch.ones(3, 2), INDEFINITE, 0.01, "a.weight", increased)
        sparsegpt_prune(torch.ones(3, 2), INDEFINITE, 0.5, damping=0.1, name="b.weight", increased_damping=increased)
    assert increased == {"a.weight": 1.0, "b.weight": 1.0}
    assert "a.weight" in caplog.text and "b.weight" in caplog.text


def _limits(card: str) -> str:
    return card.split("## Limits", 1)[1].split("## Reference", 1)[0]


def test_pruning_run_records_raised_damping_in_config_and_card(tmp_path, caplog):
    """Two general windows (32 tokens) give rank-deficient Hessians (64 and 128 inputs); with a damping of 1e-7 of
    the mean diagonal their fp32 rounding makes them indefinite, so every target needs more."""
    cache = tmp_path / "general.safetensors"
    config = DPrunerConfig(sparsity=0.5, damping=1e-7)
    trainer = make_trainer(tmp_path, config=config, general_dataset=windows(2, seed=2), general_importance=cache)
    with caplog.at_level(logging.WARNING):
        trainer.prune()
    increased = trainer.increased_damping
    assert set(increased) == set(trainer.prunable)  # all 14 targets
    assert set(increased.values()) <= {1e-7 * 10**k for k in range(1, 5)}
    for name, used in increased.items():
        assert f"Hessian of {name} is not positive definite with damping 1e-07; damping {used:g} " in caplog.text

    trainer.save_model(str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert saved["calibration"]["increased_damping"] == increased
    limits = _limits((tmp_path / "out" / "README.md").read_text())
    assert "The calibration Hessian of 14 matrices was not positive definite with the damping 1e-07" in limits
    first = min(increased)
    assert f"`{first}` ({json.dumps(increased[first])})" in limits
    assert "and 6 more" in limits  # 8 listed

    # a run that reuses the cached G reports the same weights
    again = make_trainer(tmp_path, config=config, general_dataset=windows(2, seed=2), general_importance=cache)
    assert again.increased_damping == increased


def test_healthy_run_records_an_empty_entry_and_no_card_line(tmp_path, caplog):
    trainer = make_trainer(tmp_path, args=training_args(tmp_path, max_steps=1))
    with caplog.at_level(logging.WARNING):
        trainer.prune()
    assert "not positive definite" not in caplog.text
    trainer.save_model(str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert saved["calibration"]["increased_damping"] == {}
    assert "not positive definite" not in (tmp_path / "out" / "README.md").read_text()


def test_fisher_general_importance_factorises_nothing_and_records_nothing(tmp_path):
    trainer = make_trainer(tmp_path, config=DPrunerConfig(general_estimator="fisher"),
                           args=training_args(tmp_path, max_steps=1))
    trainer.prune()
    assert "increased_damping" not in trainer.model.pruning_record["calibration"]


def test_sparsegpt_run_records_raised_damping(tmp_path):
    from hf_dpruner.methods import prune_model

    from testing_utils import small_word_tokenizer as _word_tokenizer

    texts = [" ".join(f"w{(i * 7 + j) % 100}" for j in range(40)) for i in range(4)]
    config = DPrunerConfig(sparsity=0.5, damping=1e-7, seq_len=16, num_samples=2)
    args = training_args(tmp_path, per_device_train_batch_size=2)
    model, _ = prune_model(build_tiny("llama"), _word_tokenizer(True), "sparsegpt", config, args,
                           general_texts=None, domain_texts=texts)
    increased = model.pruning_record["calibration"]["increased_damping"]
    assert len(increased) == 14 and set(increased.values()) <= {1e-7 * 10**k for k in range(1, 5)}
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert saved["calibration"]["increased_damping"] == increased
    assert "The calibration Hessian of 14 matrices" in _limits((tmp_path / "out" / "README.md").read_text())
