"""PAT benchmark: dense + LoRA vs PAT (structured, smaller export) vs D-Pruner 50% + LoRA recovery, side by side.

    python benchmarks/pat.py            # the embedded SmolLM2-135M, medical, 25% of the hidden channels, 40 steps
    python benchmarks/pat.py --quick    # CI-sized (a few steps, short windows)

Every tuned model trains the same number of AdamW steps on the same medical windows with LoRA of the same rank.
Perplexity on the held-out eval splits; parameters and checkpoint size of the saved folders; CPU generation
throughput (greedy, batch 1 and 8) of every model measured in this one process, interleaved, median of repeats.
Writes ``<output-dir>/pat[-quick].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # run as a script or loaded by path from the tests
    sys.path.insert(0, str(_HERE))
from _meta import finish_metadata, start_metadata  # noqa: E402

MODES = {
    "full": dict(steps=40, batch_size=4, seq_len=256, learning_rate=2e-4, lora_r=8, pruning_ratio=0.25,
                 dpruner_sparsity=0.5, dpruner_samples=32, eval_tokens=16384, eval_seq_len=512, prompt_tokens=32,
                 new_tokens=32, repeats=3),
    "quick": dict(steps=6, batch_size=2, seq_len=64, learning_rate=2e-4, lora_r=4, pruning_ratio=0.25,
                  dpruner_sparsity=0.5, dpruner_samples=4, eval_tokens=1024, eval_seq_len=256, prompt_tokens=8,
                  new_tokens=4, repeats=1),
}
DOMAIN = "medical"


def _training_args(settings: dict, **overrides):
    from transformers import TrainingArguments

    values = dict(max_steps=settings["steps"], per_device_train_batch_size=settings["batch_size"],
                  learning_rate=settings["learning_rate"], save_strategy="no", report_to="none", disable_tqdm=True,
                  logging_strategy="no", seed=0)
    return TrainingArguments(tempfile.mkdtemp(prefix="bench-pat-"), **{**values, **overrides})


def _checkpoint_bytes(model) -> int:
    """Bytes of the saved ``*.safetensors`` files (weights, and masks for a pruned model)."""
    with tempfile.TemporaryDirectory(prefix="bench-pat-save-") as folder:
        model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def train_models(settings: dict):
    """Each method's tuned model (with its training time), and the tokenizer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from hf_dpruner import DPrunerConfig
    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.data import CausalLMCollator, build_windows
    from hf_dpruner.methods import prune_model
    from hf_dpruner.pat import PATConfig, PATTrainer, export_pat_model
    from hf_dpruner.recovery import RecoveryArguments, recover
    from hf_dpruner.resources import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = load_corpus_texts(DOMAIN)
    windows = build_windows(texts, tokenizer, settings["seq_len"], settings["steps"] * settings["batch_size"], 0)
    collator = CausalLMCollator(tokenizer.pad_token_id)
    models: dict[str, dict] = {"dense": {"model": AutoModelForCausalLM.from_pretrained(path), "train_seconds": 0.0}}

    lora = LoraConfig(r=settings["lora_r"], lora_alpha=2 * settings["lora_r"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    start = time.perf_counter()
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora)
    Trainer(model=peft_model, args=_training_args(settings), train_dataset=windows, data_collator=collator).train()
    models["dense + LoRA"] = {"model": peft_model.merge_and_unload(), "train_seconds": time.perf_counter() - start}

    start = time.perf_counter()
    pat_config = PATConfig(pruning_ratio=settings["pruning_ratio"], lora_r=settings["lora_r"],
                           lora_alpha=2 * settings["lora_r"])
    trainer = PATTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=_training_args(settings),
                         pat_config=pat_config, train_dataset=Dataset.from_dict(windows.to_dict()),
                         processing_class=tokenizer)
    trainer.train()
    small = export_pat_model(trainer.model)
    label = f"PAT {settings['pruning_ratio']:.0%}"
    models[label] = {"model": small, "train_seconds": time.perf_counter() - start}

    sparsity = settings["dpruner_sparsity"]
    config = DPrunerConfig(sparsity=sparsity, num_samples=settings["dpruner_samples"], seq_len=settings["seq_len"])
    start = time.perf_counter()
    pruned, _ = prune_model(
        AutoModelForCausalLM.from_pretrained(path), tokenizer, "dpruner", config,
        _training_args(settings, optim="sgd", learning_rate=0.03, lr_scheduler_type="constant", max_steps=-1,
                       per_device_train_batch_size=1, gradient_accumulation_steps=4, num_train_epochs=1),
        general_texts=load_corpus_texts("general"), domain_texts=texts,
    )
    prune_seconds = time.perf_counter() - start
    args = RecoveryArguments(lora_r=settings["lora_r"], lora_alpha=2.0 * settings["lora_r"],
                             num_samples=settings["steps"] * settings["batch_size"], seq_len=settings["seq_len"])
    result = recover(pruned, tokenizer, texts, [], args, _training_args(settings))
    models[f"D-Pruner {sparsity:.0%} + LoRA"] = {
        "model": result.model, "train_seconds": time.perf_counter() - start, "prune_seconds": prune_seconds}
    return models, tokenizer


def throughput(models: dict[str, dict], tokenizer, settings: dict, texts: list[str]) -> dict[str, dict[int, float]]:
    """Greedy generation tokens/s per model at batch 1 and 8, measured interleaved; median of the repeats."""
    import torch

    prompt_ids = tokenizer(" ".join(texts[:4]), return_tensors="pt")["input_ids"]
    prompt = prompt_ids[:, : settings["prompt_tokens"]]
    new = settings["new_tokens"]
    timings: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in models}

    def generate(model, batch: int) -> float:
        ids = prompt.repeat(batch, 1)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert out.shape[1] == ids.shape[1] + new
        return batch * new / (time.perf_counter() - start)

    for entry in models.values():
        entry["model"].eval()
        generate(entry["model"], 1)  # warm-up
    for _ in range(settings["repeats"]):
        for batch in (1, 8):
            for name, entry in models.items():
                timings[name][batch].append(generate(entry["model"], batch))
    return {name: {batch: statistics.median(values) for batch, values in t.items()} for name, t in timings.items()}


def measure(settings: dict) -> list[dict]:
    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.evaluation import perplexity

    models, tokenizer = train_models(settings)
    eval_texts = {key: load_corpus_texts(corpus, "eval") for key, corpus in (("domain_ppl", DOMAIN),
                                                                            ("general_ppl", "general"))}
    speeds = throughput(models, tokenizer, settings, eval_texts["domain_ppl"])
    rows = []
    for name, entry in models.items():
        model = entry["model"]
        ppl = {key: perplexity(model, tokenizer, texts, seq_len=settings["eval_seq_len"],
                               max_tokens=settings["eval_tokens"], disable_tqdm=True)["perplexity"]
               for key, texts in eval_texts.items()}
        size = _checkpoint_bytes(model)
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        rows.append({"method": name, **ppl, "parameters": model.num_parameters(), "nonzero_parameters": nonzero,
                     "hidden_size": model.config.hidden_size, "checkpoint_bytes": size,
                     "tokens_per_s_batch1": speeds[name][1], "tokens_per_s_batch8": speeds[name][8],
                     "train_seconds": entry["train_seconds"], "prune_seconds": entry.get("prune_seconds", 0.0)})
    return rows


def goals(rows: list[dict], settings: dict) -> list[str]:
    by = {r["method"]: r for r in rows}
    pat = by[f"PAT {settings['pruning_ratio']:.0%}"]
    dense, lora = by["dense"], by["dense + LoRA"]
    lines = []
    for batch in (1, 8):
        ratio = pat[f"tokens_per_s_batch{batch}"] / dense[f"tokens_per_s_batch{batch}"]
        lines.append(f"PAT tokens/s at batch {batch}: {ratio:.2f}x the dense model (goal >= 1.25x) — "
                     f"{'met' if ratio >= 1.25 else 'MISSED'}.")
    gap = pat["domain_ppl"] / lora["domain_ppl"] - 1
    lines.append(f"PAT domain perplexity {gap:+.1%} vs dense + LoRA (goal within 10%) — "
                 f"{'met' if gap <= 0.10 else 'MISSED'}.")
    return lines


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [f"Embedded SmolLM2-135M, {DOMAIN}; {settings['steps']} AdamW steps of {settings['batch_size']} x "
             f"{settings['seq_len']} tokens, lr {settings['learning_rate']}, LoRA r {settings['lora_r']} on every "
             f"linear layer for each tuned model. Perplexity: first {settings['eval_tokens']} tokens of each eval "
             f"split, windows of {settings['eval_seq_len']}. Generation: greedy, {settings['prompt_tokens']}-token "
             f"prompt, {settings['new_tokens']} new tokens, median of {settings['repeats']}, all models in one "
             "process.", "",
             "| method | hidden | domain ppl | general ppl | parameters | non-zero | checkpoint MiB | tok/s b1 | "
             "tok/s b8 | train (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['hidden_size']} | {r['domain_ppl']:.2f} | {r['general_ppl']:.2f} | "
                     f"{r['parameters'] / 1e6:.1f}M | {r['nonzero_parameters'] / 1e6:.1f}M | "
                     f"{r['checkpoint_bytes'] / 2**20:.0f} | {r['tokens_per_s_batch1']:.1f} | "
                     f"{r['tokens_per_s_batch8']:.1f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines + [""] + [f"- {g}" for g in goals(rows, settings)]) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r["method"] for r in rows]
    for offset, key in ((-0.2, "domain_ppl"), (0.2, "general_ppl")):
        left.bar([i + offset for i in range(len(rows))], [r[key] for r in rows], width=0.4, label=key)
    left.set_xticks(range(len(rows)), names, fontsize=7)
    left.set(ylabel="perplexity", title="quality (lower is better)")
    left.legend(fontsize=7)
    dense = rows[0]
    for offset, batch in ((-0.2, 1), (0.2, 8)):
        key = f"tokens_per_s_batch{batch}"
        right.bar([i + offset for i in range(len(rows))], [r[key] / dense[key] for r in rows], width=0.4,
                  label=f"batch {batch}")
    right.axhline(1.25, color="grey", linestyle="--", linewidth=1, label="goal 1.25x")
    right.set_xticks(range(len(rows)), names, fontsize=7)
    right.set(ylabel="generation tokens/s vs dense", title="CPU speed (higher is better)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run.")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--steps", type=int, help="Override the number of training steps.")
    args = parser.parse_args(argv)
    metadata = start_metadata(__file__, args, argv)
    mode = "quick" if args.quick else "full"
    settings = dict(MODES[mode])
    if args.steps:
        settings["steps"] = args.steps
    start = time.perf_counter()
    rows = measure(settings)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "pat" if mode == "full" else "pat-quick"
    results = {"metadata": finish_metadata(metadata), "settings": settings, "runs": rows,
               "seconds": time.perf_counter() - start}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(rows, settings))
    plot(rows, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
