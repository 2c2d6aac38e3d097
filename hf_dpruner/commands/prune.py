"""``hf-dpruner prune``: D-Pruner on a model and calibration data, written as a pruned checkpoint."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..config import DPrunerConfig
from ..corpora import DOMAIN_CORPORA, GENERAL_CORPUS
from ..data import load_texts
from ..methods import CALIBRATION_CHOICES, get_method, method_names, prune_model
from ..resume import last_complete_checkpoint
from ..stages import PruningResult
from .model_args import ModelArguments, load_model

RUN_SUFFIX = ".dpruner-run"
GENERAL_IMPORTANCE_NAME = "general_importance.safetensors"


@dataclass
class PruneArguments:
    """What to prune and on which data."""

    method: str = field(
        default="dpruner-recon", metadata={"help": "Pruning method (the registered ones are listed)."}
    )
    calibration: str = field(
        default="domain",
        metadata={"help": "Data the single-text methods calibrate on: 'domain' (default, their strongest setting) or "
                  "'general' (the classic setting). D-Pruner always uses both."},
    )
    domain: str = field(
        default="medical", metadata={"help": f"Bundled domain corpus: {', '.join(DOMAIN_CORPORA)}."}
    )
    domain_data: str | None = field(
        default=None,
        metadata={"help": "Domain text: a .txt/.jsonl/.json/.parquet/.csv file, a folder or a `datasets` name. "
                  "Overrides --domain."},
    )
    general_data: str | None = field(
        default=None,
        metadata={"help": f"Open-domain text (same forms). Default: the bundled {GENERAL_CORPUS!r} corpus."},
    )
    general_importance: str | None = field(
        default=None,
        metadata={"help": "Safetensors file caching the general importance: read if it exists, else written."},
    )


@dataclass
class PruneTrainingArguments(TrainingArguments):
    """TrainingArguments with the defaults of D-Pruner's domain pass (SGD, one epoch, a checkpoint every quarter of
    it so that a killed run resumes)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the pruned checkpoint is written."})
    optim: str = field(default="sgd", metadata={"help": "Optimizer of the domain pass (the paper used SGD)."})
    learning_rate: float = field(default=0.03, metadata={"help": "Learning rate of the domain pass (paper: 0.03)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs of the domain pass over the windows."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Calibration micro-batch size."})
    gradient_accumulation_steps: int = field(
        default=4, metadata={"help": "Micro-batches per optimizer step (4 x 1 keeps activation memory low)."}
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    save_strategy: str = field(
        default="steps",
        metadata={"help": "Checkpointing during the domain pass (into <output-dir>.dpruner-run, deleted on success)."},
    )
    save_steps: float = field(
        default=0.25, metadata={"help": "Checkpoint every N steps (a fraction < 1: of the pass's steps)."}
    )
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept (2: the newest complete one survives a kill while saving)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})


def parse(argv: list[str]) -> tuple[DPrunerConfig, ModelArguments, PruneArguments, PruneTrainingArguments]:
    parser = HfArgumentParser((DPrunerConfig, ModelArguments, PruneArguments, PruneTrainingArguments),
                              prog="hf-dpruner prune")
    for action in parser._actions:  # the choices and help of --method come from the registry of methods
        if action.dest == "method":
            action.choices = method_names()
            described = [f"{name} ({get_method(name).title}{', default' if name == action.default else ''})"
                         for name in method_names()]
            action.help = "Pruning method: " + "; ".join(described) + "."
    config, model_args, prune_args, training_args = parser.parse_args_into_dataclasses(argv)
    if not training_args.output_dir:
        parser.error("--output-dir is required.")
    if os.path.isfile(training_args.output_dir):
        parser.error(f"--output-dir {training_args.output_dir} is a file, not a folder: choose a folder path.")
    if prune_args.calibration not in CALIBRATION_CHOICES:
        parser.error(f"--calibration must be one of {list(CALIBRATION_CHOICES)}, got {prune_args.calibration!r}.")
    if prune_args.domain_data is None and prune_args.domain not in DOMAIN_CORPORA:
        parser.error(f"--domain must be one of {list(DOMAIN_CORPORA)} (or give --domain-data).")
    return config, model_args, prune_args, training_args


def summary_table(result: PruningResult, peak_rss_mib: float) -> str:
    """Sparsity per module type, time per stage and peak memory, as aligned text."""
    rows = [("module type", "sparsity")]
    rows += [(name, f"{value:.4f}") for name, value in result.sparsity["per_module_type"].items()]
    rows += [("overall", f"{result.sparsity['overall']:.4f}"), ("", "")]
    rows += [(f"time: {stage}", f"{seconds:.1f} s") for stage, seconds in result.stage_seconds.items()]
    rows += [("time: total", f"{sum(result.stage_seconds.values()):.1f} s"), ("peak RSS", f"{peak_rss_mib:.0f} MiB")]
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"{left:<{width}}  {right}" for left, right in rows)


def run_folder(output_dir: str | os.PathLike) -> Path:
    """Where a D-Pruner run keeps its stage outputs (general importance, domain-pass checkpoints) until it ends."""
    output_dir = Path(output_dir).resolve()
    return output_dir.with_name(output_dir.name + RUN_SUFFIX)


def main(argv: list[str]) -> int:
    config, model_args, prune_args, training_args = parse(argv)
    output_dir = training_args.output_dir
    general_importance, resume = prune_args.general_importance, None
    if prune_args.method == "dpruner":  # stage outputs go to a run folder: a rerun of the command resumes
        run_dir = run_folder(output_dir)
        training_args.output_dir = str(run_dir)
        general_importance = general_importance or str(run_dir / GENERAL_IMPORTANCE_NAME)
        resume = last_complete_checkpoint(run_dir)
        cached = Path(general_importance).is_file()
        if cached or resume:
            print(f"resuming from {run_dir}: general importance {'cached' if cached else 'to compute'}, domain pass "
                  f"{'from ' + Path(resume).name if resume else 'from the start'}", file=sys.stderr)
    model, tokenizer = load_model(model_args)
    domain_source = prune_args.domain_data or DOMAIN_CORPORA[prune_args.domain]
    general_source = prune_args.general_data or GENERAL_CORPUS
    data = get_method(prune_args.method).data
    needs_general = data == "both" or (data == "one" and prune_args.calibration == "general")
    needs_domain = data == "both" or (data == "one" and prune_args.calibration == "domain")
    model, result = prune_model(
        model,
        tokenizer,
        prune_args.method,
        config,
        training_args,
        general_texts=load_texts(general_source) if needs_general else None,
        domain_texts=load_texts(domain_source) if needs_domain else None,
        calibration=prune_args.calibration,
        general_importance=general_importance,
        resume_from_checkpoint=resume,
    )
    model.pruning_record["base_model"] = model_args.name
    model.pruning_record["calibration"].update(general_data=general_source, domain_data=domain_source)
    if not training_args.should_save:  # under several processes only the main one writes
        return 0
    save_start = time.perf_counter()
    model.save_pretrained(output_dir, tokenizer=tokenizer)
    result.stage_seconds["save"] = time.perf_counter() - save_start
    if prune_args.method == "dpruner":
        shutil.rmtree(run_folder(output_dir), ignore_errors=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(summary_table(result, peak_mib))
    print(f"saved: {output_dir}")
    return 0
