"""DPrunerTrainer and PATTrainer keep transformers.Trainer's positional arguments in order; their own are
keyword-only."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer

from hf_dpruner import DPrunerTrainer
from hf_dpruner.pat import PATTrainer

TRAINER_POSITIONAL = ["model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class"]


@pytest.mark.parametrize("cls, own", [(DPrunerTrainer, {"dpruner_config", "general_dataset", "general_importance"}),
                                      (PATTrainer, {"pat_config", "seq_len", "num_samples"})])
def test_positional_order_is_the_trainers_and_new_arguments_are_keyword_only(cls, own):
    params = inspect.signature(cls.__init__).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD][1:]
    assert positional == TRAINER_POSITIONAL
    assert positional == list(inspect.signature(Trainer.__init__).parameters)[1:len(positional) + 1]
    assert {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY} == own


@pytest.mark.parametrize("cls", [DPrunerTrainer, PATTrainer])
def test_a_missing_model_is_a_clear_error(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__} needs `model=`"):
        cls()
