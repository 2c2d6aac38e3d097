"""Structured pruning of the embedded SmolLM2-135M on medical text with `PATTrainer`'s default recipe: 25% of every
MLP's neurons removed (OBS), each block reconstructed toward the dense one, LoRA tuned, exported as a smaller
standard checkpoint. ``--strategy learned --axis hidden`` runs PAT as in the paper instead (a learned mask on the
hidden channels).

    python examples/pat_medical.py --output-dir out/smollm2-med-pat25

The export loads with plain `AutoModelForCausalLM.from_pretrained`; this script checks that it computes what the
tuned model computed and prints both models' parameter counts and the export's perplexity.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_dpruner.corpora import load_corpus_texts
from hf_dpruner.evaluation import perplexity
from hf_dpruner.pat import PATConfig, PATTrainer
from hf_dpruner.resources import DEFAULT_MODEL_NAME, default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="out/smollm2-med-pat25")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--pruning-ratio", type=float, default=0.25)
    parser.add_argument("--strategy", default="one-shot", choices=["one-shot", "learned"])
    parser.add_argument("--axis", default="neurons", choices=["neurons", "hidden"])
    args = parser.parse_args()

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    dense_parameters = model.num_parameters()
    trainer = PATTrainer(
        model=model,
        args=TrainingArguments(args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2,
                               learning_rate=3e-3, logging_steps=10, save_strategy="no", report_to="none"),
        pat_config=PATConfig(pruning_ratio=args.pruning_ratio, strategy=args.strategy, axis=args.axis),
        train_dataset="medical", processing_class=tokenizer, seq_len=128, num_samples=2 * args.max_steps,
    )
    trainer.train()

    eval_texts = load_corpus_texts("medical", "eval")
    tuned = trainer.model.eval()  # the masked model, or the pruned one with LoRA
    prompt = tokenizer(eval_texts[0], return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        expected = tuned(input_ids=prompt).logits
    small = trainer.export(args.output_dir, record={"base_model": DEFAULT_MODEL_NAME})
    with torch.no_grad():
        difference = (small(input_ids=prompt).logits - expected).abs().max().item()
    size = "intermediate_size" if args.axis == "neurons" else "hidden_size"
    print(f"{size} {getattr(model.config, size)} -> {getattr(small.config, size)}; parameters "
          f"{dense_parameters:,} -> {small.num_parameters():,}; max |logit difference| vs the tuned model "
          f"{difference:.2e}")
    ppl = perplexity(small, tokenizer, eval_texts, seq_len=256, max_tokens=4096, disable_tqdm=True)["perplexity"]
    print(f"medical eval perplexity of the export: {ppl:.2f}; saved to {args.output_dir}")


if __name__ == "__main__":
    main()
