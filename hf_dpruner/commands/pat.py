"""``hf-dpruner pat``: structured pruning (the one-shot recipe by default, or Pruning-Aware Tuning), exported as a
smaller standard checkpoint."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from ..corpora import DOMAIN_CORPORA
from ..data import load_texts
from ..pat import PAT_CONFIG_NAME, PATConfig, PATTrainer
from .model_args import ModelArguments, load_model


@dataclass
class PATArguments:
    """What to tune and on which data."""

    data: str = field(
        default="medical",
        metadata={"help": f"Training text: a bundled corpus ({', '.join(DOMAIN_CORPORA)}, general), a file/folder or a "
                  "`datasets` name."},
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per training window."})


@dataclass
class PATTrainingArguments(TrainingArguments):
    """TrainingArguments with PAT defaults (AdamW 3e-3, 100 steps, batches of 4, nothing saved mid-way)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where the exported smaller model is written."})
    learning_rate: float = field(
        default=3e-3,
        metadata={"help": "Learning rate of LoRA (and of the HSMs with strategy 'learned'; its mask: 10x). 3e-3 "
                  "measured best for the default recipe and for dense + LoRA (docs/pat.md)."},
    )
    max_steps: int = field(
        default=100, metadata={"help": "Optimizer steps of the tuning (strategy 'learned': the mask is binary after a "
                               "third)."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Windows per batch."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing during tuning."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})


def main(argv: list[str]) -> int:
    parser = HfArgumentParser((PATConfig, ModelArguments, PATArguments, PATTrainingArguments), prog="hf-dpruner pat")
    config, model_args, pat_args, training_args = parser.parse_args_into_dataclasses(argv)
    if not training_args.output_dir:
        parser.error("--output-dir is required.")
    if os.path.isfile(training_args.output_dir):
        parser.error(f"--output-dir {training_args.output_dir} is a file, not a folder: choose a folder path.")
    if training_args.max_steps <= 0:
        parser.error("--max-steps must be > 0: the mask schedule is laid out over a known number of steps.")
    model, tokenizer = load_model(model_args)
    args = training_args
    windows = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    trainer = PATTrainer(
        model=model, args=training_args, pat_config=config, train_dataset=load_texts(pat_args.data),
        processing_class=tokenizer, seq_len=pat_args.seq_len, num_samples=windows,
    )
    trainer.data_source = pat_args.data
    trainer.train()
    small = trainer.export(record={"base_model": model_args.name})
    record = json.loads((Path(training_args.output_dir) / PAT_CONFIG_NAME).read_text())
    print(json.dumps(record["export"], indent=2))
    size = "intermediate_size" if config.axis == "neurons" else "hidden_size"
    print(f"saved: {training_args.output_dir} ({size} {getattr(small.config, size)})", file=sys.stderr)
    return 0
