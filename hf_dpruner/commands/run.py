"""``hf-dpruner run [RECIPE]``: prune → recover → eval → (push) in one command, resumable stage by stage.

Each stage is the subcommand of the same name with the same flags, given as ``--STAGE.FLAG VALUE`` on the command
line or as the ``STAGE:`` section of a YAML/JSON recipe (command-line flags win)::

    hf-dpruner run --output-dir out/med50 --prune.sparsity 0.5 --recover.max-steps 100 --recover.distill-weight 0.5
    hf-dpruner run recipe.yaml

    # recipe.yaml
    output_dir: out/med50
    model: HuggingFaceTB/SmolLM2-135M-Instruct   # optional; the embedded model by default
    prune: {method: dpruner-recon, domain: medical, sparsity: 0.5}
    recover: {max_steps: 100, distill_weight: 0.5}
    eval: {max_tokens: 16384}
    push: {repo_id: me/smollm2-med-50}           # optional: the push stage runs only when it is configured

Outputs: ``OUTPUT_DIR/pruned`` (prune), ``OUTPUT_DIR/recovered`` (recover; the final model when it runs), the eval
results and card in the final model folder, and ``OUTPUT_DIR/run_state.json``. A rerun reuses every stage whose
flags, upstream output and own output are unchanged, so a killed run resumes at the stage it was in (and D-Pruner's
own stages resume inside ``prune``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("prune", "recover", "eval", "push")
DEFAULT_STAGES = ("prune", "recover", "eval")
STATE_NAME = "run_state.json"
FOLDERS = {"prune": "pruned", "recover": "recovered"}


def _flag_values(section: dict[str, Any], where: str) -> list[str]:
    """A recipe section as command-line flags: ``max_steps: 5`` → ``--max-steps 5`` (lists: several values;
    ``true``: the bare flag; ``false``: ``--flag false``)."""
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping of flag names to values, got {type(section).__name__}.")
    argv: list[str] = []
    for key, value in section.items():
        argv.append(f"--{str(key).replace('_', '-')}")
        if value is True:
            continue  # a bare flag: store_true options and boolean dataclass fields both read it as true
        if value is False:
            argv.append("false")
        elif isinstance(value, list):
            argv += [str(v) for v in value]
        elif value is not None:
            argv.append(str(value))
    return argv


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file (``.yaml``/``.yml`` or ``.json``) as a dict, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {path} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        recipe = yaml.safe_load(text)
    elif path.suffix == ".json":
        recipe = json.loads(text)
    else:
        raise ValueError(f"Recipe {path}: use a .yaml, .yml or .json file.")
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must hold a mapping (output_dir, model, and one section per stage).")
    unknown = set(recipe) - {"output_dir", "model", "stages", *STAGES}
    if unknown:
        raise ValueError(f"Recipe {path} has unknown keys {sorted(unknown)}; allowed: output_dir, model, stages, "
                         f"{', '.join(STAGES)}.")
    return recipe


def split_stage_flags(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--STAGE.FLAG values...`` tokens routed to each stage as ``--FLAG values...``; the rest is returned."""
    rest: list[str] = []
    stage_flags: dict[str, list[str]] = {stage: [] for stage in STAGES}
    target = rest
    for token in argv:
        if token.startswith("--") and "." in token.split("=", 1)[0]:
            stage, flag = token[2:].split(".", 1)
            if stage not in STAGES:
                raise ValueError(f"Unknown stage in {token!r}: the stages are {', '.join(STAGES)}.")
            target = stage_flags[stage]
            target.append(f"--{flag.replace('_', '-')}")
        elif token.startswith("-") and not token[1:2].isdigit():  # "-1" is a value, not a flag
            target = rest
            rest.append(token)
        else:
            target.append(token)
    return rest, stage_flags


def plan(recipe: dict[str, Any], stage_flags: dict[str, list[str]], output_dir: Path, model: str | None,
         stages: tuple[str, ...]) -> list[tuple[str, list[str], Path]]:
    """``(stage, argv of its subcommand, the folder it writes)`` for each stage to run, in order."""
    steps = []
    model_dir: Path | None = None
    for stage in STAGES:
        if stage not in stages:
            continue
        flags = _flag_values(recipe.get(stage) or {}, f"Recipe section {stage!r}") + stage_flags[stage]
        if stage == "prune":
            model_dir = output_dir / FOLDERS["prune"]
            argv = ["--output-dir", str(model_dir), *(["--model", model] if model else []), *flags]
        elif stage == "recover":
            if model_dir is None:
                raise ValueError("The recover stage needs the prune stage before it.")
            source, model_dir = model_dir, output_dir / FOLDERS["recover"]
            argv = [str(source), "--output-dir", str(model_dir), *flags]
        else:
            if model_dir is None:
                raise ValueError(f"The {stage} stage needs the prune stage before it.")
            argv = [str(model_dir), *flags]
        steps.append((stage, argv, model_dir))
    return steps


class RunState:
    """``run_state.json``: per stage, the fingerprint of its inputs and when it finished (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.stages = json.loads(path.read_text()).get("stages", {})
            except (json.JSONDecodeError, AttributeError):
                print(f"warning: {path} is unreadable; every stage runs again.", file=sys.stderr)

    def done(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        entry = self.stages.get(stage)
        return entry if entry and entry.get("fingerprint") == fingerprint else None

    def record(self, stage: str, fingerprint: str, argv: list[str], seconds: float) -> dict[str, Any]:
        entry = {"fingerprint": fingerprint, "argv": argv, "finished": time.time(), "seconds": round(seconds, 1)}
        self.stages[stage] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=2) + "\n")
        os.replace(tmp, self.path)
        return entry


def _output_present(stage: str, folder: Path) -> bool:
    if stage in FOLDERS:
        return (folder / "config.json").is_file() and (folder / "pruning_config.json").is_file()
    if stage == "eval":
        return (folder / "eval_results.json").is_file()
    return True  # a push leaves nothing here: its record is the proof


def main(argv: list[str]) -> int:
    try:
        rest, stage_flags = split_stage_flags(argv)
    except ValueError as err:
        print(f"hf-dpruner run: {err}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="hf-dpruner run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="YAML/JSON recipe: output_dir, model, a section per stage.")
    parser.add_argument("--output-dir", help="Folder of the run (overrides the recipe's output_dir).")
    parser.add_argument("--model", help="Base model (Hub id or folder). Default: the recipe's, else the embedded one.")
    parser.add_argument("--stages", help=f"Comma-separated stages to run, in order among {', '.join(STAGES)}. Default: "
                        "prune,recover,eval, plus push when it is configured.")
    args = parser.parse_args(rest)
    try:
        recipe = read_recipe(args.recipe) if args.recipe else {}
    except (OSError, ValueError) as err:
        parser.error(str(err))
    output_dir = args.output_dir or recipe.get("output_dir")
    if not output_dir:
        parser.error("--output-dir is required (or output_dir in the recipe).")
    stages_text = args.stages or recipe.get("stages")
    if stages_text:
        stages = tuple(s.strip() for s in (stages_text if isinstance(stages_text, list) else stages_text.split(",")))
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            parser.error(f"unknown stages {unknown}: choose among {', '.join(STAGES)}.")
    else:
        stages = DEFAULT_STAGES + (("push",) if recipe.get("push") or stage_flags["push"] else ())
    try:
        steps = plan(recipe, stage_flags, Path(output_dir), args.model or recipe.get("model"), stages)
    except ValueError as err:
        parser.error(str(err))

    state = RunState(Path(output_dir) / STATE_NAME)
    upstream = ""
    for index, (stage, stage_argv, folder) in enumerate(steps, 1):
        fingerprint = hashlib.sha256(json.dumps([stage, stage_argv, upstream]).encode()).hexdigest()[:16]
        previous = state.done(stage, fingerprint)
        label = f"[{index}/{len(steps)}] {stage}"
        if previous is not None and _output_present(stage, folder):
            print(f"{label}: reused (unchanged since {time.ctime(previous['finished'])})", file=sys.stderr)
        else:
            print(f"{label}: hf-dpruner {stage} {' '.join(stage_argv)}", file=sys.stderr)
            start = time.perf_counter()
            code = importlib.import_module(f"hf_dpruner.commands.{stage}").main(stage_argv)
            if code:
                print(f"{label} failed (exit {code}); rerun the same command to resume here.", file=sys.stderr)
                return code
            previous = state.record(stage, fingerprint, stage_argv, time.perf_counter() - start)
        upstream = f"{fingerprint}@{previous['finished']}"
    final = steps[-1][2] if steps else None
    print(f"done: {final}", file=sys.stderr)
    return 0
