"""Multi-process pruning: `accelerate launch` with 2 processes (gloo on CPU) gives the masks of 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_dpruner.distributed import shard, world
from hf_dpruner.importance import load_importance
from hf_dpruner.masks import load_masks

SCRIPT = Path(__file__).parent / "scripts" / "distributed_prune.py"


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "domain_pass, estimator",
    [("finetune", "obs"), ("score", "fisher")],
)
def test_two_processes_give_the_masks_of_one(tmp_path, domain_pass, estimator):
    # one process accumulates 2 micro-batches per optimizer step; two processes take one each: the same
    # 2-window optimizer steps, in the same order
    _run([sys.executable, str(SCRIPT), "one", domain_pass, "2", estimator], tmp_path)
    # `--multi_gpu` starts torchrun workers; without a GPU they join a gloo group on the CPU
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          str(SCRIPT), "two", domain_pass, "1", estimator], tmp_path)
    one = load_masks(tmp_path / "one/pruning_masks.safetensors")
    two = load_masks(tmp_path / "two/pruning_masks.safetensors")
    assert sorted(one) == sorted(two) and len(one) == 14  # 7 linears x 2 blocks
    for name in one:
        assert torch.equal(one[name], two[name]), name  # bit for bit
        assert one[name].float().mean() == pytest.approx(0.5)
    # G and S: the sums over batches differ only by the order of the additions
    for file, rtol in (("general.safetensors", 1e-6), ("scores.safetensors", 1e-4)):
        scores_one, scores_two = load_importance(tmp_path / "one" / file), load_importance(tmp_path / "two" / file)
        assert sorted(scores_one) == sorted(one)
        for name, score in scores_one.items():
            torch.testing.assert_close(scores_two[name], score, rtol=rtol, atol=1e-12)
            assert score.abs().sum() > 0


def test_shard_outside_a_process_group_is_everything():
    assert world() == (0, 1)
    assert shard([1, 2, 3]) == [1, 2, 3]


def test_shard_gives_each_rank_every_nth_batch_and_refuses_too_few(monkeypatch):
    import hf_dpruner.distributed as distributed

    monkeypatch.setattr(distributed, "world", lambda: (1, 3))
    assert distributed.shard(list(range(7))) == [1, 4]
    with pytest.raises(ValueError, match="2 calibration batches cannot be shared by 3 processes"):
        distributed.shard([0, 1])


def test_an_uneven_domain_split_is_refused_before_the_general_stage(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from testing_utils import make_trainer

    trainer = make_trainer(tmp_path)  # 8 domain windows in batches of 2
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 3))
    with pytest.raises(ValueError, match="8 domain windows do not split evenly into batches of 2 on 3 processes"):
        trainer.prune()
    assert trainer.general_importance is None  # nothing was computed first
