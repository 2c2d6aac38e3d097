"""D-Pruner (Zhang et al. 2024): general importance, a regularized domain pass, domain importance, masks — run by
`DPrunerTrainer`."""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from ..config import DPrunerConfig
from ..stages import PruningResult
from ..trainer import DPrunerTrainer
from .base import PruningMethod, register_method


@register_method
class DPruner(PruningMethod):
    name = "dpruner"
    title = "D-Pruner"
    description = (
        "D-Pruner scores the general importance of every weight on open-domain text (OBS saliency), refines the "
        "training loss with a regularizer that keeps generally important weights near their values, scores the "
        "domain importance of every weight from the gradients of that loss on domain text, and keeps the most "
        "important weights."
    )
    citation = (
        "Nan Zhang, Yanchi Liu, Xujiang Zhao, Wei Cheng, Runxue Bao, Rui Zhang, Prasenjit Mitra, Haifeng Chen. "
        "*Pruning as a Domain-specific LLM Extractor*. Findings of NAACL 2024. arXiv:2405.06275."
    )
    data = "both"
    statistics = "gradients"

    def run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: DPrunerConfig,
        training_args: TrainingArguments,
        *,
        general_texts: Sequence[str] | None,
        domain_texts: Sequence[str] | None,
        calibration: str = "domain",
        general_importance: str | os.PathLike | None = None,
        resume_from_checkpoint: str | bool | None = None,
    ) -> tuple[PreTrainedModel, PruningResult]:
        """The whole recipe through `DPrunerTrainer.prune` (`calibration` does not apply: D-Pruner uses both)."""
        trainer = DPrunerTrainer(
            model=model, args=training_args, dpruner_config=config, train_dataset=domain_texts,
            general_dataset=general_texts, processing_class=tokenizer, general_importance=general_importance,
        )
        return trainer.model, trainer.prune(resume_from_checkpoint)
