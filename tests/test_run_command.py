"""``hf-dpruner run``: prune → recover → eval chained with the subcommands' own flags (or a recipe file), resumable
after a kill between stages, reusing the stages whose inputs did not change."""

from __future__ import annotations

import json

import pytest

import hf_dpruner.commands.prune as prune_command
import hf_dpruner.commands.recover as recover_command
from hf_dpruner.commands.cli import main as cli_main
from hf_dpruner.commands.run import split_stage_flags

from testing_utils import text


def _flags(tiny_model_dir, tmp_path) -> list[str]:
    (tmp_path / "domain.txt").write_text(text(5, 600))
    return ["--model", str(tiny_model_dir),
            "--prune.method", "magnitude", "--prune.domain-data", str(tmp_path / "domain.txt"),
            "--prune.num-samples", "4", "--prune.seq-len", "16", "--prune.disable-tqdm", "true",
            "--recover.data", str(tmp_path / "domain.txt"), "--recover.lora-r", "2", "--recover.num-samples", "4",
            "--recover.seq-len", "16", "--recover.max-steps", "2", "--recover.per-device-train-batch-size", "2",
            "--recover.disable-tqdm", "true",
            "--eval.baseline-model", str(tiny_model_dir), "--eval.domain-data", str(tmp_path / "domain.txt"),
            "--eval.general-data", str(tmp_path / "domain.txt"), "--eval.split", "train",
            "--eval.max-tokens", "64", "--eval.seq-len", "16"]


def _fail(*_args, **_kwargs):
    raise KeyboardInterrupt("killed")


def test_the_chain_runs_end_to_end_and_resumes_after_a_kill(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = ["--output-dir", str(out), *_flags(tiny_model_dir, tmp_path)]
    with monkeypatch.context() as patch:  # killed while recovering: prune is done and recorded
        patch.setattr(recover_command, "main", _fail)
        with pytest.raises(KeyboardInterrupt):
            cli_main(["run", *flags])
    state = json.loads((out / "run_state.json").read_text())["stages"]
    assert set(state) == {"prune"} and (out / "pruned" / "pruning_config.json").is_file()
    assert not (out / "recovered").exists()

    with monkeypatch.context() as patch:  # the rerun must not prune again
        patch.setattr(prune_command, "main", _fail)
        assert cli_main(["run", *flags]) == 0
    err = capsys.readouterr().err
    assert "[1/3] prune: reused" in err and "[2/3] recover: hf-dpruner recover" in err
    record = json.loads((out / "recovered" / "pruning_config.json").read_text())
    assert record["method"] == "magnitude" and record["recovery"]["max_steps"] == 2
    results = json.loads((out / "recovered" / "eval_results.json").read_text())
    assert set(results["models"]) == {"dense", "pruned"} and results["models"]["pruned"]["domain"]["perplexity"] > 1
    card = (out / "recovered" / "README.md").read_text()
    assert "## Recovery" in card and "magnitude" in card

    # unchanged: everything reused; a changed recover flag re-runs recover and eval, not prune
    with monkeypatch.context() as patch:
        patch.setattr(prune_command, "main", _fail)
        patch.setattr(recover_command, "main", _fail)
        assert cli_main(["run", *flags]) == 0
    assert capsys.readouterr().err.count("reused") == 3
    with monkeypatch.context() as patch:
        patch.setattr(prune_command, "main", _fail)
        assert cli_main(["run", *flags, "--recover.max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "prune: reused" in err and "recover: hf-dpruner" in err and "eval: hf-dpruner" in err
    assert json.loads((out / "recovered" / "pruning_config.json").read_text())["recovery"]["max_steps"] == 3


def test_a_recipe_file_gives_the_same_flags(tiny_model_dir, tmp_path, capsys):
    flags = _flags(tiny_model_dir, tmp_path)
    sections: dict = {"output_dir": str(tmp_path / "run"), "model": str(tiny_model_dir), "stages": "prune,eval"}
    for flag, value in zip(flags[2::2], flags[3::2], strict=True):
        stage, name = flag[2:].split(".")
        if stage in ("prune", "eval"):
            sections.setdefault(stage, {})[name.replace("-", "_")] = value
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(sections))
    assert cli_main(["run", str(recipe)]) == 0
    assert "[2/2] eval" in capsys.readouterr().err
    assert (tmp_path / "run" / "pruned" / "eval_results.json").is_file()
    assert not (tmp_path / "run" / "recovered").exists()


def test_stage_flags_are_routed_and_bad_input_is_refused(tmp_path, capsys):
    rest, stages = split_stage_flags(["--output-dir", "o.x", "--prune.sparsity", "0.5", "--eval.tasks", "a", "b",
                                      "--model", "m", "--recover.lr", "-1"])
    assert rest == ["--output-dir", "o.x", "--model", "m"]
    assert stages["prune"] == ["--sparsity", "0.5"] and stages["eval"] == ["--tasks", "a", "b"]
    assert stages["recover"] == ["--lr", "-1"]
    assert cli_main(["run", "--output-dir", "x", "--prun.sparsity", "0.5"]) == 2
    assert "Unknown stage in '--prun.sparsity'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["run", "--prune.sparsity", "0.5"])
    assert "--output-dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["run", "--output-dir", "x", "--stages", "recover"])
    assert "needs the prune stage" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("prune: {sparsity: 0.5}\nrecovr: {}\n")
    with pytest.raises(SystemExit):
        cli_main(["run", str(tmp_path / "r.yaml"), "--output-dir", "x"])
    assert "unknown keys ['recovr']" in capsys.readouterr().err
