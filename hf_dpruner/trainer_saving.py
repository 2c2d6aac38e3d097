"""`Trainer.save_model` for pruned models: one atomic save, safetensors/JSON only (no ``training_args.bin``)."""

from __future__ import annotations

from transformers.utils import logging

from .modeling import PrunedModelMixin

logger = logging.get_logger(__name__)


class PrunedCheckpointSaving:
    """Mixed into a `transformers.Trainer` subclass: once the model is pruned, `save_model` writes the checkpoint,
    the tokenizer and the training arguments (as ``training_args.json``, where the Trainer would pickle them to
    ``training_args.bin``) in one `PrunedModelMixin.save_pretrained`, which replaces the folder atomically."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PrunedModelMixin):
            super()._save(output_dir, state_dict)  # mid-run Trainer checkpoints (for resuming only)
            return
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        logger.info(f"Saving the pruned checkpoint to {output_dir}")
        model.save_pretrained(output_dir, state_dict=state_dict, tokenizer=self.processing_class,
                              training_args=self.args)
