"""End to end on the embedded SmolLM2-135M and the bundled corpora (slow: prepares them on first use)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_dpruner import AutoPrunedModelForCausalLM, DPrunerConfig, DPrunerTrainer
from hf_dpruner.corpora import load_corpus_texts
from hf_dpruner.evaluation import perplexity
from hf_dpruner.resources import default_model_path

pytestmark = pytest.mark.slow


def test_prune_embedded_model_save_reload_generate(tmp_path):
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    args = TrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=2, num_train_epochs=1, optim="sgd", learning_rate=0.03,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_strategy="no",
    )
    config = DPrunerConfig(sparsity=0.5, num_samples=4, seq_len=64)
    trainer = DPrunerTrainer(
        model=model, args=args, dpruner_config=config, processing_class=tokenizer,
        train_dataset=load_corpus_texts("medical"), general_dataset=load_corpus_texts("general"),
    )
    result = trainer.prune()
    assert result.domain_steps == 2
    assert len(result.masks) == 30 * 7
    assert result.sparsity["overall"] == pytest.approx(0.5, abs=1e-4)
    out = tmp_path / "pruned"
    trainer.save_model(str(out))

    plain = AutoModelForCausalLM.from_pretrained(out)
    params = dict(plain.named_parameters())
    pruned = sum(int((params[name] == 0).sum()) for name in result.masks)
    total = sum(params[name].numel() for name in result.masks)
    assert pruned / total >= 0.5
    for name, keep in result.masks.items():
        assert (params[name].detach()[~keep] == 0).all()

    reloaded = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(reloaded.pruning_masks[n], result.masks[n]) for n in result.masks)
    record = json.loads((out / "pruning_config.json").read_text())
    assert record["achieved_sparsity"]["overall"] == pytest.approx(result.sparsity["overall"])
    assert record["sparsity"] == 0.5 and record["method"] == "dpruner"

    prompt = tokenizer("The patient was treated with", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0

    dense = AutoModelForCausalLM.from_pretrained(path)
    texts = load_corpus_texts("medical", "eval")[:20]
    dense_ppl = perplexity(dense, tokenizer, texts, seq_len=128, max_tokens=2048, disable_tqdm=True)["perplexity"]
    pruned_ppl = perplexity(reloaded, tokenizer, texts, seq_len=128, max_tokens=2048, disable_tqdm=True)["perplexity"]
    assert dense_ppl < pruned_ppl < 50 * dense_ppl  # pruning hurts, but the model is not destroyed
