"""Locations of the embedded default model and the bundled corpora, prepared into a cache on first use."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of hf_dpruner's cache, read from the environment at call time.

    ``$HF_DPRUNER_CACHE`` if set, else ``$HF_HOME/hf_dpruner``, else ``$XDG_CACHE_HOME/huggingface/hf_dpruner``
    (``~/.cache/huggingface/hf_dpruner``), following huggingface_hub's own defaults.
    """
    override = os.environ.get("HF_DPRUNER_CACHE")
    if override:
        return Path(override).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hf_dpruner"
