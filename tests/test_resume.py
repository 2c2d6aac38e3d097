"""Resumable runs: fingerprinted general-importance caches, domain-pass checkpoints, kill-and-resume of the CLI."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from hf_dpruner import DPrunerConfig
from hf_dpruner.importance import importance_fingerprint, load_importance
from hf_dpruner.resume import DOMAIN_STATE_NAME, last_complete_checkpoint

from testing_utils import make_trainer, tiny_llama, training_args, windows


def _cached_trainer(tmp_path, path, **kwargs):
    trainer = make_trainer(tmp_path, general_importance=path, **kwargs)
    trainer.compute_general_importance()
    return trainer


def test_general_cache_is_reused_by_the_same_run_and_refused_by_another(tmp_path):
    path = tmp_path / "general.safetensors"
    first = _cached_trainer(tmp_path, path)
    assert set(importance_fingerprint(path)) == {"model", "general_data", "recipe"}
    again = make_trainer(tmp_path, general_importance=path)
    assert again.general_importance is not None  # loaded at construction, not recomputed
    assert all(torch.equal(again.general_importance[n], g) for n, g in first.general_importance.items())
    stale_runs = {
        "model": dict(model=tiny_llama(seed=1)),
        "general_data": dict(general_dataset=windows(8, low=64, high=128, seed=7)),
        "recipe": dict(config=DPrunerConfig(damping=0.05)),
    }
    for part, kwargs in stale_runs.items():
        with pytest.raises(ValueError, match=f"computed for another {part} than this run's, so it is stale"):
            make_trainer(tmp_path, general_importance=path, **kwargs)
    # the domain data and the sparsity are not what G depends on: the cache serves every domain
    make_trainer(tmp_path, general_importance=path, train_dataset=windows(8, seed=9),
                 config=DPrunerConfig(sparsity=0.7))


def test_a_cache_without_fingerprint_is_used_with_a_warning(tmp_path, caplog):
    path = tmp_path / "general.safetensors"
    first = _cached_trainer(tmp_path, path)
    save_file(load_importance(path), str(path))  # no metadata: as another tool would write it
    with caplog.at_level(logging.WARNING):
        again = make_trainer(tmp_path, general_importance=path)
    assert "has no fingerprint" in caplog.text
    assert all(torch.equal(again.general_importance[n], g) for n, g in first.general_importance.items())


def test_a_bfloat16_cache_is_refused_by_a_float32_run(tmp_path):
    path = tmp_path / "general.safetensors"
    _cached_trainer(tmp_path, path, config=DPrunerConfig(importance_dtype="bfloat16"))
    with pytest.raises(ValueError, match="holds torch.bfloat16 scores but this run keeps importance in torch.float32"):
        make_trainer(tmp_path, general_importance=path)
    make_trainer(tmp_path, general_importance=path, config=DPrunerConfig(importance_dtype="bfloat16"))


class _Interrupt(TrainerCallback):
    """Stops the process-like run after `step` optimizer steps, as a kill would (after that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _checkpointing_args(tmp_path, **overrides):
    return training_args(tmp_path, save_strategy="steps", save_steps=1, **overrides)


def test_resumed_domain_pass_equals_an_uninterrupted_one(tmp_path):
    full = make_trainer(tmp_path / "full", args=_checkpointing_args(tmp_path / "full"))
    expected = full.prune()
    run = tmp_path / "killed"
    killed = make_trainer(run, args=_checkpointing_args(run), callbacks=[_Interrupt(2)])
    with pytest.raises(KeyboardInterrupt):
        killed.prune()
    assert last_complete_checkpoint(run / "run").endswith("checkpoint-2")
    resumed = make_trainer(run, args=_checkpointing_args(run))
    result = resumed.prune(resume_from_checkpoint=True)
    assert result.domain_steps == 4
    for name, score in full.domain_importance.scores.items():
        assert torch.equal(resumed.domain_importance.scores[name], score), name
        assert torch.equal(result.masks[name], expected.masks[name]), name
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=False):
        assert torch.equal(a, b), name  # original weights restored and masked identically


def test_resume_refuses_a_checkpoint_of_other_settings_and_skips_incomplete_ones(tmp_path):
    run = tmp_path / "killed"
    killed = make_trainer(run, args=_checkpointing_args(run), callbacks=[_Interrupt(3)])
    with pytest.raises(KeyboardInterrupt):
        killed.prune()
    other = make_trainer(run, args=_checkpointing_args(run, learning_rate=0.01))
    with pytest.raises(ValueError, match="written by a run with another training"):
        other.prune(resume_from_checkpoint=True)
    other_data = make_trainer(run, args=_checkpointing_args(run), train_dataset=windows(8, low=0, high=64, seed=5))
    with pytest.raises(ValueError, match="another domain_data"):
        other_data.prune(resume_from_checkpoint=True)
    # a checkpoint whose domain state was never written (killed while saving) is not "complete"
    (run / "run" / "checkpoint-3" / DOMAIN_STATE_NAME).unlink()
    assert last_complete_checkpoint(run / "run").endswith("checkpoint-2")
    with pytest.raises(FileNotFoundError, match="not a complete D-Pruner domain-pass checkpoint"):
        make_trainer(run, args=_checkpointing_args(run)).prune(resume_from_checkpoint=str(run / "run" / "checkpoint-3"))
    assert make_trainer(run, args=_checkpointing_args(run)).prune(resume_from_checkpoint=True).domain_steps == 4


def test_resume_needs_a_checkpoint_and_the_finetune_pass(tmp_path):
    with pytest.raises(ValueError, match="No complete domain-pass checkpoint"):
        make_trainer(tmp_path).prune(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="'score' domain pass writes no checkpoints"):
        make_trainer(tmp_path, config=DPrunerConfig(domain_pass="score")).prune(resume_from_checkpoint="x")


# ---- kill-and-resume of the `hf-dpruner prune` command ----

def _cli_inputs(tmp_path):
    """A tiny model folder with a word tokenizer, and general / domain text files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from testing_utils import text, word_tokenizer

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    (tmp_path / "general.txt").write_text(" ".join(text(i) for i in range(20)))
    (tmp_path / "domain.txt").write_text(" ".join(text(100 + i) for i in range(20)))
    return model_dir


def _prune_command(tmp_path, model_dir, out):
    import sys

    return [sys.executable, "-m", "hf_dpruner.commands.cli", "prune", "--method", "dpruner", "--model", str(model_dir),
            "--general-data", str(tmp_path / "general.txt"), "--domain-data", str(tmp_path / "domain.txt"),
            "--num-samples", "40", "--seq-len", "16", "--gradient-accumulation-steps", "1", "--save-steps", "1",
            "--output-dir", str(out), "--disable-tqdm", "true", "--report-to", "none"]


def _run_until(command, ready, timeout: float = 120.0) -> bool:
    """Start `command`; SIGKILL it as soon as `ready()` holds. True if it was killed, False if it ended first."""
    import os
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.kill()
            process.wait()
            return True
        time.sleep(0.005)
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return False


def _finish(command) -> str:
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _checkpoint_steps(run_dir) -> list[int]:
    return [int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*")]


@pytest.mark.slow
def test_killed_prune_command_resumes_to_the_same_masks(tmp_path):
    from hf_dpruner.masks import load_masks

    model_dir = _cli_inputs(tmp_path)
    reference = tmp_path / "reference"
    _finish(_prune_command(tmp_path, model_dir, reference))
    expected = load_masks(reference / "pruning_masks.safetensors")
    assert not (tmp_path / "reference.dpruner-run").exists()  # the run folder goes once the checkpoint is saved
    kill_points = {
        "general importance written": lambda run: (run / "general_importance.safetensors").is_file(),
        "mid domain pass": lambda run: any(s >= 5 for s in _checkpoint_steps(run)),
        "while a checkpoint is written": lambda run: any(
            (p / "model.safetensors").exists() and not (p / DOMAIN_STATE_NAME).exists()
            for p in run.glob("checkpoint-*") if int(p.name.split("-")[1]) >= 10
        ),
        "after the domain pass": lambda run: 40 in _checkpoint_steps(run),
    }
    for i, (point, ready) in enumerate(kill_points.items()):
        out = tmp_path / f"out{i}"
        run = tmp_path / f"out{i}.dpruner-run"
        killed = _run_until(_prune_command(tmp_path, model_dir, out), lambda ready=ready, run=run: ready(run))
        assert killed, f"the command ended before the kill point {point!r}"
        assert not (out / "pruning_masks.safetensors").exists()
        log = _finish(_prune_command(tmp_path, model_dir, out))
        assert "resuming from" in log, point
        masks = load_masks(out / "pruning_masks.safetensors")
        assert all(torch.equal(masks[n], expected[n]) for n in expected), point
        assert not run.exists()
