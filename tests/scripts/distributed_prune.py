"""Prune a tiny seeded Llama with DPrunerTrainer; run directly (1 process) or under `accelerate launch`.

Usage: distributed_prune.py OUTPUT_DIR DOMAIN_PASS GRADIENT_ACCUMULATION_STEPS GENERAL_ESTIMATOR
Writes the pruned checkpoint, `general.safetensors` (G) and `scores.safetensors` (S), from the main process only.
"""

import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from hf_dpruner import DPrunerConfig, DPrunerTrainer
from hf_dpruner.importance import save_importance

WORDS = [f"w{i}" for i in range(120)]


def texts(seed: int, count: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (count, 40), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in row) for row in ids]


def main(output_dir: str, domain_pass: str, accumulation: int, estimator: str) -> None:
    vocab = {word: i for i, word in enumerate(WORDS)} | {"[UNK]": 120, "</s>": 121}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]", pad_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    ))
    args = TrainingArguments(
        output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=accumulation, learning_rate=0.03,
        optim="sgd", num_train_epochs=1, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        disable_tqdm=True, seed=7, use_cpu=True,
    )
    config = DPrunerConfig(sparsity=0.5, num_samples=8, seq_len=16, domain_pass=domain_pass,
                           general_estimator=estimator)
    trainer = DPrunerTrainer(model=model, args=args, dpruner_config=config, train_dataset=texts(1, 20),
                             general_dataset=texts(2, 20), processing_class=tokenizer,
                             general_importance=f"{output_dir}/general.safetensors")
    trainer.prune()
    if args.should_save:
        trainer.save_model(output_dir)
        save_importance(trainer.domain_importance.scores, f"{output_dir}/scores.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
