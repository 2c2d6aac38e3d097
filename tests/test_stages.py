"""D-Pruner's stages over one shared `PruningState`: they run without a trainer, in order, and the trainer only
drives them."""

from __future__ import annotations

import pytest
import torch

from hf_dpruner import DPrunerConfig
from hf_dpruner.masks import compute_masks
from hf_dpruner.stages import (
    DomainImportanceStage,
    GeneralImportanceStage,
    PruningState,
    SelectMasksStage,
    run_stages,
)
from hf_dpruner.targets import find_prunable_weights

from testing_utils import make_batches, make_trainer, tiny_llama


def _plain_domain_pass(batches, seen):
    """A score pass written as a plain PyTorch loop: one S term per batch, from the LM gradient refined by the
    regularizer's look-ahead gradient."""

    def run_pass(state: PruningState) -> None:
        seen["regularizer"] = state.regularizer
        for batch in batches:
            state.model.zero_grad(set_to_none=True)
            state.model(**batch, labels=batch["input_ids"]).loss.backward()
            for name, w in state.prunable.items():
                state.domain_importance.add(name, state.regularizer.lookahead_gradient(name, w.weight.grad, 0.05))
            state.domain_importance.num_updates += 1
        state.model.zero_grad(set_to_none=True)

    return run_pass


def test_the_stages_run_without_a_trainer():
    model = tiny_llama()
    config = DPrunerConfig(sparsity=0.5, domain_pass="score")
    state = PruningState(model, find_prunable_weights(model), config)
    seen = {}
    stages = [
        GeneralImportanceStage(batches=lambda: make_batches(2, seed=2)),
        DomainImportanceStage(run_pass=_plain_domain_pass(make_batches(2, seed=1), seen), learning_rate=0.05),
        SelectMasksStage(record={"method": "dpruner", "calibration": {"domain_samples": 4}}),
    ]
    run_stages(stages, state)

    assert set(state.seconds) == {"general_importance", "domain_importance", "masks"}
    assert set(state.general_importance) == set(state.prunable)
    assert seen["regularizer"] is not None and seen["regularizer"].lam == config.regularization_lambda
    assert state.domain_importance.num_updates == 2 and state.regularizer is None  # dropped after the masks
    expected = compute_masks(state.domain_importance.scores, state.prunable, config)
    for name, mask in state.masks.items():
        assert torch.equal(mask, expected[name]) and mask.float().mean().item() == pytest.approx(0.5)
        assert torch.all(state.prunable[name].weight[~mask] == 0)
    assert model.pruning_record["calibration"] == {"domain_samples": 4, "domain_steps": 2, "increased_damping": {}}
    assert stages[2].record["calibration"] == {"domain_samples": 4}  # the stage's own record is not modified


def test_a_stage_of_ones_own_joins_the_sequence():
    """Stages are plain objects with a ``name`` and ``run(state)``: one inserted between S and the masks sees S and
    changes what the masks keep."""
    model = tiny_llama()
    config = DPrunerConfig(sparsity=0.5, domain_pass="score", sparsity_type="row")
    state = PruningState(model, find_prunable_weights(model), config)
    protected = "model.layers.0.mlp.down_proj.weight"

    class KeepFirstColumns:
        name = "protect"

        def run(self, state: PruningState) -> None:
            scores = state.domain_importance.scores[protected]
            scores[:, : scores.shape[1] // 2] += scores.max() + 1

    run_stages([
        GeneralImportanceStage(batches=lambda: make_batches(2, seed=2)),
        DomainImportanceStage(run_pass=_plain_domain_pass(make_batches(2, seed=1), {}), learning_rate=0.05),
        KeepFirstColumns(),
        SelectMasksStage(record={"method": "dpruner"}),
    ], state)
    mask = state.masks[protected]
    assert mask[:, : mask.shape[1] // 2].all() and not mask[:, mask.shape[1] // 2:].any()
    assert list(state.seconds) == ["general_importance", "domain_importance", "protect", "masks"]


def test_the_domain_stage_needs_general_importance():
    model = tiny_llama()
    state = PruningState(model, find_prunable_weights(model), DPrunerConfig())
    with pytest.raises(ValueError, match="needs G: run the general importance stage first"):
        DomainImportanceStage(run_pass=lambda state: None, learning_rate=0.05).run(state)


def test_the_trainer_reads_and_writes_the_shared_state(tmp_path):
    trainer = make_trainer(tmp_path)
    state = trainer.pruning_state
    assert state.model is trainer.model and state.prunable is trainer.prunable
    general = trainer.compute_general_importance()
    assert general is state.general_importance and trainer.increased_damping is state.increased_damping == {}
    result = trainer.prune()
    assert trainer.domain_importance is state.domain_importance and trainer.regularizer is None
    assert result.masks is state.masks and result.domain_steps == state.domain_importance.num_updates == 4
    assert set(result.stage_seconds) == {"general_importance", "domain_importance", "masks"}


@pytest.mark.parametrize("domain_pass, resume, message", [
    ("finetune", True, "No complete domain-pass checkpoint"),
    ("score", "some/checkpoint-2", "writes no checkpoints"),
])
def test_prune_refuses_a_bad_resume_before_any_work(tmp_path, domain_pass, resume, message):
    trainer = make_trainer(tmp_path, DPrunerConfig(sparsity=0.5, domain_pass=domain_pass))
    with pytest.raises(ValueError, match=message):
        trainer.prune(resume_from_checkpoint=resume)
    assert trainer.general_importance is None  # stage 1 did not run
