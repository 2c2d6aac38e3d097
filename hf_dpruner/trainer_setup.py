"""What `DPrunerTrainer` and `PATTrainer` share before `Trainer.__init__`: the model is required (no
``model_init``: they act on one model), training text in any supported form is cut into token windows, and
the collator pads and masks them for causal LM training."""

from __future__ import annotations

from typing import Any

from .data import CausalLMCollator, describe_source, prepare_calibration_dataset


def calibration_trainer_inputs(
    trainer_name: str,
    model: Any,
    args: Any,
    data_collator: Any,
    train_dataset: Any,
    processing_class: Any,
    seq_len: int,
    num_samples: int,
    what: str,
) -> tuple[Any, Any, str | None]:
    """``(train_dataset as windows, data_collator, description of the data source)`` for a trainer of this package.

    `train_dataset` may be a tokenized `Dataset` (``input_ids``), a `Dataset` with a ``text`` column, a list of
    strings, a file/folder path or a bundled corpus name; it becomes `num_samples` windows of `seq_len` tokens
    (seeded by ``args.seed``). `what` names the data in errors."""
    if model is None:
        raise ValueError(f"{trainer_name} needs `model=` (model_init is not supported: it acts on one model).")
    source = describe_source(train_dataset)
    if train_dataset is not None:
        seed = args.seed if args is not None else 42
        train_dataset = prepare_calibration_dataset(train_dataset, processing_class, seq_len, num_samples, seed, what)
    if data_collator is None:
        data_collator = CausalLMCollator(getattr(processing_class, "pad_token_id", None))
    return train_dataset, data_collator, source
