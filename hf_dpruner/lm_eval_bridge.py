"""Bridge to EleutherAI's lm-evaluation-harness (optional ``lm-eval`` dependency).

The bundled MMLU domain questions become offline lm-eval tasks ``dpruner_mmlu_medical`` and ``dpruner_mmlu_legal``:
their YAML configs are generated at run time into a cache folder and point at the prepared ``mmlu`` corpus files.
Any other task name is handed to lm-eval unchanged.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging

from .corpora import MMLU_SUBJECTS, prepare_corpus
from .resources import cache_dir

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


logger = logging.get_logger(__name__)

INSTALL_HINT = 'pip install "hf_dpruner[lm-eval]"'
TASK_PREFIX = "dpruner_"
MMLU_TASKS = {f"{TASK_PREFIX}mmlu_{domain}": domain for domain in MMLU_SUBJECTS}
CHOICE_LETTERS = ("A", "B", "C", "D")
# The prompt of the MMLU paper's evaluation (Hendrycks et al., 2021), so that scores compare with published ones.
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
MMLU_DOC_TO_TEXT = "{{question.strip()}}\n" + "".join(
    f"{letter}. {{{{choices[{i}]}}}}\n" for i, letter in enumerate(CHOICE_LETTERS)
) + "Answer:"


def default_task_dir() -> Path:
    """Folder of the generated task configs: ``cache_dir()/lm_eval_tasks``."""
    return cache_dir() / "lm_eval_tasks"


def mmlu_task_config(task: str, data_file: str | os.PathLike) -> dict[str, Any]:
    """lm-eval config of a 0-shot-by-default, 4-choice log-likelihood task over an MMLU-style jsonl file.

    Rows are ``{question, choices: [4 strings], answer: "A".."D", subject}``; few-shot examples come from the same
    file, never the question being asked.
    """
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "description": MMLU_DESCRIPTION,
        "doc_to_text": MMLU_DOC_TO_TEXT,
        "doc_to_choice": list(CHOICE_LETTERS),
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_task_configs(task_dir: str | os.PathLike | None = None) -> Path:
    """Writes ``<task>.yaml`` for every bundled MMLU task into ``task_dir`` (default: `default_task_dir()`).

    Prepares the ``mmlu`` corpus first if needed. Returns the folder.
    """
    folder = Path(task_dir) if task_dir is not None else default_task_dir()
    folder.mkdir(parents=True, exist_ok=True)
    corpus = prepare_corpus("mmlu")
    for task, domain in MMLU_TASKS.items():
        target = folder / f"{task}.yaml"
        partial = folder / f".{task}.yaml.{os.getpid()}"
        partial.write_text(yaml.safe_dump(mmlu_task_config(task, corpus / f"{domain}.jsonl"), sort_keys=False))
        partial.replace(target)
    return folder


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(f"The lm-eval bridge needs the lm-eval package: {INSTALL_HINT}")


def _task_list(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    return list(tasks)


def build_task_manager(tasks: Sequence[str], task_dir: str | os.PathLike | None = None) -> TaskManager:
    """An lm-eval ``TaskManager`` that resolves every name in ``tasks``; raises ``ValueError`` for unknown names.

    Bundled task configs are (re)written into ``task_dir`` when one of them is asked for; lm-eval's own task index
    (a few seconds to build) is loaded only when another name is.
    """
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = _task_list(tasks)
    bundled = sorted(MMLU_TASKS)
    unknown = [t for t in tasks if t.startswith(TASK_PREFIX) and t not in MMLU_TASKS]
    if unknown:
        raise ValueError(f"Unknown bundled task(s) {unknown}; the bundled tasks are {bundled}")
    folder = write_task_configs(task_dir) if any(t in MMLU_TASKS for t in tasks) else task_dir
    include_defaults = any(t not in MMLU_TASKS for t in tasks)
    manager = TaskManager(include_path=None if folder is None else str(folder), include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise ValueError(
            f"Unknown lm-eval task(s) {unknown} (close matches: {hints}); valid: the bundled tasks {bundled}, "
            "any task, group or tag that `lm-eval ls tasks` lists, or a task YAML file"
        )
    return manager


def _clean_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.3, "alias": ...}`` -> ``{"acc": 0.3}``; other filters keep their ``,filter`` suffix."""
    metrics = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else key] = float(value)
    return metrics


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    task_dir: str | os.PathLike | None = None,
    task_manager: TaskManager | None = None,
    hflm_kwargs: Mapping[str, Any] | None = None,
    evaluate_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates ``model`` on lm-eval tasks; returns ``{task or group: {metric: value}}``.

    ``tasks`` may hold the bundled ``dpruner_mmlu_medical`` / ``dpruner_mmlu_legal`` (offline) and any lm-eval task
    name. ``limit`` caps the questions per task (a float < 1 is a fraction). ``hflm_kwargs`` go to lm-eval's
    ``HFLM`` (e.g. ``max_length``), ``evaluate_kwargs`` to ``lm_eval.simple_evaluate``. Metric names drop lm-eval's
    ``,none`` filter suffix. The model's train/eval mode is restored afterwards.
    """
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = _task_list(tasks)
    if task_manager is None:
        task_manager = build_task_manager(tasks, task_dir)
    was_training = model.training
    try:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(hflm_kwargs or {}))
        output = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            **{"log_samples": False, **(evaluate_kwargs or {})},
        )
    finally:
        model.train(was_training)
    results = {task: _clean_metrics(values) for task, values in output["results"].items()}
    logger.info(f"lm-eval results: {results}")
    return results
