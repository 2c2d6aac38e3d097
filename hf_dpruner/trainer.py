"""`DPrunerTrainer`: a `transformers.Trainer` that runs D-Pruner's three stages and keeps the masks."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.utils import logging

from .callbacks import DomainImportanceCallback, KeepMasksCallback
from .config import DPrunerConfig
from .data import describe_source, prepare_calibration_dataset
from .distributed import all_reduce_sum_, broadcast_from_main_, shard, world
from .fingerprint import model_fingerprint, windows_fingerprint
from .importance import DomainImportance, OBSImportance, general_scorer, save_importance
from .importance.domain import raise_missing_gradients
from .masks import compute_masks, sparsity_report
from .modeling import make_pruned
from .regularizer import GeneralImportanceRegularizer
from .resume import ResumableDomainPass, last_complete_checkpoint
from .step_penalty import add_step_penalty, loss_is_scaled_for_ga
from .targets import find_prunable_weights
from .trainer_saving import PrunedCheckpointSaving
from .trainer_setup import calibration_trainer_inputs

logger = logging.get_logger(__name__)


@dataclass
class PruningResult:
    """What `DPrunerTrainer.prune` produced."""

    masks: dict[str, torch.Tensor]
    sparsity: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    domain_steps: int = 0


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
        self.general_importance: dict[str, torch.Tensor] | None = None
        # {parameter name: damping used} for the Hessians of stage 1 that needed more than cfg.damping; None when
        # unknown (G given as a dict, or read from a cache that does not say) or when no Hessian was factorised
        self.increased_damping: dict[str, float] | None = None
        if isinstance(general_importance, (str, os.PathLike)):
            self.general_importance_path = Path(general_importance)
            if self.general_importance_path.exists():
                self.general_importance = self._load_general_cache(self.general_importance_path)
        elif general_importance is not None:
            self.general_importance = self._store_importance(dict(general_importance))
        self.regularizer: GeneralImportanceRegularizer | None = None
        self.domain_importance: DomainImportance | None = None
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

    def _importance_storage(self) -> tuple[torch.dtype, torch.device | None]:
        """Dtype and device of the importance buffers (None: each weight's own device)."""
        cfg = self.dpruner_config
        return getattr(torch, cfg.importance_dtype), (torch.device("cpu") if cfg.offload_importance else None)

    def _store_importance(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`scores` cast to the importance dtype and device in place, one matrix at a time (never two full copies)."""
        dtype, device = self._importance_storage()
        for name in list(scores):
            target = device if device is not None else self.prunable[name].weight.device
            scores[name] = scores[name].to(target, dtype)
        return scores

    def compute_general_importance(self) -> dict[str, torch.Tensor]:
        """Stage 1: G on the general data (cached to `general_importance` path if one was given)."""
        if self.general_importance is not None:
            return self.general_importance
        if self.general_dataset is None:
            raise ValueError("Stage 1 needs open-domain text: pass `general_dataset=` or `general_importance=`.")
        cfg = self.dpruner_config
        scorer = general_scorer(cfg.general_estimator, cfg.damping)
        batches = self._calibration_batches(self.general_dataset)
        scores = scorer.score(self.model, self.prunable, batches, disable_tqdm=self.args.disable_tqdm)
        self.increased_damping = scorer.increased_damping if isinstance(scorer, OBSImportance) else None
        self.general_importance = self._store_importance(scores)
        if self.general_importance_path is not None and self.args.should_save:
            description = {"estimator": cfg.general_estimator, "num_samples": len(self.general_dataset),
                           "seq_len": cfg.seq_len}
            if self.increased_damping is not None:
                description["increased_damping"] = self.increased_damping
            save_importance(
                self.general_importance, self.general_importance_path, description, self.general_fingerprint()
            )
        return self.general_importance

    def compute_domain_importance(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, torch.Tensor]:
        """Stage 2: S from the gradients of the regularized loss on the domain data.

        `resume_from_checkpoint` (the ``finetune`` pass only): a checkpoint folder written during an earlier run of
        the same pass, or True for the newest complete one in ``args.output_dir``; S and its step count are restored
        with the Trainer's state, and the run's fingerprint must match the checkpoint's."""
        if self.train_dataset is None:
            raise ValueError("Stage 2 needs domain text: pass `train_dataset=` (the domain calibration data).")
        cfg = self.dpruner_config
        finetune = cfg.domain_pass == "finetune"
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete domain-pass checkpoint in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint and not finetune:
            raise ValueError("The 'score' domain pass writes no checkpoints; resume_from_checkpoint needs 'finetune'.")
        bound = None
        if finetune and cfg.clamp_general_importance:
            bound = GeneralImportanceRegularizer.sgd_stable_bound(cfg.regularization_lambda, self.args.learning_rate)
        dtype, device = self._importance_storage()
        self.regularizer = GeneralImportanceRegularizer(
            self.prunable, self.compute_general_importance(), cfg.regularization_lambda, bound,
            keep_reference=finetune, storage_device=device,
        )
        self._check_even_domain_shards()
        self.domain_importance = DomainImportance(self.prunable, cfg.domain_score, dtype, device, self.args.seed)
        if finetune and cfg.apply_masks_to == "original":
            # the fine-tune moves every trainable parameter; the targets' W0 is already held by the regularizer
            self._other_reference = {
                name: p.detach().to(device if device is not None else p.device, copy=True)
                for name, p in self.model.named_parameters()
                if p.requires_grad and name not in self.prunable
            }
        if finetune:
            callback = DomainImportanceCallback(self.domain_importance)
            self.add_callback(callback)
            try:
                self.train(resume_from_checkpoint=resume_from_checkpoint or None)
            finally:
                self.remove_callback(callback)
        else:
            self._score_domain()
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

    @torch.no_grad()
    def _restore_original_weights(self) -> None:
        self.regularizer.restore()
        params = dict(self.model.named_parameters())
        for name, value in getattr(self, "_other_reference", {}).items():
            params[name].copy_(value)
        self._other_reference = {}

    def prune(self, resume_from_checkpoint: str | bool | None = None) -> PruningResult:
        """Run general importance -> regularized domain pass -> masks, and make `self.model` a pruned model.

        `resume_from_checkpoint` continues an interrupted ``finetune`` domain pass (see
        `compute_domain_importance`); with a `general_importance` cache path, stage 1 is not recomputed either."""
        cfg = self.dpruner_config
        self._check_even_domain_shards()  # before stage 1, so that a bad split costs nothing
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        self.compute_general_importance()
        seconds["general_importance"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = self.compute_domain_importance(resume_from_checkpoint)
        seconds["domain_importance"] = time.perf_counter() - start
        start = time.perf_counter()
        masks = compute_masks(scores, self.prunable, cfg, disable_tqdm=self.args.disable_tqdm)
        broadcast_from_main_(masks)  # equal on every rank already, up to rounding; make them identical
        if cfg.apply_masks_to == "original":
            self._restore_original_weights()
        record = {
            "method": "dpruner",
            "base_model": getattr(self.model.config, "_name_or_path", None),
            "calibration": {
                "general_samples": len(self.general_dataset) if self.general_dataset is not None else None,
                "domain_samples": len(self.train_dataset),
                "seq_len": cfg.seq_len,
                "domain_steps": self.domain_importance.num_updates,
                **{key: name for key, name in self.data_sources.items() if name is not None},
            },
        }
        if self.increased_damping is not None:  # {} when every Hessian factorised with cfg.damping
            record["calibration"]["increased_damping"] = dict(self.increased_damping)
        make_pruned(self.model, masks, cfg, record, apply=True)
        seconds["masks"] = time.perf_counter() - start
        self.regularizer = None  # the pruned model is trained with the plain LM loss from here on
        self.optimizer, self.lr_scheduler = None, None  # the domain pass's Adam moments must not revive weights
        return PruningResult(masks, sparsity_report(masks), seconds, self.domain_importance.num_updates)
