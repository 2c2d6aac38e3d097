"""The neutral bottom layer: helpers that several modules share and that import nothing from the package: reading
a JSON object with clear errors, the sha256 of a file, and the folder replacement.

`replacing_folder` is the one way hf_dpruner replaces a folder (checkpoints, PAT exports, recovery outputs,
prepared caches): a failure or interrupt at any step leaves the folder as it was or completely new, and never
loses a file the user had in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

def read_json_object(file: str | os.PathLike, missing_hint: str, remedy: str) -> dict[str, Any]:
    """The JSON object in `file`; clear errors (with `missing_hint` / `remedy`) when it is absent, corrupt or not
    an object."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"No {file.name} at {file}; {missing_hint}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the file is corrupt, {remedy}.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}.")
    return data


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Names of the sibling folders that a save works in: `.NAME.hf-new-PID-XXXX` (the new content being written;
# after the swap it holds the old content until it is deleted) and `.NAME.hf-old-PID-XXXX` (the old folder moved
# aside, only where the platform cannot exchange two folders in one step).
_NEW, _OLD = "hf-new", "hf-old"


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.({_NEW}|{_OLD})-(\d+)-[^/]+$")


def _exchange_function() -> Callable[[Path, Path], None] | None:
    """Atomic exchange of two paths (Linux ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``), or
    None where the C library has neither."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - Windows
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2

        def call(a: bytes, b: bytes) -> int:
            return libc.renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # pragma: no cover - macOS
        rename_swap = 2

        def call(a: bytes, b: bytes) -> int:
            return libc.renamex_np(a, b, rename_swap)
    else:  # pragma: no cover
        return None

    def exchange(a: Path, b: Path) -> None:
        if call(os.fsencode(a), os.fsencode(b)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(a), None, str(b))

    return exchange


_exchange = _exchange_function()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt; a no-op outside the main
    thread (where Python delivers no signals anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this process is from an earlier, failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def repair_folder(target: str | os.PathLike) -> None:
    """Repair what an interrupted `replacing_folder` of `target` may have left beside it (a killed process cannot
    clean up): if `target` is missing and the old folder was moved aside, move it back; remove the other
    leftovers. Folders of a save that is still running (its process is alive) are left alone."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = _leftover_pattern(target.name)
    leftovers = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(2))):
            leftovers.append((match.group(1), entry))
    if not os.path.lexists(target):
        moved_aside = sorted((e for kind, e in leftovers if kind == _OLD), key=lambda e: e.stat().st_mtime)
        if moved_aside:
            os.rename(moved_aside[-1], target)
            logger.warning(f"Restored {target} from {moved_aside[-1].name}, left by an interrupted save.")
    for _, entry in leftovers:
        if os.path.lexists(entry):
            _remove(entry)


def _link_or_copy(source: Path, dest: Path) -> None:
    """Put `source` (a file, symlink or folder tree) at `dest` without touching `source`: hard links where the
    file system allows them (instant, no extra space), copies otherwise."""
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
    elif source.is_dir():
        os.mkdir(dest)
        shutil.copystat(source, dest)
        for child in source.iterdir():
            _link_or_copy(child, dest / child.name)
    else:
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)


@contextlib.contextmanager
def replacing_folder(
    target: str | os.PathLike,
    *,
    keep_foreign: bool = True,
    stale: Callable[[str], bool] | None = None,
) -> Iterator[Path]:
    """Write a new version of the folder `target`: yields an empty sibling folder to write into; when the block
    ends without an error, it replaces `target` in one step.

    Entries of the old `target` that the block did not write (``.git``, a README, tokenizer files...) are carried
    into the new folder as hard links or copies (never moved: the old folder stays whole until the swap), unless
    ``keep_foreign=False`` (a cache folder that is wholly ours) or ``stale(name)`` is true (files of the previous
    save that would contradict the new ones). The swap is an atomic exchange of the two folders where the platform
    offers one (Linux, macOS), so `target` never stops existing; elsewhere two renames, rolled back on failure,
    with Ctrl-C held back in between. After a crash (a killed process), `repair_folder` — run by the next save —
    restores or cleans up.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        >>> with replacing_folder(out) as folder:
        ...     _ = (folder / "config.json").write_text("{}")
        >>> sorted(p.name for p in out.iterdir())
        ['config.json']
    """
    target = Path(os.path.abspath(target))  # "." or "out/.." name no folder of their own
    if target.is_symlink():
        target = target.resolve()
    if os.path.lexists(target) and not target.is_dir():
        raise ValueError(f"Cannot save to {target}: it is a file. Choose a folder path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    repair_folder(target)
    new = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_NEW}-{os.getpid()}-", dir=target.parent))
    try:
        yield new
        if keep_foreign and target.is_dir():
            for entry in target.iterdir():
                if not os.path.lexists(new / entry.name) and not (stale is not None and stale(entry.name)):
                    _link_or_copy(entry, new / entry.name)
        cwd = os.getcwd()
        old = _swap(new, target)
        if cwd == str(target) or cwd.startswith(str(target) + os.sep):
            os.chdir(cwd)  # the working directory moved away with the old folder: enter the new one
    except BaseException:
        if os.path.lexists(new):
            try:
                shutil.rmtree(new)
            except OSError as err:
                logger.warning(f"Could not remove the unfinished {new} ({err}); the next save to {target} will.")
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as err:
            logger.warning(f"Could not remove the previous version {old} ({err}); the next save to {target} will.")


def _swap(new: Path, target: Path) -> Path | None:
    """Put `new` in place of `target`; returns where the old content now is (to be deleted), or None."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if _exchange is not None:
        try:
            _exchange(new, target)
            return new  # `new` now names the old content
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange on this file system
                raise
    backup = target.with_name(f".{target.name}.{_OLD}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with _interrupts_deferred():
        os.rename(target, backup)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(backup, target)
            raise
    return backup
