"""Domain importance S gets one term per optimizer step in both domain passes, from the step's whole, unscaled
gradient: gradient accumulation and fp16 loss scaling do not change S."""

from __future__ import annotations

import pytest
import torch

from hf_dpruner import DPrunerConfig

from testing_utils import make_trainer, training_args, windows


def _scores(tmp_path, domain_pass: str, batch: int, accumulation: int, loss_kwargs: bool = True, n: int = 4):
    config = DPrunerConfig(sparsity=0.5, regularization_lambda=10.0, domain_pass=domain_pass)
    args = training_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_grad_norm=0.0)
    trainer = make_trainer(tmp_path, config=config, args=args, train_dataset=windows(n, low=0, high=64, seed=1))
    trainer.model_accepts_loss_kwargs = loss_kwargs
    return trainer.compute_domain_importance(), trainer.domain_importance.num_updates


@pytest.mark.parametrize("domain_pass", ["finetune", "score"])
@pytest.mark.parametrize("loss_kwargs", [True, False], ids=["loss-normalized-by-items", "loss-divided-by-ga"])
def test_gradient_accumulation_gives_the_scores_of_one_batch(tmp_path, domain_pass, loss_kwargs):
    """4 windows: one optimizer step of batch 4, or of 4 accumulated micro-batches of 1, give the same S."""
    batched, steps = _scores(tmp_path, domain_pass, batch=4, accumulation=1, loss_kwargs=loss_kwargs)
    accumulated, accumulated_steps = _scores(tmp_path, domain_pass, batch=1, accumulation=4, loss_kwargs=loss_kwargs)
    assert steps == accumulated_steps == 1
    for name, score in batched.items():
        assert score.abs().sum() > 0
        # fp32 sums in another order: relative 1e-5, absolute 1e-6 of the matrix's largest score
        torch.testing.assert_close(accumulated[name], score, rtol=1e-5, atol=1e-6 * float(score.max()))
    # the test can tell: four steps of one window each give another S
    per_window, four = _scores(tmp_path, domain_pass, batch=1, accumulation=1, loss_kwargs=loss_kwargs)
    assert four == 4
    name = "model.layers.1.mlp.gate_proj.weight"
    assert not torch.allclose(per_window[name], batched[name], rtol=1e-3)


def test_score_pass_counts_a_short_last_step_like_the_trainer(tmp_path):
    """6 windows in steps of 4 micro-batches: a full step and a step of 2, as the finetune pass takes them."""
    _, steps = _scores(tmp_path, "score", batch=1, accumulation=4, n=6)
    _, finetune_steps = _scores(tmp_path, "finetune", batch=1, accumulation=4, n=6)
    assert steps == finetune_steps == 2


def test_finetune_pass_scores_unscaled_fp16_gradients_without_clipping(tmp_path, monkeypatch):
    """With ``max_grad_norm=0`` the Trainer never unscales fp16 gradients before the optimizer step; S must still
    be built from unscaled ones, and training must follow the same path as without loss scaling."""
    config = DPrunerConfig(sparsity=0.5, regularization_lambda=10.0, apply_masks_to="tuned")

    def run(scale: float | None):
        trainer = make_trainer(tmp_path, config=config, args=training_args(tmp_path, max_grad_norm=0.0))
        if scale is not None:  # accelerate creates no GradScaler on a CPU; give it a real one
            monkeypatch.setattr(trainer.accelerator, "scaler", torch.amp.GradScaler("cpu", init_scale=scale))
        scores = trainer.compute_domain_importance()
        return scores, {n: w.weight.detach().clone() for n, w in trainer.prunable.items()}, trainer

    plain, plain_weights, _ = run(None)
    scaled, scaled_weights, trainer = run(1024.0)
    assert trainer.accelerator.scaler.get_scale() == 1024.0  # no overflow: every step was taken
    assert trainer.domain_importance.num_updates == 4
    for name, score in plain.items():
        torch.testing.assert_close(scaled[name], score, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(scaled_weights[name], plain_weights[name], rtol=1e-5, atol=1e-8)
