"""`DistillationTrainer`: a `transformers.Trainer` whose loss mixes the LM loss with a KL divergence to a teacher."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, Trainer

from ..distillation import distillation_loss, mix_distillation


class DistillationTrainer(Trainer):
    """Trainer with ``loss = (1 − distill_weight) · LM loss + distill_weight · T² · KL(teacher ‖ student)`` per
    predicted token, normalised like the LM loss under gradient accumulation. The `teacher` (e.g. the dense model a
    pruned one came from; it must share the tokenizer) runs in eval mode without gradients, on the student's device.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> from datasets import Dataset
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                      vocab_size=64)
        >>> student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
        >>> data = Dataset.from_dict({"input_ids": [list(range(i, i + 16)) for i in range(8)]})
        >>> data = data.map(lambda row: {"labels": row["input_ids"]})
        >>> args = TrainingArguments("out", max_steps=2, per_device_train_batch_size=4, report_to=[],
        ...                          disable_tqdm=True, save_strategy="no")
        >>> trainer = DistillationTrainer(model=student, args=args, train_dataset=data, teacher=teacher,
        ...                               distill_weight=0.5)
        >>> _ = trainer.train()  # logs the run's metrics
        {...'train_loss'...}
    """

    def __init__(self, *args, teacher: PreTrainedModel, distill_weight: float = 1.0, distill_temperature: float = 1.0,
                 **kwargs) -> None:
        if not 0.0 < distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in (0, 1] for a DistillationTrainer, got {distill_weight!r}.")
        if not distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature!r}.")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self._distill_log: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            labels = inputs.get("labels", inputs["input_ids"])
            batch = {k: v for k, v in inputs.items() if k != "labels"}
            device = outputs.logits.device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            with torch.no_grad():
                teacher_logits = self.teacher(**batch).logits
            distill = distillation_loss(self, outputs.logits, teacher_logits, labels, self.distill_temperature,
                                        num_items_in_batch)
            self._distill_log = float(distill.detach())
            loss = mix_distillation(loss, distill, self.distill_weight)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._distill_log is not None:
            logs = {**logs, "distill_loss": self._distill_log}
        super().log(logs, *args, **kwargs)
