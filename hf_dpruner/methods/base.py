"""The extension point for pruning methods: a small `PruningMethod` base class and a registry.

A method declares its name, which calibration text it needs, what it measures per decoder block, and its title,
description and citation for the model card; the CLI's ``--method`` choices, `prune_model`, the model card and the
benchmark's method list all read the registry. A new method is one file with a `register_method` class.

Example (a method in a file of its own)::

    from hf_dpruner.methods import PruningMethod, register_method

    @register_method
    class KeepFirstHalf(PruningMethod):
        name = title = "keep-first-half"
        data = "none"

        def prune(self, model, batches, config, *, general_batches=None, disable_tqdm=False):
            ...  # return {parameter name: bool keep-mask}, with the pruned weights set to 0
"""

from __future__ import annotations

import dataclasses
import os
import time
from abc import ABC
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from ..config import DPrunerConfig
from ..data import calibration_batches
from ..masks import sparsity_report
from ..modeling import make_pruned
from ..stages import PruningResult

Batches = Sequence[Mapping[str, torch.Tensor]]
CALIBRATION_CHOICES = ("domain", "general")
_REGISTRY: dict[str, type[PruningMethod]] = {}


class PruningMethod(ABC):
    """One pruning method. Subclasses set the class attributes and implement `prune` (one-shot methods) or
    override `run` (methods that drive training, like D-Pruner).

    Attributes:
        name: the ``--method`` value and the ``method`` recorded in ``pruning_config.json``.
        title: the name shown in model cards and tables.
        description: one or two sentences for the model card.
        citation: the paper, for the model card ("" when there is none).
        data: calibration text needed: ``"none"``, ``"one"`` (the domain text, or the general one with
            ``calibration="general"``) or ``"both"`` (domain and general).
        statistics: what the method measures per decoder block (documentation and the benchmark's notes):
            ``"none"``, ``"input_norms"``, ``"hessian"`` or ``"gradients"``.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    data: ClassVar[Literal["none", "one", "both"]] = "one"
    statistics: ClassVar[Literal["none", "input_norms", "hessian", "gradients"]] = "none"

    def prune(
        self,
        model: torch.nn.Module,
        batches: Batches | None,
        config: DPrunerConfig,
        *,
        general_batches: Batches | None = None,
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Prune `model` in place on calibration `batches` (dicts with ``input_ids``, optionally
        ``attention_mask``; None for ``data="none"``) and, for ``data="both"``, `general_batches`; return the
        keep-masks ``{parameter name: bool tensor}``. Pruned weights are exactly 0 afterwards. Methods that drive
        a training run (D-Pruner) override `run` instead."""
        raise NotImplementedError(f"{self.name!r} does not prune from calibration batches alone: use prune_model().")

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
        """Calibration windows from the texts (``config.num_samples`` of ``config.seq_len`` tokens each), `prune`,
        and the masks attached (`make_pruned`); the D-Pruner-only arguments are ignored here."""
        if calibration not in CALIBRATION_CHOICES:
            raise ValueError(f"calibration must be one of {CALIBRATION_CHOICES}, got {calibration!r}.")
        batches = general_batches = None
        if self.data == "one":
            texts = domain_texts if calibration == "domain" else general_texts
            batches = self.calibration_batches(texts, calibration, model, tokenizer, config, training_args)
        elif self.data == "both":
            batches = self.calibration_batches(domain_texts, "domain", model, tokenizer, config, training_args)
            general_batches = self.calibration_batches(general_texts, "general", model, tokenizer, config,
                                                       training_args)
        start = time.perf_counter()
        masks = self.prune(model, batches, config, general_batches=general_batches,
                           disable_tqdm=training_args.disable_tqdm)
        seconds = {"prune": time.perf_counter() - start}
        count = sum(len(batch["input_ids"]) for batch in batches) if batches else 0
        data = {"none": None, "one": calibration, "both": "domain+general"}[self.data]
        record: dict[str, Any] = {
            "method": self.name,
            "base_model": getattr(model.config, "_name_or_path", None),
            "calibration": {"data": data, "samples": count, "seq_len": config.seq_len},
        }
        increased = getattr(self, "increased_damping", None)
        if increased is not None:  # Hessians that needed more damping than config.damping ({} if none; each logged)
            record["calibration"]["increased_damping"] = dict(increased)
        errors = getattr(self, "block_errors", None)
        if errors:  # relative output error left in each reconstructed block (a per-layer sensitivity)
            record["calibration"]["block_errors"] = {str(i): round(float(e), 6) for i, e in sorted(errors.items())}
        make_pruned(model, masks, config, record)
        return model, PruningResult(masks, sparsity_report(masks), seconds)

    def calibration_batches(
        self,
        texts: Sequence[str] | None,
        which: str,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: DPrunerConfig,
        training_args: TrainingArguments,
    ) -> list[dict[str, torch.Tensor]]:
        """The method's calibration batches from `texts` (the `which` text: "domain" or "general"):
        `config.num_samples` windows of `config.seq_len` tokens, seeded by ``training_args.seed``, in batches of
        ``per_device_train_batch_size`` on the model's device."""
        if not texts:
            raise ValueError(f"{self.name} calibrates on the {which} text, but none was given.")
        return calibration_batches(texts, tokenizer, config.seq_len, config.num_samples,
                                   training_args.per_device_train_batch_size, training_args.seed,
                                   next(model.parameters()).device)


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: add a `PruningMethod` subclass to the registry under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise TypeError(f"register_method takes a PruningMethod subclass, got {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered.")
    if cls.data not in ("none", "one", "both"):
        raise ValueError(f"{cls.__name__}.data must be 'none', 'one' or 'both', got {cls.data!r}.")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"A pruning method named {name!r} is already registered ({existing.__qualname__}).")
    _REGISTRY[name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method from the registry (for tests and plugins that replace one)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered methods, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> PruningMethod:
    """An instance of the registered method `name`; ValueError naming the valid ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown pruning method {name!r}; valid: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]()


def method_card_entry(name: str) -> tuple[str, str, str]:
    """(title, description, citation) of method `name` for a model card; the bare name for unknown ones."""
    cls = _REGISTRY.get(name)
    return (cls.title, cls.description, cls.citation) if cls else (name, "", "")


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
    resume_from_checkpoint: str | bool | None = None,
) -> tuple[PreTrainedModel, PruningResult]:
    """Prune `model` in place with the registered `method`; returns it as a pruned model (masks attached) and the
    `PruningResult`.

    Every method gets the same budget: `config.num_samples` windows of `config.seq_len` tokens of each text it
    uses. Methods that calibrate on one text use the domain text by default (their strongest setting for a domain
    model), the general text with ``calibration="general"``. `general_importance` (a cache file) and
    `resume_from_checkpoint` apply to D-Pruner. ``config.layer_sparsity="owl"`` is resolved here into per-block
    ratios (OWL, measured on the domain windows, or the general ones for ``calibration="general"``), which the
    checkpoint records.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> from hf_dpruner import DPrunerConfig
        >>> from hf_dpruner.methods import prune_model
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> args = TrainingArguments("out", report_to=[], disable_tqdm=True)
        >>> pruned, result = prune_model(model, None, "magnitude", DPrunerConfig(sparsity=0.5), args, None, None)
        >>> round(result.sparsity["overall"], 2)
        0.5
    """
    pruning_method = get_method(method)
    if config.layer_sparsity == "owl":  # per-block ratios measured on the dense model, before any pruning
        from ..layer_ratios import owl_layer_sparsity

        which = "general" if pruning_method.data == "one" and calibration == "general" else "domain"
        texts = general_texts if which == "general" else domain_texts
        batches = pruning_method.calibration_batches(texts, which, model, tokenizer, config, training_args)
        config = dataclasses.replace(
            config, layer_sparsity=owl_layer_sparsity(model, batches, config, training_args.disable_tqdm)
        )
    return pruning_method.run(
        model, tokenizer, config, training_args, general_texts=general_texts, domain_texts=domain_texts,
        calibration=calibration, general_importance=general_importance,
        resume_from_checkpoint=resume_from_checkpoint,
    )
