"""``hf-dpruner recover PRUNED_DIR``: LoRA recovery that keeps the sparsity (uniform ranks or RankAdaptor)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments

from ..config import read_pruning_record, recorded_source
from ..corpora import CORPORA
from ..data import load_texts
from ..modeling import AutoPrunedModelForCausalLM, is_stale_checkpoint_file, load_causal_lm
from ..recovery.recover import RecoveryArguments, plot_ranks, recover
from ..resources import model_location
from ..utils import replacing_folder

ADAPTER_DIR = "adapter"
RANKS_PLOT = "lora_ranks.png"


@dataclass
class RecoverDataArguments:
    data: str | None = field(
        default=None,
        metadata={"help": "Recovery text: a bundled corpus name, a file/folder or a `datasets` name. Default: the "
                  "domain data recorded in the checkpoint."},
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Held-out text scoring the search runs. Default: the eval split of a bundled corpus "
                  "(required for other data)."},
    )


@dataclass
class RecoverTrainingArguments(TrainingArguments):
    """TrainingArguments with recovery defaults (AdamW 2e-4, 100 steps, batches of 4, nothing saved mid-way)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the recovered checkpoint is written."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the LoRA recovery."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps of the final recovery."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Windows per batch."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing during recovery."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})


def main(argv: list[str]) -> int:
    parser = HfArgumentParser((RecoveryArguments, RecoverDataArguments, RecoverTrainingArguments),
                              prog="hf-dpruner recover PRUNED_DIR")
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        parser.error("give the pruned checkpoint folder first: hf-dpruner recover PRUNED_DIR --output-dir OUT ...")
    pruned_dir, rest = argv[0], argv[1:]
    args, data_args, training_args = parser.parse_args_into_dataclasses(rest)
    if not training_args.output_dir:
        parser.error("--output-dir is required.")
    record = read_pruning_record(pruned_dir)
    data = data_args.data or recorded_source(
        (record.get("calibration") or {}).get("domain_data"), pruned_dir, "calibration.domain_data", "--data"
    )
    if data is None:
        parser.error("the checkpoint records no domain data: pass --data.")
    eval_data = data_args.eval_data or (data if data in CORPORA else None)
    if eval_data is None and args.rank_allocation == "rankadaptor":
        parser.error(f"--eval-data is needed to score the search runs on data other than {sorted(CORPORA)}.")

    teacher_name = None
    if args.distill_weight > 0:
        teacher_name = args.teacher or recorded_source(record.get("base_model"), pruned_dir, "base_model", "--teacher")
        if teacher_name is None:
            parser.error("the checkpoint records no base model to distil from: pass --teacher.")

    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    model = AutoPrunedModelForCausalLM.from_pretrained(pruned_dir)
    teacher = None
    if teacher_name is not None:
        print(f"teacher: {teacher_name}", file=sys.stderr)
        teacher = load_causal_lm(model_location(teacher_name), dtype=next(model.parameters()).dtype)
        args.teacher = teacher_name
    out = Path(training_args.output_dir)
    # the merged model, the adapter and the plot replace the output folder together, or not at all
    with replacing_folder(out, stale=is_stale_checkpoint_file) as staging:
        result = recover(
            model, tokenizer, load_texts(data), load_texts(eval_data, split="eval") if eval_data else [],
            args, training_args, adapter_dir=staging / ADAPTER_DIR, teacher=teacher,
        )
        result.model.pruning_record["recovery"]["data"] = data
        result.model.save_pretrained(staging, tokenizer=tokenizer)
        allocation = result.model.pruning_record["recovery"]["rank_allocation"]
        title = f"LoRA ranks ({allocation}, mean {args.lora_r})"
        plot = plot_ranks(result.ranks, staging / RANKS_PLOT, title)
    plot = out / RANKS_PLOT if plot else None
    summary = {"rank_allocation": allocation, "layer_ranks": list(result.ranks),
               "lora_parameters": result.lora_parameters,
               "sparsity": round(result.model.pruning_sparsity()["overall"], 6),
               "seconds": {k: round(v, 1) for k, v in result.seconds.items()}}
    if result.search is not None:
        search = result.search
        summary["search"] = {"runs": len(search.history), "uniform_log_ppl": round(search.uniform_score, 4),
                             "chosen_log_ppl": round(search.score, 4)}
    print(json.dumps(summary, indent=2))
    print(f"saved: {out} (merged, still sparse), {out / ADAPTER_DIR} (peft adapter)"
          + (f", {plot}" if plot else ""), file=sys.stderr)
    return 0
