"""`DPrunerTrainer`: a `transformers.Trainer` that drives D-Pruner's three stages (`hf_dpruner.stages`) and keeps
the masks. The trainer holds the `Trainer` parts: the regularized loss, the domain pass (a fine-tune or a score
pass), its checkpoints and resume."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.utils import logging

from .callbacks import DomainImportanceCallback, KeepMasksCallback
from .config import DPrunerConfig
from .data import describe_source, prepare_calibration_dataset
from .distributed import all_reduce_sum_, shard, world
from .fingerprint import model_fingerprint, windows_fingerprint
from .importance import save_importance
from .importance.domain import raise_missing_gradients
from .masks import sparsity_report
from .resume import ResumableDomainPass, last_complete_checkpoint
from .stages import (
    DomainImportanceStage,
    GeneralImportanceStage,
    PruningResult,
    PruningState,
    SelectMasksStage,
    run_stages,
)
from .step_penalty import add_step_penalty, loss_is_scaled_for_ga
from .targets import find_prunable_weights
from .trainer_saving import PrunedCheckpointSaving
from .trainer_setup import calibration_trainer_inputs

logger = logging.get_logger(__name__)


def _state_attribute(name: str, doc: str) -> property:
    """A trainer attribute that reads and writes the field `name` of the trainer's `PruningState`."""
    return property(lambda self: getattr(self.pruning_state, name),
                    lambda self, value: setattr(self.pruning_state, name, value), doc=doc)


class DPrunerTrainer(PrunedCheckpointSaving, ResumableDomainPass, Trainer):
    """Trainer whose loss adds ``λ · Σ G ⊙ (W − W₀)²`` and whose `prune()` runs D-Pruner end to end.

    Args:
        dpruner_config: the recipe (`DPrunerConfig()` if omitted).
        train_dataset: domain calibration data: a tokenized `Dataset` (``input_ids``), a `Dataset` with a
            ``text`` column, a list of strings, a file/folder path or a bundled corpus name.
        general_dataset: open-domain calibration data, same forms; needed unless `general_importance` is given.
        general_importance: precomputed G (dict), or a safetensors path: loaded if it exists, else computed and
            written there for reuse with other domains.
        Other arguments are those of `transformers.Trainer`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> from datasets import Dataset
        >>> from hf_dpruner import DPrunerConfig, DPrunerTrainer
        >>> windows = Dataset.from_dict({"input_ids": [list(range(i, i + 16)) for i in range(8)]})  # or text
        >>> trainer = DPrunerTrainer(
        ...     model=model, args=TrainingArguments("out", per_device_train_batch_size=2, num_train_epochs=1,
        ...                                         report_to=[], disable_tqdm=True, save_strategy="no"),
        ...     dpruner_config=DPrunerConfig(sparsity=0.5, num_samples=4, seq_len=16),
        ...     train_dataset=windows, general_dataset=windows)
        >>> result = trainer.prune()  # general importance -> regularized domain pass -> masks; logs the pass
        {...'train_loss'...}
        >>> round(result.sparsity["overall"], 2)
        0.5
    """

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *trainer_args,
        dpruner_config: DPrunerConfig | None = None,
        general_dataset=None,
        general_importance: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
        **kwargs,
    ) -> None:
        self.dpruner_config = dpruner_config if dpruner_config is not None else DPrunerConfig()
        cfg = self.dpruner_config
        prunable = find_prunable_weights(model, cfg.target_modules) if model is not None else {}  # fail fast
        train_dataset, data_collator, domain_source = calibration_trainer_inputs(
            "DPrunerTrainer", model, args, data_collator, train_dataset, processing_class, cfg.seq_len,
            cfg.num_samples, "domain data (train_dataset)",
        )
        self.data_sources = {"general_data": describe_source(general_dataset), "domain_data": domain_source}
        if general_dataset is not None:
            seed = args.seed if args is not None else 42
            general_dataset = prepare_calibration_dataset(
                general_dataset, processing_class, cfg.seq_len, cfg.num_samples, seed, "general data"
            )
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *trainer_args,
                         **kwargs)
        self.general_dataset = general_dataset
        self.prunable = prunable
        self.fingerprints = {
            "model": model_fingerprint(model),
            "general_data": windows_fingerprint(general_dataset),
            "domain_data": windows_fingerprint(train_dataset),
        }
        self.general_importance_path = None
        self.pruning_state = PruningState(self.model, prunable, cfg)  # G, S, masks: what the stages share
        if isinstance(general_importance, (str, os.PathLike)):
            self.general_importance_path = Path(general_importance)
            if self.general_importance_path.exists():
                self.general_importance = self._load_general_cache(self.general_importance_path)
        elif general_importance is not None:
            self.general_importance = self.pruning_state.store_importance(dict(general_importance))
        self.add_callback(KeepMasksCallback())

    # ---- the refined loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """LM loss plus the general-importance regularizer, counted once per optimizer step (see
        `add_step_penalty`). The penalty enters the loss as a value; its gradient ``2λ·G·(W − W₀)`` is added to
        each weight's gradient as backward produces it (`GeneralImportanceRegularizer.arm_gradient`)."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        regularizer = self.regularizer
        if regularizer is not None and regularizer.lam > 0 and model.training:
            loss = add_step_penalty(self, loss, self._penalty_with_gradient_hooks, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _loss_scale(self) -> float:
        """The factor that backward's gradients carry: fp16's loss scale, else 1."""
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler.get_scale() if scaler is not None else 1.0

    def _penalty_with_gradient_hooks(self) -> torch.Tensor:
        self.regularizer.arm_gradient(self._loss_scale())  # the LM gradients it joins are loss-scaled too
        return self.regularizer.value()

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            if self.regularizer is not None:
                self.regularizer.disarm()

    # ---- the shared state, as attributes ----

    general_importance = _state_attribute("general_importance", "G, `{parameter name: tensor}` (stage 1).")
    increased_damping = _state_attribute(
        "increased_damping", "{parameter name: damping used} for the stage-1 Hessians that needed more than "
        "`damping`; None when unknown or when no Hessian was factorised.")
    regularizer = _state_attribute("regularizer", "The general-importance regularizer of the domain pass (stage 2).")
    domain_importance = _state_attribute("domain_importance", "S, accumulated over the domain pass (stage 2).")

    # ---- the three stages ----

    def _calibration_batches(self, dataset: Dataset) -> list[dict[str, torch.Tensor]]:
        """This process's share of the batches (all of them in a single process)."""
        loader = DataLoader(dataset, batch_size=self.args.per_device_train_batch_size, collate_fn=self.data_collator)
        return [self._prepare_inputs(batch) for batch in shard(list(loader))]

    def _check_even_domain_shards(self) -> None:
        """Several processes must split the domain windows evenly: accelerate pads a short last batch with
        repeated windows, which would count them twice in S."""
        per_step = self.args.per_device_train_batch_size * self.accelerator.num_processes
        if self.accelerator.num_processes > 1 and len(self.train_dataset) % per_step:
            raise ValueError(
                f"{len(self.train_dataset)} domain windows do not split evenly into batches of "
                f"{self.args.per_device_train_batch_size} on {self.accelerator.num_processes} processes; set "
                f"num_samples to a multiple of {per_step}."
            )

    def general_importance_stage(self) -> GeneralImportanceStage:
        """Stage 1 on this trainer's general data, writing the `general_importance` cache when a path was given."""
        if self.general_importance is None and self.general_dataset is None:
            raise ValueError("Stage 1 needs open-domain text: pass `general_dataset=` or `general_importance=`.")
        return GeneralImportanceStage(
            batches=lambda: self._calibration_batches(self.general_dataset), disable_tqdm=self.args.disable_tqdm,
            on_computed=self._write_general_cache,
        )

    def _write_general_cache(self, state: PruningState) -> None:
        if self.general_importance_path is None or not self.args.should_save:
            return
        cfg = self.dpruner_config
        description = {"estimator": cfg.general_estimator, "num_samples": len(self.general_dataset),
                       "seq_len": cfg.seq_len}
        if state.increased_damping is not None:
            description["increased_damping"] = state.increased_damping
        save_importance(state.general_importance, self.general_importance_path, description,
                        self.general_fingerprint())

    def domain_importance_stage(self, resume_from_checkpoint: str | bool | None = None) -> DomainImportanceStage:
        """Stage 2 over this trainer's domain data: `Trainer.train` for the ``finetune`` pass (resumable from a
        checkpoint folder, or True for the newest complete one in ``args.output_dir``), the score pass otherwise."""
        if self.train_dataset is None:
            raise ValueError("Stage 2 needs domain text: pass `train_dataset=` (the domain calibration data).")
        finetune = self.dpruner_config.domain_pass == "finetune"
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete domain-pass checkpoint in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint and not finetune:
            raise ValueError("The 'score' domain pass writes no checkpoints; resume_from_checkpoint needs 'finetune'.")
        self._check_even_domain_shards()

        def run_pass(state: PruningState) -> None:
            if not finetune:
                return self._score_domain()
            callback = DomainImportanceCallback(state.domain_importance)
            self.add_callback(callback)
            try:
                self.train(resume_from_checkpoint=resume_from_checkpoint or None)
            finally:
                self.remove_callback(callback)

        return DomainImportanceStage(run_pass=run_pass, learning_rate=self.args.learning_rate, seed=self.args.seed)

    def select_masks_stage(self) -> SelectMasksStage:
        """Stage 3, recording this run's method, base model and calibration data in ``pruning_config.json``."""
        record = {
            "method": "dpruner",
            "base_model": getattr(self.model.config, "_name_or_path", None),
            "calibration": {
                "general_samples": len(self.general_dataset) if self.general_dataset is not None else None,
                "domain_samples": len(self.train_dataset),
                "seq_len": self.dpruner_config.seq_len,
                **{key: name for key, name in self.data_sources.items() if name is not None},
            },
        }
        return SelectMasksStage(record=record, disable_tqdm=self.args.disable_tqdm)

    def compute_general_importance(self) -> dict[str, torch.Tensor]:
        """Stage 1: G on the general data (cached to `general_importance` path if one was given)."""
        if self.general_importance is None:
            run_stages([self.general_importance_stage()], self.pruning_state)
        return self.general_importance

    def compute_domain_importance(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, torch.Tensor]:
        """Stage 2 (after stage 1 if G is not there yet): S from the gradients of the regularized loss on the
        domain data.

        `resume_from_checkpoint` (the ``finetune`` pass only): a checkpoint folder written during an earlier run of
        the same pass, or True for the newest complete one in ``args.output_dir``; S and its step count are restored
        with the Trainer's state, and the run's fingerprint must match the checkpoint's."""
        stage = self.domain_importance_stage(resume_from_checkpoint)
        self.compute_general_importance()
        run_stages([stage], self.pruning_state)
        return self.domain_importance.scores

    def _score_domain(self) -> None:
        """Score-only pass: one term of S per optimizer step, from the step's gradient at W₀ refined with the
        regularizer's look-ahead gradient, as the ``finetune`` pass gets one per optimizer step.

        A step's gradient is the sum of its micro-batch gradients, each loss normalised as `training_step` does
        (over the step's tokens, or divided by the accumulation steps), so gradient accumulation does not change S.
        The other parameters are frozen for the pass. Micro-batch gradients accumulate in the targets' ``.grad``;
        on a step's last micro-batch a hook folds each target's gradient into S as soon as backward has completed
        it, then frees it: at most one gradient per target exists, and only one at a time without accumulation.
        The model is not wrapped for data parallelism here: under several processes each one runs its share of
        every step, and the targets' gradients are averaged over processes (as DDP would) and folded in at the end
        of the step, so every process builds the same S."""
        model, lr = self.model, self.args.learning_rate
        importance, regularizer = self.domain_importance, self.regularizer
        names = {id(w.weight): name for name, w in self.prunable.items()}
        num_processes = world()[1]
        seen: set[str] = set()
        fold_in_hook = False  # set on the last micro-batch of a step, in a single process

        def fold(name: str, param: torch.Tensor) -> None:
            scale = self._loss_scale()
            grad = param.grad if scale == 1.0 else param.grad.float() / scale
            importance.add(name, regularizer.lookahead_gradient(name, grad, lr))
            param.grad = None

        def on_gradient(param: torch.Tensor) -> None:
            name = names[id(param)]
            seen.add(name)
            if fold_in_hook:
                fold(name, param)

        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in names]
        no_grad = [name for name, w in self.prunable.items() if not w.weight.requires_grad]
        if no_grad:
            raise_missing_gradients(no_grad)
        hooks = [w.weight.register_post_accumulate_grad_hook(on_gradient) for w in self.prunable.values()]
        model.eval()
        try:
            for p in frozen:
                p.requires_grad_(False)
            model.zero_grad(set_to_none=True)
            loader = self.get_train_dataloader()
            accumulation = self.args.gradient_accumulation_steps
            micro_batches = iter(loader)
            num_steps = math.ceil(len(loader) / accumulation)
            for _ in tqdm(range(num_steps), desc="domain importance", disable=self.args.disable_tqdm):
                step_batches, num_items = self.get_batch_samples(micro_batches, accumulation, self.args.device)
                self.current_gradient_accumulation_steps = len(step_batches)
                seen.clear()
                for i, batch in enumerate(step_batches):
                    fold_in_hook = num_processes == 1 and i == len(step_batches) - 1
                    with self.compute_loss_context_manager():
                        loss = super().compute_loss(model, self._prepare_inputs(batch), num_items_in_batch=num_items)
                    if not loss_is_scaled_for_ga(self, num_items):
                        loss = loss / len(step_batches)
                    self.accelerator.backward(loss)
                if len(seen) < len(names):
                    raise_missing_gradients(sorted(set(self.prunable) - seen))
                if num_processes > 1:
                    for name, w in self.prunable.items():
                        all_reduce_sum_([w.weight.grad])
                        w.weight.grad.div_(num_processes)
                        fold(name, w.weight)
                importance.num_updates += 1
        finally:
            for hook in hooks:
                hook.remove()
            model.zero_grad(set_to_none=True)  # an interrupted step leaves no gradients behind
            for p in frozen:
                p.requires_grad_(True)

    def prune(self, resume_from_checkpoint: str | bool | None = None) -> PruningResult:
        """Run general importance -> regularized domain pass -> masks, and make `self.model` a pruned model.

        `resume_from_checkpoint` continues an interrupted ``finetune`` domain pass (see
        `compute_domain_importance`); with a `general_importance` cache path, stage 1 is not recomputed either."""
        stages = [  # built first, so that bad data or a bad resume folder fail before any work
            self.general_importance_stage(),
            self.domain_importance_stage(resume_from_checkpoint),
            self.select_masks_stage(),
        ]
        state = run_stages(stages, self.pruning_state)
        self.optimizer, self.lr_scheduler = None, None  # the domain pass's Adam moments must not revive weights
        steps = state.domain_importance.num_updates
        return PruningResult(state.masks, sparsity_report(state.masks), dict(state.seconds), steps)
