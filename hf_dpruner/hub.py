"""Upload a pruned checkpoint folder to the Hugging Face Hub in one commit, and download one for loading."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, get_token, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from .config import PRUNING_CONFIG_NAME, read_pruning_record
from .masks import MASKS_NAME, verify_masks_checksum
from .model_card import write_model_card

logger = logging.get_logger(__name__)

# Pickles: never uploaded (the Hub flags them; loading one can run code). Left out with a warning naming them.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]
# Never uploaded: VCS data, temp folders of an interrupted save, caches, pickles.
UPLOAD_IGNORE = [".git/*", ".gitattributes", ".*", ".*/*", "__pycache__/*", "*.pyc", *PICKLE_PATTERNS]
# Only safetensors and JSON (plus tokenizer text files and the card) are ever read from a downloaded checkpoint.
DOWNLOAD_IGNORE = [*PICKLE_PATTERNS, "*.h5", "*.msgpack", "*.gguf", "*.onnx"]


def _check_checkpoint(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the output folder of `hf-dpruner prune`.")
    missing = [name for name in (PRUNING_CONFIG_NAME, MASKS_NAME, "config.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: it is not a pruned checkpoint saved by hf_dpruner "
            "(`hf-dpruner prune --output-dir ...` or `model.save_pretrained(...)` writes one)."
        )
    if not any(folder.glob("model*.safetensors")):
        raise FileNotFoundError(f"{folder} has no model*.safetensors weights: the save is incomplete, save it again.")
    record = read_pruning_record(folder)
    verify_masks_checksum(folder / MASKS_NAME, record.get("masks_sha256"), folder / PRUNING_CONFIG_NAME)
    return record


def resolve_token(token: str | bool | None) -> str:
    """The token to use: `token`, else ``HF_TOKEN`` or the one stored by ``hf auth login``; a clear error if none."""
    resolved = token if isinstance(token, str) else get_token()
    if not resolved:
        raise LocalTokenNotFoundError(
            "Not logged in to the Hugging Face Hub: run `hf auth login`, set the HF_TOKEN environment variable, "
            "or pass token=... (--token on the command line)."
        )
    return resolved


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    overwrite_card: bool = False,
) -> CommitInfo:
    """Create `repo_id` if needed and upload the pruned checkpoint in `folder` (weights, masks, pruning config,
    tokenizer, eval results and card) in one commit.

    The card (``README.md``) is refreshed first from the folder's pruning config and eval results, unless it is a
    README the user wrote (kept unless `overwrite_card`).
    """
    folder = Path(folder)
    record = _check_checkpoint(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: give 'name' or 'namespace/name' ({error})") from error
    api = HfApi(token=resolve_token(token))
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo_url.repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    pickles = sorted({str(p.relative_to(folder)) for pattern in PICKLE_PATTERNS for p in folder.rglob(pattern)
                      if not any(part.startswith(".") for part in p.relative_to(folder).parts)})
    if pickles:
        logger.warning(f"Not uploading {len(pickles)} pickle file(s) of {folder}: {', '.join(pickles)} (hf_dpruner "
                       "uploads safetensors, JSON and text only).")
    write_model_card(folder, overwrite_card=overwrite_card, repo_id=repo_id)
    sparsity = (record.get("achieved_sparsity") or {}).get("overall")
    default_message = f"Upload model pruned with {record.get('method', 'hf_dpruner')}" + (
        f" ({sparsity:.1%} sparsity)" if isinstance(sparsity, (int, float)) else ""
    )
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or default_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=UPLOAD_IGNORE,
    )


def local_checkpoint(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    subfolder: str = "",
) -> Path:
    """A local folder holding the checkpoint: `name_or_path` itself, or a snapshot of the Hub repo it names."""
    path = Path(name_or_path)
    if not path.is_dir():
        patterns = [f"{subfolder}/*"] if subfolder else None
        path = Path(snapshot_download(
            str(name_or_path), revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            force_download=force_download, allow_patterns=patterns, ignore_patterns=DOWNLOAD_IGNORE,
        ))
    return path / subfolder if subfolder else path
