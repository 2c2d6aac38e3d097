"""One entry point for every pruning method (D-Pruner and the peer baselines) on the same calibration budget."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from .baselines import BASELINE_METHODS, prune_baseline
from .config import DPrunerConfig
from .data import CausalLMCollator, build_windows
from .masks import sparsity_report
from .modeling import make_pruned
from .trainer import DPrunerTrainer, PruningResult

METHODS = ("dpruner", *BASELINE_METHODS)
CALIBRATION_CHOICES = ("domain", "general")


def prune_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    method: str,
    config: DPrunerConfig,
    training_args: TrainingArguments,
    general_texts: Sequence[str] | None,
    domain_texts: Sequence[str] | None,
    calibration: str = "domain",
    general_importance: str | os.PathLike | None = None,
    resume_from_checkpoint: str | None = None,
) -> tuple[PreTrainedModel, PruningResult]:
    """Prune `model` in place with `method` and return it as a pruned model (masks attached) with the result.

    D-Pruner uses both texts (`config.num_samples` windows of `config.seq_len` tokens each). The baselines
    calibrate on the same number of windows of one of them: the domain text by default (their strongest
    setting for a domain model), the general text with ``calibration="general"``. `resume_from_checkpoint`
    continues an interrupted D-Pruner domain pass.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: {', '.join(METHODS)}.")
    if method == "dpruner":
        trainer = DPrunerTrainer(
            model=model,
            args=training_args,
            dpruner_config=config,
            train_dataset=domain_texts,
            general_dataset=general_texts,
            processing_class=tokenizer,
            general_importance=general_importance,
        )
        return trainer.model, trainer.prune(resume_from_checkpoint)
    if calibration not in CALIBRATION_CHOICES:
        raise ValueError(f"calibration must be one of {CALIBRATION_CHOICES}, got {calibration!r}.")
    texts = domain_texts if calibration == "domain" else general_texts
    batches = None
    if method != "magnitude":
        if not texts:
            raise ValueError(f"{method} calibrates on the {calibration} text, but none was given.")
        windows = build_windows(texts, tokenizer, config.seq_len, config.num_samples, training_args.seed)
        loader = DataLoader(windows, batch_size=training_args.per_device_train_batch_size,
                            collate_fn=CausalLMCollator(tokenizer.pad_token_id))
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in batch.items()} for batch in loader]
    start = time.perf_counter()
    masks = prune_baseline(model, method, batches, config, disable_tqdm=training_args.disable_tqdm)
    seconds = {"prune": time.perf_counter() - start}
    num_windows = sum(len(batch["input_ids"]) for batch in batches) if batches else 0
    record = {
        "method": method,
        "base_model": getattr(model.config, "_name_or_path", None),
        "calibration": {"data": calibration if batches else None, "samples": num_windows, "seq_len": config.seq_len},
    }
    make_pruned(model, masks, config, record)
    return model, PruningResult(masks, sparsity_report(masks), seconds)
