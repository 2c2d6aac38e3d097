"""Bounded memory: bfloat16 importance buffers, stochastic accumulation, no held copies, gradient-free score pass."""

from __future__ import annotations

import pytest
import torch

from hf_dpruner import DPrunerConfig
from hf_dpruner.importance import DomainImportance
from hf_dpruner.importance.domain import stochastic_add_
from hf_dpruner.regularizer import GeneralImportanceRegularizer
from hf_dpruner.targets import find_prunable_weights

from testing_utils import build_tiny, make_trainer


def test_stochastic_rounding_keeps_a_long_bfloat16_sum_growing():
    terms = torch.ones(4096)
    nearest = torch.zeros(4096, dtype=torch.bfloat16)
    stochastic = torch.zeros(4096, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        nearest.add_(terms)
        stochastic_add_(stochastic, terms, generator)
    assert nearest.float().max() == 256.0  # round-to-nearest stalls: 1 is below half a step of 256
    assert stochastic.float().mean().item() == pytest.approx(2000.0, rel=0.01)  # unbiased
    # the price: per-element noise of about sqrt(sum / 180) (the bfloat16 step grows with the sum), ~5% here
    assert 0 < stochastic.float().std().item() < 150.0


def test_stochastic_add_is_exact_when_the_sum_is_representable():
    acc = torch.tensor([1.0, 2.0, -3.0], dtype=torch.bfloat16)
    stochastic_add_(acc, torch.tensor([0.5, 0.25, 1.0]), torch.Generator().manual_seed(0))
    assert acc.tolist() == [1.5, 2.25, -2.0]


def test_bfloat16_domain_scores_track_float32_scores():
    model = build_tiny("llama")
    weights = find_prunable_weights(model)
    exact, low = DomainImportance(weights), DomainImportance(weights, dtype=torch.bfloat16, seed=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):  # more steps than bfloat16's 8-bit mantissa can count by rounding to nearest
        grads = {name: torch.randn(w.weight.shape, generator=generator) * 1e-2 for name, w in weights.items()}
        exact.update(grads)
        low.update(grads)
    for name in weights:
        assert low.scores[name].dtype == torch.bfloat16
        relative = (low.scores[name].float() - exact.scores[name]) / exact.scores[name]
        assert abs(relative.mean()) < 0.005, name  # unbiased (round-to-nearest: -4% here, -36% at 2000 steps)
        assert relative.abs().mean() < 0.03 and relative.abs().max() < 0.3, name


def test_domain_importance_state_round_trips_and_checks_shapes():
    model = build_tiny("llama")
    weights = find_prunable_weights(model)
    scores = DomainImportance(weights)
    scores.update({name: torch.ones_like(w.weight) for name, w in weights.items()})
    restored = DomainImportance(weights)
    restored.load_state_dict(scores.state_dict())
    assert restored.num_updates == 1
    assert all(torch.equal(restored.scores[n], scores.scores[n]) for n in weights)
    bad = {**scores.state_dict()}
    name = next(iter(weights))
    bad[name] = bad[name][:1]
    with pytest.raises(ValueError, match=f"state of {name} is"):
        restored.load_state_dict(bad)
    with pytest.raises(ValueError, match="does not match the target weights"):
        restored.load_state_dict({k: v for k, v in scores.state_dict().items() if k != name})


def test_regularizer_shares_general_importance_and_clamps_lazily():
    model = build_tiny("llama")
    weights = find_prunable_weights(model)
    generator = torch.Generator().manual_seed(0)
    importance = {n: torch.rand(w.weight.shape, generator=generator) * 20 for n, w in weights.items()}
    lazy = GeneralImportanceRegularizer(weights, importance, lam=0.5, max_importance=10.0)
    eager = GeneralImportanceRegularizer(weights, {n: g.clamp(max=10.0) for n, g in importance.items()}, lam=0.5)
    assert all(lazy.importance[n] is importance[n] for n in weights)  # no copy of G
    with torch.no_grad():
        for w in weights.values():
            w.weight.add_(torch.randn(w.weight.shape, generator=generator) * 0.1)
    assert lazy().item() == pytest.approx(eager().item(), rel=1e-6)
    lazy().backward()
    grads = {n: w.weight.grad.clone() for n, w in weights.items()}
    model.zero_grad()
    eager().backward()
    for n, w in weights.items():
        torch.testing.assert_close(grads[n], w.weight.grad)


def test_regularizer_without_reference_holds_no_weights_and_has_no_penalty():
    model = build_tiny("llama")
    weights = find_prunable_weights(model)
    importance = {n: torch.ones_like(w.weight) for n, w in weights.items()}
    regularizer = GeneralImportanceRegularizer(weights, importance, lam=0.1, keep_reference=False)
    assert regularizer.reference == {}
    with pytest.raises(RuntimeError, match="keeps no W0"):
        regularizer()
    regularizer.restore()  # nothing moved, nothing to restore


def test_bfloat16_importance_run_holds_bfloat16_buffers_and_agrees_with_float32(tmp_path):
    results = {}
    for dtype in ("float32", "bfloat16"):
        trainer = make_trainer(tmp_path, config=DPrunerConfig(sparsity=0.5, importance_dtype=dtype))
        results[dtype] = trainer.prune().masks
        held = [*trainer.general_importance.values(), *trainer.domain_importance.scores.values()]
        assert {t.dtype for t in held} == {getattr(torch, dtype)}
    agree = sum(int((results["float32"][n] == results["bfloat16"][n]).sum()) for n in results["float32"])
    total = sum(m.numel() for m in results["float32"].values())
    assert agree / total > 0.97  # bfloat16 rounding flips only near-threshold weights


def test_general_importance_cache_keeps_the_bfloat16_dtype(tmp_path):
    from hf_dpruner.importance import load_importance

    path = tmp_path / "general.safetensors"
    trainer = make_trainer(tmp_path, config=DPrunerConfig(importance_dtype="bfloat16"), general_importance=path)
    trainer.compute_general_importance()
    cached = load_importance(path)
    assert {t.dtype for t in cached.values()} == {torch.bfloat16}
    assert all(torch.equal(cached[n], g) for n, g in trainer.general_importance.items())


def _score_pass_reference(tmp_path, config: DPrunerConfig) -> dict[str, torch.Tensor]:
    """S of the score pass computed the plain way: full gradients of every parameter, then the look-ahead."""
    trainer = make_trainer(tmp_path, config=config)
    general = trainer.compute_general_importance()
    model, lam, lr = trainer.model, config.regularization_lambda, trainer.args.learning_rate
    scores = {n: torch.zeros_like(w.weight) for n, w in trainer.prunable.items()}
    model.eval()
    for batch in trainer.get_train_dataloader():
        model.zero_grad()
        model(**batch).loss.backward()
        for n, w in trainer.prunable.items():
            gw = w.weight.grad * (1 - 2 * lam * lr * general[n]) * w.weight.detach()
            scores[n] += (gw - 0.5 * gw * gw).abs()
    return scores


def test_score_pass_never_holds_more_than_one_gradient(tmp_path, monkeypatch):
    config = DPrunerConfig(sparsity=0.5, domain_pass="score")
    trainer = make_trainer(tmp_path, config=config)
    model = trainer.model
    held_during_add = []
    original_add = DomainImportance.add

    def spy(self, name, grad):
        held_during_add.append(sum(p.grad is not None for p in model.parameters()))
        original_add(self, name, grad)

    monkeypatch.setattr(DomainImportance, "add", spy)
    scores = trainer.compute_domain_importance()
    assert len(held_during_add) == 4 * 14  # 4 batches x 14 target weights, one call each
    assert max(held_during_add) == 1  # only the weight being folded in
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the frozen ones are thawed again
    assert trainer.regularizer.reference == {}  # W0 is not copied: the weights never move
    reference = _score_pass_reference(tmp_path, config)
    for name, score in scores.items():
        torch.testing.assert_close(score, reference[name], rtol=1e-4, atol=1e-10)


def test_score_pass_names_target_weights_that_cannot_get_gradients(tmp_path):
    trainer = make_trainer(tmp_path, config=DPrunerConfig(domain_pass="score"))
    first = next(iter(trainer.prunable.values()))
    first.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=f"No gradient for 1 target weights \\(e.g. {first.name}\\)"):
        trainer.compute_domain_importance()


def test_offloaded_importance_gives_the_same_masks(tmp_path):
    """On a CPU-only machine the buffers already live on the CPU: the offload path must not change any result."""
    masks = [
        make_trainer(tmp_path, config=DPrunerConfig(offload_importance=flag)).prune().masks for flag in (False, True)
    ]
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("importance_dtype", "float16", ValueError, "float16' is not supported.*Use 'bfloat16'"),
        ("importance_dtype", "int8", ValueError, r"importance_dtype must be one of \('float32', 'bfloat16'\)"),
        ("offload_importance", "yes", TypeError, "offload_importance must be true or false"),
    ],
)
def test_importance_storage_options_are_validated(field, value, error, message):
    with pytest.raises(error, match=message):
        DPrunerConfig(**{field: value})


def test_score_pass_unscales_fp16_loss_scaled_gradients(tmp_path, monkeypatch):
    """Under fp16 `accelerator.backward` multiplies the loss by the scaler's scale; S must not see it."""
    config = DPrunerConfig(domain_pass="score")
    plain = make_trainer(tmp_path, config=config).compute_domain_importance()
    trainer = make_trainer(tmp_path, config=config)

    class Scaler:  # the part of torch.amp.GradScaler that accelerator.backward and the score pass use
        def scale(self, loss: torch.Tensor) -> torch.Tensor:
            return loss * 1024.0

        def get_scale(self) -> float:
            return 1024.0

    monkeypatch.setattr(trainer.accelerator, "scaler", Scaler())
    scaled = trainer.compute_domain_importance()
    for name, score in plain.items():
        torch.testing.assert_close(scaled[name], score, rtol=1e-5, atol=1e-12)


def test_penalty_gradient_added_in_hooks_trains_like_the_penalty_in_the_loss_graph(tmp_path):
    """The finetune pass adds 2λG(W − W0) inside each weight's gradient; putting the differentiable penalty in the
    loss (which holds every penalty gradient until the LM gradients arrive) must train to the same weights."""
    from hf_dpruner import DPrunerTrainer
    from hf_dpruner.step_penalty import add_step_penalty

    from testing_utils import tiny_llama, training_args, windows

    class PenaltyInGraph(DPrunerTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super(DPrunerTrainer, self).compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return add_step_penalty(self, loss, self.regularizer, num_items_in_batch)

    config = DPrunerConfig(regularization_lambda=50.0, apply_masks_to="tuned")
    weights = {}
    for cls in (DPrunerTrainer, PenaltyInGraph):
        args = training_args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=1,
                             num_train_epochs=3, max_grad_norm=0.0)
        trainer = cls(model=tiny_llama(), args=args, dpruner_config=config,
                      train_dataset=windows(8, low=0, high=64, seed=1), general_dataset=windows(8, seed=2))
        trainer.compute_domain_importance()
        weights[cls] = {n: w.weight.detach().clone() for n, w in trainer.prunable.items()}
        assert trainer.regularizer._hooks == []  # disarmed after every step
    moved = 0
    for name, w in weights[DPrunerTrainer].items():
        torch.testing.assert_close(w, weights[PenaltyInGraph][name], rtol=1e-5, atol=1e-7)
    no_penalty = DPrunerTrainer(model=tiny_llama(), args=training_args(tmp_path, gradient_accumulation_steps=2,
                                per_device_train_batch_size=1, num_train_epochs=3, max_grad_norm=0.0),
                                dpruner_config=DPrunerConfig(regularization_lambda=0.0, apply_masks_to="tuned"),
                                train_dataset=windows(8, low=0, high=64, seed=1), general_dataset=windows(8, seed=2))
    no_penalty.compute_domain_importance()
    for name, w in no_penalty.prunable.items():
        moved += not torch.allclose(w.weight, weights[DPrunerTrainer][name], rtol=1e-5, atol=1e-7)
    assert moved == len(weights[DPrunerTrainer])  # the penalty changed every weight's path
