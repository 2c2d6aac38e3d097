"""`PATTrainer`: a `transformers.Trainer` whose loss adds PAT's channel-count and Identity losses."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from ..corpora import load_corpus_texts
from ..data import build_windows
from ..distillation import distillation_loss, mix_distillation
from ..step_penalty import add_step_penalty
from ..trainer_setup import calibration_trainer_inputs
from .channel_importance import activation_channel_importance, logits_from_importance, taylor_channel_importance
from .config import PATConfig
from .export import export_one_shot_model, export_pat_model
from .modules import check_supported, get_pat_model, get_pat_modules, lora_model
from .neuron_pruning import mlp_statistics, neuron_scores
from .one_shot_neurons import prune_and_reconstruct

logger = logging.get_logger(__name__)

PAT_STATE_NAME = "pat_modules.safetensors"


class PATTrainer(Trainer):
    """Trainer for structured pruning; `export()` writes the smaller standard checkpoint.

    With the default ``PATConfig()`` (``axis="neurons", strategy="one-shot"``, the best recipe measured) there is
    no mask: `train` first replaces the model by a smaller one (`prune_and_reconstruct`: OBS neurons, block
    reconstruction toward the dense model), then tunes its LoRA adapters with the plain LM loss.

    With ``strategy="learned"`` (Pruning-Aware Tuning) the model is prepared with `get_pat_model` unless it already
    was. Before every forward the mask moves along its schedule (step ``global_step`` of ``max_steps``); once per
    optimizer step the loss adds ``active_loss_weight · |N_target − N_open| / d + identity_loss_weight ·
    Σ ‖A Aᵀ − I‖²``. The mask logits get their own learning rate (``mask_learning_rate``).

    Args:
        pat_config: the recipe (`PATConfig()`, the one-shot recipe, if omitted).
        train_dataset: a tokenized `Dataset` (``input_ids``), a `Dataset` with a ``text`` column, a list of strings,
            a file/folder path or a bundled corpus name; text is cut into `num_samples` windows of `seq_len` tokens.
        Other arguments are those of `transformers.Trainer`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> from datasets import Dataset
        >>> from hf_dpruner.pat import PATConfig, PATTrainer
        >>> data = Dataset.from_dict({"input_ids": [list(range(i, i + 16)) for i in range(8)]})
        >>> args = TrainingArguments("out", max_steps=4, per_device_train_batch_size=2, report_to=[],
        ...                          disable_tqdm=True, save_strategy="no")
        >>> trainer = PATTrainer(model=model, args=args, pat_config=PATConfig(axis="hidden", strategy="learned"),
        ...                      train_dataset=data)
        >>> _ = trainer.train()  # logs the run's metrics
        {...'train_loss'...}
        >>> small = trainer.export("small")  # a standard checkpoint with a smaller hidden size
        >>> small.config.hidden_size
        24
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
        pat_config: PATConfig | None = None,
        seq_len: int = 256,
        num_samples: int = 1024,
        **kwargs,
    ) -> None:
        train_dataset, data_collator, self.data_source = calibration_trainer_inputs(
            "PATTrainer", model, args, data_collator, train_dataset, processing_class, seq_len, num_samples,
            "training data (train_dataset)",
        )
        existing = get_pat_modules(model, required=False)
        if existing is not None and pat_config is not None and existing.config != pat_config:
            raise ValueError("The model was prepared with a different PATConfig; pass that one or none.")
        self.pat_config = existing.config if existing is not None else (pat_config or PATConfig())
        self.pat = None
        self._dense: dict[str, int] | None = None  # strategy 'one-shot': the dense sizes, once pruned
        if self.pat_config.strategy == "one-shot":
            if existing is not None or isinstance(model, PeftModel):
                raise ValueError("strategy='one-shot' prunes a plain transformers model: pass the base model, not "
                                 "one prepared with get_pat_model or wrapped by peft.")
            check_supported(model)
        elif existing is None:
            # seeded as the Trainer seeds, but before the adapters and HSMs are created: the same seed gives the
            # same initialisation whatever ran before in the process
            set_seed(args.seed if args is not None else TrainingArguments.seed)
            model = get_pat_model(model, self.pat_config)
        if self.pat_config.strategy == "learned":
            self.pat = get_pat_modules(model)
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *trainer_args,
                         **kwargs)
        self._pat_terms: dict[str, float] = {}
        self.channel_importance: torch.Tensor | None = None  # what `mask_init` measured, once `train` has started
        self._mask_initialized = False

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, after the mask logits are initialised from `mask_init` (not when resuming: the
        checkpoint holds them); with strategy 'one-shot', after `prune_one_shot`."""
        if self.pat is None:
            if resume_from_checkpoint:
                raise ValueError("A strategy='one-shot' run cannot resume: its checkpoints hold the LoRA of a model "
                                 "pruned during the run. Start it again without resume_from_checkpoint.")
            if self._dense is None:
                self.prune_one_shot()
        elif not resume_from_checkpoint and not self._mask_initialized:
            self.initialize_mask()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _collated(self, windows) -> list[dict[str, torch.Tensor]]:
        loader = DataLoader(windows, batch_size=self.args.per_device_train_batch_size, collate_fn=self.data_collator)
        return [self._prepare_inputs(batch) for batch in loader]

    def _first_windows(self, count: int) -> list[dict[str, torch.Tensor]]:
        return self._collated(self.train_dataset.select(range(min(count, len(self.train_dataset)))))

    def prune_one_shot(self) -> PreTrainedModel:
        """Strategy 'one-shot': replace the dense model by `prune_and_reconstruct`'s smaller one (OBS on the first
        ``mask_init_samples`` training windows; reconstruction on the first ``reconstruction_samples`` and
        ``reconstruction_general_samples`` windows of the bundled general corpus), with LoRA adapters; returns the
        smaller model."""
        cfg = self.pat_config
        dense = self.model
        size = dense.config.intermediate_size
        removed = size - cfg.kept_channels(size)
        if removed < 1:
            raise ValueError(f"pruning_ratio {cfg.pruning_ratio} removes no neuron of {size}: raise it.")
        reconstruction = self._first_windows(cfg.reconstruction_samples)
        if cfg.reconstruction_general_samples:
            if self.processing_class is None:
                raise ValueError("strategy='one-shot' reconstructs on reconstruction_general_samples windows of the "
                                 "bundled general corpus, which needs the tokenizer: pass processing_class=tokenizer, "
                                 "or set reconstruction_general_samples=0.")
            seq_len = len(self.train_dataset[0]["input_ids"])
            general = build_windows(load_corpus_texts("general"), self.processing_class, seq_len,
                                    cfg.reconstruction_general_samples, self.args.seed)
            reconstruction += self._collated(general)
        small = prune_and_reconstruct(dense, removed, self._first_windows(cfg.mask_init_samples), reconstruction,
                                      epochs=cfg.reconstruction_epochs, lr=cfg.reconstruction_learning_rate,
                                      seed=self.args.seed, disable_tqdm=self.args.disable_tqdm)
        self._dense = {"intermediate_size": size, "parameters": dense.num_parameters()}
        set_seed(self.args.seed)  # the adapters' initialisation follows the run's seed
        self.model = self.model_wrapped = lora_model(small, cfg)
        logger.info(f"PAT one-shot: intermediate_size {size} -> {small.config.intermediate_size}, reconstructed on "
                    f"{sum(len(b['input_ids']) for b in reconstruction)} windows; LoRA r={cfg.lora_r} tunes it.")
        return small

    def initialize_mask(self) -> torch.Tensor | None:
        """Set the mask logits from the channel importance that ``pat_config.mask_init`` names (on the neuron axis:
        each neuron's output energy, ``[layers, intermediate_size]``), measured on the first ``mask_init_samples``
        training windows (nothing to do for ``"zeros"``); returns the importance."""
        cfg = self.pat_config
        self._mask_initialized = True
        if cfg.mask_init == "zeros" or self.pat is None:
            return None
        batches = self._first_windows(cfg.mask_init_samples)
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        if cfg.axis == "neurons":
            with self.pat.fixed_gate(torch.ones_like(self.pat.mask.logits.detach())):
                energy = mlp_statistics(base, batches, gram=False)
            importance = torch.stack([neuron_scores(e, layer) for e, layer in zip(energy, base.model.layers,
                                                                                   strict=True)]).float()
        elif cfg.mask_init == "activation":
            with self.pat.fixed_gate(torch.ones_like(self.pat.mask.logits.detach())):
                importance = activation_channel_importance(base, batches)
        else:
            importance = taylor_channel_importance(self.model, self.pat, batches)
        logits = self.pat.mask.logits
        rows = importance.view(-1, logits.shape[-1])  # one mask, or one per layer: each standardised on its own
        start = torch.stack([logits_from_importance(row, cfg.mask_init_scale) for row in rows])
        with torch.no_grad():
            logits.copy_(start.view_as(logits).to(logits.device, logits.dtype))
        self.channel_importance = importance
        count = sum(len(b["input_ids"]) for b in batches)
        logger.info(f"PAT mask initialised from {cfg.mask_init} importance on {count} windows.")
        return importance

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the mask logits moved to a group of their own (no weight decay), and the
        HSMs too when ``hsm_learning_rate`` is set."""
        optimizer = super().create_optimizer(model)
        if self.pat is None:
            return optimizer
        cfg = self.pat_config
        logits = self.pat.mask.logits
        hsm = [p for p in self.pat.hsms.parameters() if p.requires_grad] if cfg.hsm_learning_rate else []
        moved = {id(p) for p in [logits, *hsm]}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in moved]
        optimizer.add_param_group({"params": [logits], "lr": cfg.mask_learning_rate or 10 * self.args.learning_rate,
                                   "weight_decay": 0.0})
        if hsm:
            optimizer.add_param_group({"params": hsm, "lr": cfg.hsm_learning_rate, "weight_decay": 0.0})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """LM loss, plus the mask and Identity terms once per optimizer step (see `add_step_penalty`)."""
        if self.pat is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if model.training:
            self.pat.mask.set_progress(self.state.global_step, self.state.max_steps)
        labels = inputs.get("labels", inputs["input_ids"])
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            weight = self.pat_config.distill_weight
            if weight > 0:
                distill = self._distillation(model, inputs, outputs.logits, labels, num_items_in_batch)
                loss = mix_distillation(loss, distill, weight)
            loss = add_step_penalty(self, loss, self._pat_penalty, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _distillation(self, model, inputs, logits, labels, num_items_in_batch) -> torch.Tensor:
        """The distillation term to the dense model (`distillation_loss`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        adapters_off = unwrapped.disable_adapter() if isinstance(unwrapped, PeftModel) else nullcontext()
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), adapters_off, self.pat.bypassed():
            teacher = unwrapped(**batch).logits
        value = distillation_loss(self, logits, teacher, labels, self.pat_config.distill_temperature,
                                  num_items_in_batch)
        self._pat_terms["pat_distill_loss"] = float(value.detach())
        return value

    def _pat_penalty(self) -> torch.Tensor:
        cfg, mask = self.pat_config, self.pat.mask
        active = mask.active_loss()
        identity = self.pat.identity_loss()
        self._pat_terms.update({
            "pat_active_loss": float(active.detach()), "pat_identity_loss": float(identity.detach()),
            "pat_open_channels": mask.num_open(), "pat_mask_binary": float(mask.is_binary),
        })
        return cfg.active_loss_weight * active + cfg.identity_loss_weight * identity

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's checkpoint plus the HSMs, mask logits and schedule step (a peft checkpoint holds only the
        adapter)."""
        super()._save(output_dir, state_dict)
        if self.pat is None:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        state = {k: v.detach().cpu().contiguous() for k, v in self.pat.state_dict().items()}
        save_file(state, folder / PAT_STATE_NAME, metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PAT_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {PAT_STATE_NAME}: it was not written by PATTrainer, so the HSMs and "
                "the mask cannot be restored. Resume from a PATTrainer checkpoint."
            )
        try:
            self.pat.load_state_dict(load_file(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{path} does not match this model's PAT modules ({err}).") from err

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **self._pat_terms}
        super().log(logs, *args, **kwargs)

    def export(self, output_dir: str | os.PathLike | None = None, record: dict[str, Any] | None = None
               ) -> PreTrainedModel:
        """The smaller standard model (`export_pat_model`; with strategy 'one-shot', `export_one_shot_model`), saved
        to `output_dir` (default ``args.output_dir``) by the main process only."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        training = {"steps": self.state.global_step, "data": self.data_source,
                    "learning_rate": self.args.learning_rate}
        record = {"training": training, **(record or {})}
        if self.pat_config.strategy == "one-shot":
            if self._dense is None:
                raise ValueError("Nothing to export yet: with strategy='one-shot', train() prunes the model first.")
            return export_one_shot_model(self.model, self.pat_config, self._dense,
                                         output_dir if self.args.should_save else None,
                                         tokenizer=self.processing_class, record=record)
        return export_pat_model(self.model, output_dir if self.args.should_save else None,
                                tokenizer=self.processing_class, record=record)
