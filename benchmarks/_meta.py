"""Provenance of a benchmark results file: what code, settings, machine and date produced its numbers.

Every script in ``benchmarks/`` writes ``{"metadata": start_metadata(args), ...}`` (finished with
`finish_metadata` when it writes the file); ``tests/test_results_files.py`` fails when a results file lacks any of
`REQUIRED_FIELDS`. The commit is read when the run starts: a run on a tree with uncommitted changes to the code it
measures says so in ``commit_dirty`` and ``dirty_files``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The code a benchmark measures: uncommitted changes here make a run "dirty" (results files are not code).
CODE_PATHS = ("hf_dpruner", "benchmarks", "model_cards", "pyproject.toml", "setup.cfg", ":(exclude)benchmarks/results")
REQUIRED_FIELDS = ("commit", "commit_dirty", "cli_args", "cpu_count", "torch_threads", "date", "versions")
PACKAGES = ("torch", "transformers", "hf_dpruner", "peft", "datasets", "accelerate")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """HEAD's commit and the code files that differ from it (None when this is not a git checkout)."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return {"commit": None, "commit_dirty": None, "dirty_files": []}
    status = _git("status", "--porcelain", "--", *CODE_PATHS) or ""
    dirty = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": head.strip(), "commit_dirty": bool(dirty), "dirty_files": dirty[:50]}


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def start_metadata(script: str, args: argparse.Namespace | dict[str, Any],
                   argv: list[str] | None = None) -> dict[str, Any]:
    """The metadata block of a run of `script` starting now: commit, command line and parsed arguments, machine,
    thread settings, date, versions. `argv`: the arguments `main` parsed (default: this process's)."""
    import torch  # the thread count every measuring process of this run starts with (same environment)

    path = Path(script).resolve()
    script_name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else script
    return {
        **git_state(),
        "command": shlex.join(["python", script_name, *(sys.argv[1:] if argv is None else argv)]),
        "cli_args": dict(vars(args) if isinstance(args, argparse.Namespace) else args),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "date": utc_now(),
        "versions": _versions(),
    }


def finish_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Adds the end date; records HEAD again if it moved during the run (the numbers then mix two states)."""
    metadata["finished"] = utc_now()
    now = git_state()
    if now["commit"] != metadata["commit"] or now["dirty_files"] != metadata["dirty_files"]:
        metadata["changed_during_run"] = now
    return metadata


BACKFILLED_FIELDS = ("commit", "date")


def missing_fields(metadata: Any) -> list[str]:
    """The required fields a metadata block lacks or leaves empty. A block back-filled from git history (results
    measured before the scripts recorded metadata; see `is_backfilled`) needs only the commit and the date."""
    if not isinstance(metadata, dict):
        return list(REQUIRED_FIELDS)
    required = BACKFILLED_FIELDS if is_backfilled(metadata) else REQUIRED_FIELDS
    return [k for k in required if metadata.get(k) is None or metadata.get(k) == ""]


def is_backfilled(metadata: Any) -> bool:
    """Whether a metadata block was reconstructed from git history rather than recorded by the run."""
    return isinstance(metadata, dict) and bool(metadata.get("backfilled_from_git"))


def run_worker_process(script: str, args: list[str], env: dict[str, str] | None = None) -> Any:
    """Run ``script args --result FILE`` in a fresh interpreter (a benchmark's own worker mode, so that nothing of
    this process reaches the measurement) and return the JSON it wrote to FILE; `env` is added to this environment."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, script, *args, "--result", str(out)], env={**os.environ, **(env or {})})
        if done.returncode != 0:
            raise RuntimeError(f"the worker `{Path(script).name} {shlex.join(args)}` failed with exit code "
                               f"{done.returncode}")
        return json.loads(out.read_text())
