"""DPrunerTrainer: the three stages, the regularized loss under gradient accumulation, masks through training."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from hf_dpruner import DPrunerConfig
from hf_dpruner.importance import load_importance

from testing_utils import (
    make_trainer,
    small_word_tokenizer,
    tiny_llama,
    training_args,
)


def test_prune_gives_exact_sparsity_on_original_weights(tmp_path):
    model = tiny_llama()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model=model)
    result = trainer.prune()
    assert result.domain_steps == 4  # 8 windows / batch 2, one epoch
    assert len(result.masks) == 2 * 7
    for name, keep in result.masks.items():
        weight = dict(model.named_parameters())[name].detach()
        assert (weight[~keep] == 0).all()
        assert torch.equal(weight[keep], original[name][keep])  # apply_masks_to="original"
        assert int((~keep).sum()) == round(0.5 * keep.numel())
    assert result.sparsity["overall"] == pytest.approx(0.5, abs=1e-3)
    # non-target parameters are untouched
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_apply_masks_to_tuned_keeps_domain_pass_weights(tmp_path):
    model = tiny_llama()
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer = make_trainer(tmp_path, model=model, config=DPrunerConfig(sparsity=0.5, apply_masks_to="tuned"))
    result = trainer.prune()
    after = model.model.layers[0].mlp.down_proj.weight.detach()
    keep = result.masks["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(after[keep], before[keep])
    assert (after[~keep] == 0).all()


def _domain_scores(tmp_path, lam, domain_pass="finetune", general=None, **arg_overrides):
    config = DPrunerConfig(sparsity=0.5, regularization_lambda=lam, domain_pass=domain_pass)
    trainer = make_trainer(
        tmp_path, config=config, args=training_args(tmp_path, **arg_overrides), general_importance=general
    )
    return trainer, trainer.compute_domain_importance()


def test_general_importance_changes_domain_scores_in_finetune_pass(tmp_path):
    _, plain = _domain_scores(tmp_path, lam=0.0)
    _, regularized = _domain_scores(tmp_path, lam=1e4)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.allclose(plain[name], regularized[name], rtol=1e-3)


def test_general_importance_changes_domain_scores_in_score_pass(tmp_path):
    trainer, plain = _domain_scores(tmp_path, lam=0.0, domain_pass="score")
    general = trainer.general_importance
    _, regularized = _domain_scores(tmp_path, lam=10.0, domain_pass="score", general=general)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(plain[name], regularized[name], rtol=1e-3)
    # score-only: weights never move
    assert trainer.domain_importance.num_updates == 4


@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["loss-normalized-by-items", "loss-divided-by-ga"])
def test_regularizer_is_correct_under_gradient_accumulation(tmp_path, loss_kwargs):
    """GA=4 x batch 1 must train exactly like GA=1 x batch 4, the regularizer included (it must matter), both
    when the model normalizes the loss over the accumulated batch and when the Trainer divides it by GA."""
    runs = {}
    for label, lam, batch, accumulation in [
        ("ga", 1e3, 1, 4),
        ("batch", 1e3, 4, 1),
        ("no_reg", 0.0, 4, 1),
    ]:
        config = DPrunerConfig(sparsity=0.5, regularization_lambda=lam, apply_masks_to="tuned")
        args = training_args(
            tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, num_train_epochs=3
        )
        trainer = make_trainer(tmp_path, config=config, args=args)
        trainer.model_accepts_loss_kwargs = loss_kwargs
        scores = trainer.compute_domain_importance()
        runs[label] = (scores, {n: w.weight.detach().clone() for n, w in trainer.prunable.items()})
        assert trainer.domain_importance.num_updates == 6  # 8 windows / 4 per step * 3 epochs
    name = "model.layers.1.mlp.gate_proj.weight"
    for part in (0, 1):
        torch.testing.assert_close(runs["ga"][part][name], runs["batch"][part][name], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(runs["batch"][1][name], runs["no_reg"][1][name], rtol=1e-4, atol=1e-6)


def test_general_importance_is_cached_and_reused(tmp_path):
    cache = tmp_path / "general.safetensors"
    first = make_trainer(tmp_path, general_importance=cache)
    scores = first.compute_general_importance()
    assert cache.is_file()
    loaded = load_importance(cache, first.prunable)
    assert all(torch.equal(loaded[n], scores[n]) for n in scores)
    second = make_trainer(tmp_path, general_importance=cache, general_dataset=None)
    result = second.prune()
    assert result.sparsity["overall"] == pytest.approx(0.5, abs=1e-3)


def test_fisher_estimator_and_bf16_run(tmp_path):
    config = DPrunerConfig(sparsity=0.3, general_estimator="fisher")
    trainer = make_trainer(tmp_path, config=config, args=training_args(tmp_path, bf16=True, use_cpu=True))
    result = trainer.prune()
    assert result.sparsity["overall"] == pytest.approx(0.3, abs=1e-3)


def test_training_after_prune_keeps_pruned_weights_zero(tmp_path):
    trainer = make_trainer(tmp_path)
    result = trainer.prune()
    trainer.args.optim = "adamw_torch"
    trainer.args.weight_decay = 0.1
    trainer.args.learning_rate = 1e-2
    trainer.train()
    params = dict(trainer.model.named_parameters())
    moved = 0
    for name, keep in result.masks.items():
        assert (params[name].detach()[~keep] == 0).all()
        moved += int((params[name].detach()[keep] != 0).sum())
    assert moved > 0


def test_n_m_and_row_sparsity(tmp_path):
    result = make_trainer(tmp_path, config=DPrunerConfig(sparsity_type="2:4")).prune()
    keep = result.masks["model.layers.0.self_attn.q_proj.weight"]
    assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
    result = make_trainer(tmp_path, config=DPrunerConfig(sparsity=0.25, sparsity_type="row")).prune()
    keep = result.masks["model.layers.1.mlp.down_proj.weight"]
    assert (keep.sum(1) == keep.shape[1] - round(0.25 * keep.shape[1])).all()


def test_layer_sparsity_overrides(tmp_path):
    config = DPrunerConfig(sparsity=0.5, layer_sparsity={r"layers\.1\.mlp": 0.2})
    result = make_trainer(tmp_path, config=config).prune()
    assert result.sparsity["per_matrix"]["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.2, abs=1e-3)
    assert result.sparsity["per_matrix"]["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.5, abs=1e-3)


# ---- bad input ----


def test_empty_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tmp_path, train_dataset=Dataset.from_dict({"input_ids": []}))


def test_unknown_target_modules_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown target_modules \['qproj'\].*q_proj"):
        make_trainer(tmp_path, config=DPrunerConfig(target_modules=["qproj"]))





def test_text_shorter_than_seq_len_is_rejected(tmp_path):
    texts = Dataset.from_dict({"text": ["w1 w2 w3", "w4 w5"]})
    with pytest.raises(ValueError, match=r"7 tokens, fewer than seq_len=16"):
        make_trainer(
            tmp_path, config=DPrunerConfig(seq_len=16), train_dataset=texts, processing_class=small_word_tokenizer(True)
        )


def test_text_dataset_is_cut_into_windows(tmp_path):
    texts = Dataset.from_dict({"text": [" ".join(f"w{(i * 7 + j) % 100}" for j in range(40)) for i in range(6)]})
    trainer = make_trainer(
        tmp_path,
        config=DPrunerConfig(seq_len=16, num_samples=5),
        train_dataset=texts,
        processing_class=small_word_tokenizer(True),
    )
    assert len(trainer.train_dataset) == 5
    assert {len(ids) for ids in trainer.train_dataset["input_ids"]} == {16}


def test_ragged_rows_without_pad_token_are_rejected(tmp_path):
    ragged = Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6]]})
    with pytest.raises(ValueError, match="no pad token"):
        make_trainer(tmp_path, train_dataset=ragged, processing_class=small_word_tokenizer(False))


def test_missing_general_data_is_explained(tmp_path):
    trainer = make_trainer(tmp_path, general_dataset=None)
    with pytest.raises(ValueError, match="general_dataset="):
        trainer.prune()


def test_user_training_arguments_apply_to_the_domain_pass(tmp_path):
    args = training_args(tmp_path, save_strategy="steps", save_steps=2, logging_strategy="steps", logging_steps=1)
    trainer = make_trainer(tmp_path, args=args)
    trainer.prune()
    checkpoints = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)


def test_clamped_general_importance_keeps_the_domain_pass_stable(tmp_path):
    """Unclamped, 2*lr*lambda*G >> 2 makes SGD on the penalty oscillate and blow up; clamped it cannot."""
    def final_penalty(clamp: bool) -> float:
        config = DPrunerConfig(regularization_lambda=1.0, clamp_general_importance=clamp, apply_masks_to="tuned")
        args = training_args(tmp_path, num_train_epochs=4, max_grad_norm=0.0, learning_rate=0.05)
        trainer = make_trainer(tmp_path, config=config, args=args)
        general = trainer.compute_general_importance()
        trainer.general_importance = {name: torch.full_like(g, 200.0) for name, g in general.items()}
        trainer.compute_domain_importance()
        if clamp:
            assert trainer.regularizer.max_importance == pytest.approx(10.0)
            assert max(g.max().item() for g in trainer.regularizer.importance.values()) == 200.0  # clamped lazily
        return trainer.regularizer().item()

    assert final_penalty(clamp=True) < 1.0
    unstable = final_penalty(clamp=False)
    assert not math.isfinite(unstable) or unstable > 1e3
