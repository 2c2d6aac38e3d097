"""Replacing a folder never loses a user's file: fault injection at every file-system call of the save paths.

Each save is run once to count its file-system calls (renames, links, removals, folder creations, file writes,
safetensors writes); then, for every call in turn, the save is run again with that call raising OSError, raising
KeyboardInterrupt, or "crashing" (the call and every later one raise, as if the process were killed there, so no
clean-up code can run). Afterwards the folder must be exactly the old one or exactly the new one (foreign files
byte-identical), and the next save must give the new one with nothing left beside it.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils

import hf_dpruner.masks
import hf_dpruner.utils
from hf_dpruner import DPrunerConfig, make_pruned
from hf_dpruner.importance import MagnitudeImportance
from hf_dpruner.masks import compute_masks
from hf_dpruner.pat import PATConfig, export_pat_model, get_pat_model
from hf_dpruner.pat.modules import get_pat_modules
from hf_dpruner.targets import find_prunable_weights
from hf_dpruner.utils import repair_folder, replacing_folder

from testing_utils import PAT_LEARNED, build_tiny


class Crash(BaseException):
    """A process killed at this point: this call and every later file-system call fail."""


# ---------------------------------------------------------------- the fault injector

_OS_CALLS = ("replace", "rename", "link", "symlink", "unlink", "remove", "rmdir", "mkdir", "utime", "chmod")


def _writes(mode: str) -> bool:
    return any(flag in mode for flag in "wax+")


class FaultInjector:
    """Patches the file-system calls that a save makes; counts them, or fails the `fail_at`-th one."""

    def __init__(self, fail_at: int | None = None, error: type[BaseException] | None = None):
        self.fail_at, self.error = fail_at, error
        self.calls: list[str] = []
        self.crashed = False

    def _check(self, label: str) -> None:
        if self.crashed:
            raise Crash(f"after crash: {label}")
        self.calls.append(label)
        if self.fail_at is not None and len(self.calls) - 1 == self.fail_at:
            if self.error is Crash:
                self.crashed = True
            raise self.error(f"injected at call {self.fail_at}: {label}")

    def _wrap(self, name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            self._check(f"{name}({', '.join(str(a) for a in args[:2])})")
            return function(*args, **kwargs)

        return wrapper

    def _wrap_open(self, function: Callable) -> Callable:
        def wrapper(file, mode="r", *args, **kwargs):
            if _writes(mode):
                self._check(f"open({file}, {mode!r})")
            return function(file, mode, *args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def active(self) -> Iterator[FaultInjector]:
        with pytest.MonkeyPatch.context() as patch:
            for name in _OS_CALLS:
                patch.setattr(os, name, self._wrap(f"os.{name}", getattr(os, name)))
            for name in ("rmtree", "copy2", "copyfile"):
                patch.setattr(shutil, name, self._wrap(f"shutil.{name}", getattr(shutil, name)))
            if hf_dpruner.utils._exchange is not None:
                patch.setattr(hf_dpruner.utils, "_exchange", self._wrap("exchange", hf_dpruner.utils._exchange))
            patch.setattr(builtins, "open", self._wrap_open(builtins.open))
            patch.setattr(io, "open", self._wrap_open(io.open))
            patch.setattr(transformers.modeling_utils, "safe_save_file",
                          self._wrap("safe_save_file", transformers.modeling_utils.safe_save_file))
            patch.setattr(hf_dpruner.masks, "save_file", self._wrap("save_file", hf_dpruner.masks.save_file))
            yield self


# ---------------------------------------------------------------- folder snapshots


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under `folder`: file bytes, symlink targets and (empty) folders."""
    if not folder.exists():
        return {}
    entries: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            entries[rel] = ("symlink", os.readlink(path))
        elif path.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = path.read_bytes()
    return entries


def add_foreign_files(out: Path) -> None:
    """What a user keeps in a checkpoint folder: a git clone, their README, tokenizer files, notes, a symlink, and
    a stale sharded index from an older save (dropped by design)."""
    (out / ".git" / "objects" / "ab").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".git" / "objects" / "ab" / "cdef").write_bytes(b"\x78\x9c blob")
    os.chmod(out / ".git" / "objects" / "ab" / "cdef", 0o444)  # git's objects are read-only
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (out / "README.md").write_text("# My model\nwritten by hand\n")
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("keep me")
    os.symlink("notes/a.txt", out / "latest-notes")


def pruned_tiny(seed: int) -> torch.nn.Module:
    model = build_tiny("llama", seed=seed)
    config = DPrunerConfig(sparsity=0.5)
    weights = find_prunable_weights(model, config.target_modules)
    masks = compute_masks(MagnitudeImportance().score(model, weights), weights, config)
    return make_pruned(model, masks, config, record={"method": "magnitude", "base_model": "tiny"}, apply=True)


def pat_export(seed: int) -> Callable[[Path], None]:
    model = get_pat_model(build_tiny("llama", seed=seed), PATConfig(**PAT_LEARNED, lora_r=0, hsm_rank=2))
    get_pat_modules(model).mask.set_progress(10, 10)
    return lambda out: export_pat_model(model, out)


SAVES = {
    "save_pretrained": lambda seed: pruned_tiny(seed).save_pretrained,
    "pat_export": pat_export,
}


@pytest.fixture(params=["exchange", "two-renames"])
def swap_mode(request, monkeypatch):
    """The atomic exchange where the platform has it, and the two-rename fallback used elsewhere."""
    if request.param == "exchange":
        if hf_dpruner.utils._exchange is None:
            pytest.skip("no atomic exchange on this platform")
    else:
        monkeypatch.setattr(hf_dpruner.utils, "_exchange", None)
    return request.param


def _reference_states(tmp_path: Path, save: Callable[[Path], None], old_save: Callable[[Path], None]):
    """The folder before (old checkpoint + foreign files) and after a clean save, and how many calls it makes."""
    template = tmp_path / "template" / "out"
    old_save(template)
    add_foreign_files(template)
    (template / "model.safetensors.index.json").write_text("{}")  # stale: the new save drops it
    old = snapshot(template)
    reference = tmp_path / "reference" / "out"
    shutil.copytree(template, reference, symlinks=True)
    with FaultInjector().active() as counter:
        save(reference)
    new = snapshot(reference)
    assert old != new
    foreign = [name for name in old if name.startswith((".git", "notes", "latest-notes", "README.md", "tokenizer"))]
    assert len(foreign) == 11 and all(new[name] == old[name] for name in foreign)
    assert "model.safetensors.index.json" not in new
    return template, old, new, len(counter.calls), counter.calls


@pytest.mark.parametrize("which", list(SAVES))
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt, Crash])
def test_a_fault_at_any_file_system_call_never_loses_a_file(tmp_path, which, error, swap_mode):
    save, old_save = SAVES[which](seed=1), SAVES[which](seed=0)
    template, old, new, count, labels = _reference_states(tmp_path, save, old_save)
    assert count >= 15, labels  # writes, links, the swap and the removal of the old version are all covered
    assert any(label.startswith(("exchange", "os.rename")) for label in labels)
    outcomes = {"old": 0, "new": 0, "moved aside": 0}
    for k in range(count):
        parent = tmp_path / f"case-{k}"
        out = parent / "out"
        shutil.copytree(template, out, symlinks=True)
        injector = FaultInjector(fail_at=k, error=error)
        with injector.active():
            try:
                save(out)
            except (OSError, KeyboardInterrupt, Crash):
                pass
        assert len(injector.calls) > k, f"call {k} was not reached: the save path changed between runs"
        after = snapshot(out)
        where = f"fault at call {k} ({labels[k]}), {error.__name__}, {swap_mode}"
        if after == old:
            outcomes["old"] += 1
        elif after == new:
            outcomes["new"] += 1
        else:
            # only a killed process between the two renames of the fallback may leave the folder moved aside
            assert error is Crash and swap_mode == "two-renames" and not out.exists(), where
            aside = [p for p in parent.iterdir() if ".hf-old-" in p.name]
            assert len(aside) == 1 and snapshot(aside[0]) == old, where
            outcomes["moved aside"] += 1
        if error is not Crash:
            assert not out.exists() or after in (old, new), where
        save(out)  # the next save repairs whatever was left
        assert snapshot(out) == new, where
        assert sorted(p.name for p in parent.iterdir()) == ["out"], where
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    if error is not Crash or swap_mode == "exchange":
        assert outcomes["moved aside"] == 0, outcomes


def test_a_failing_swap_keeps_git_and_readme(tmp_path, monkeypatch):
    """The defect that started this: the swap's rename failing used to delete the moved-over .git and README."""
    out = tmp_path / "out"
    pruned_tiny(0).save_pretrained(out)
    add_foreign_files(out)
    before = snapshot(out)

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_dpruner.utils, "_exchange", failing)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk full"):
        pruned_tiny(1).save_pretrained(out)
    monkeypatch.undo()
    assert snapshot(out) == before
    assert (out / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (out / "README.md").read_text() == "# My model\nwritten by hand\n"


def test_repair_moves_a_folder_left_aside_back(tmp_path):
    """The documented recovery after a kill between the fallback's two renames."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    aside = tmp_path / f".out.hf-old-{os.getpid()}-1234abcd"
    os.rename(out, aside)
    (tmp_path / f".out.hf-new-{os.getpid()}-x").mkdir()  # an unfinished new version
    repair_folder(out)
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_running_save_is_left_alone(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    running = tmp_path / ".out.hf-new-4242-abc"
    running.mkdir()
    monkeypatch.setattr(hf_dpruner.utils, "_pid_alive", lambda pid: pid == 4242)
    with replacing_folder(out) as folder:
        (folder / "a.txt").write_text("new")
    assert running.is_dir()
    assert (out / "a.txt").read_text() == "new"


def test_foreign_files_are_linked_not_moved(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "big.bin").write_bytes(b"x" * 1000)
    inode = (out / "big.bin").stat().st_ino
    with replacing_folder(out) as folder:
        (folder / "config.json").write_text("{}")
        assert (out / "big.bin").is_file()  # the old folder is whole until the swap
    assert (out / "big.bin").stat().st_ino == inode  # carried as a hard link: no copy of large files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_cache_folder_keeps_nothing_of_the_old_one(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with replacing_folder(out, keep_foreign=False) as folder:
        (folder / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_a_file_in_the_way_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("mine")
    with pytest.raises(ValueError, match="it is a file"), replacing_folder(target):
        pass
    assert target.read_text() == "mine"


def test_saving_through_a_symlinked_folder_keeps_the_link(tmp_path):
    real = tmp_path / "data" / "out"
    real.mkdir(parents=True)
    (real / "notes.txt").write_text("keep")
    link = tmp_path / "out"
    os.symlink(real, link)
    pruned_tiny(0).save_pretrained(link)
    assert link.is_symlink() and (real / "config.json").is_file() and (real / "notes.txt").read_text() == "keep"


def test_saving_into_the_working_directory_keeps_a_valid_working_directory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    monkeypatch.chdir(out)
    pruned_tiny(0).save_pretrained(".")
    assert Path.cwd() == out and (Path("config.json")).is_file() and Path("notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
