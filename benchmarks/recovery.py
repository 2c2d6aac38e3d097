"""Recovery benchmark: no recovery vs uniform-rank LoRA (LM loss, distillation, both) vs RankAdaptor, side by side.

    python benchmarks/recovery.py --pruned out/smollm2-med-50     # a D-Pruner checkpoint of the embedded model
    python benchmarks/recovery.py                                 # prunes the embedded model first (CLI defaults)

Every LoRA run trains `--max-steps` AdamW steps on the same recovery windows of the checkpoint's domain corpus with
masked LoRA (the merged models stay exactly as sparse); RankAdaptor's ranks sum to the uniform budget; the
distillation rows learn the dense base model's next-token distribution (KL, mixed with the LM loss or alone).
Perplexity on the held-out eval splits, the dense base model's too. Writes ``<output-dir>/recovery.json``,
``recovery.md`` and ``recovery.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # run as a script or loaded by path from the tests
    sys.path.insert(0, str(_HERE))
from _meta import finish_metadata, start_metadata  # noqa: E402

SETTINGS = dict(lora_r=8, num_samples=64, seq_len=256, max_steps=40, batch_size=4, learning_rate=3e-4,
                distill_weights=[0.5, 1.0], distill_temperature=1.0,
                search_steps=8, search_initial=8, search_rounds=4, search_eval_samples=8, seeds=3,
                eval_tokens=16384, eval_seq_len=512)


def _kd_label(weight: float) -> str:
    return "LoRA uniform, distillation only" if weight == 1.0 else f"LoRA uniform + distillation {weight:g}"


def measure(settings: dict, pruned: Path, on_row=None) -> list[dict]:
    """Every row, in an order that gives each comparison early: seed 0 of every method, then the other seeds of
    uniform LoRA and RankAdaptor (whose search runs once, at seed 0; the other seeds train its ranks)."""
    from transformers import AutoTokenizer, TrainingArguments

    from hf_dpruner import AutoPrunedModelForCausalLM
    from hf_dpruner.config import read_pruning_record
    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.evaluation import perplexity
    from hf_dpruner.modeling import load_causal_lm
    from hf_dpruner.recovery import RecoveryArguments, recover
    from hf_dpruner.resources import DEFAULT_MODEL_NAME, model_location

    domain = read_pruning_record(pruned)["calibration"].get("domain_data", "medical")
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(rows)

    def evaluate(model) -> dict:
        return {name: perplexity(model, tokenizer, load_corpus_texts(corpus, "eval"), seq_len=settings["eval_seq_len"],
                                 max_tokens=settings["eval_tokens"], disable_tqdm=True)["perplexity"]
                for name, corpus in (("domain_ppl", domain), ("general_ppl", "general"))}

    record = read_pruning_record(pruned)
    base = record.get("base_model")
    teacher = load_causal_lm(model_location(base or DEFAULT_MODEL_NAME))
    add({"method": "dense", "seed": None, "lora_parameters": 0, "layer_ranks": None, "search_seconds": 0.0,
         "train_seconds": 0.0, **evaluate(teacher)})
    add({"method": "no recovery", "seed": None, "lora_parameters": 0, "layer_ranks": None, "search_seconds": 0.0,
         "train_seconds": 0.0, **evaluate(AutoPrunedModelForCausalLM.from_pretrained(pruned))})
    variants = [("LoRA uniform", "uniform", 0.0, 0)]
    variants += [(_kd_label(weight), "uniform", weight, 0) for weight in settings["distill_weights"]]
    variants += [("LoRA rankadaptor", "rankadaptor", 0.0, 0)]
    for seed in range(1, settings["seeds"]):
        variants += [("LoRA uniform", "uniform", 0.0, seed), ("LoRA rankadaptor", "rankadaptor", 0.0, seed)]
    searched: list[int] | None = None
    for label, allocation, weight, seed in variants:
        model = AutoPrunedModelForCausalLM.from_pretrained(pruned)
        args = RecoveryArguments(
            rank_allocation=allocation, lora_r=settings["lora_r"], num_samples=settings["num_samples"],
            seq_len=settings["seq_len"], search_steps=settings["search_steps"],
            search_initial=settings["search_initial"], search_rounds=settings["search_rounds"],
            search_eval_samples=settings["search_eval_samples"], distill_weight=weight,
            distill_temperature=settings["distill_temperature"],
            layer_ranks=searched if allocation == "rankadaptor" else None,
        )
        training_args = TrainingArguments(
            tempfile.mkdtemp(prefix="bench-recovery-"), max_steps=settings["max_steps"],
            per_device_train_batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
            save_strategy="no", report_to="none", disable_tqdm=True, logging_strategy="no", seed=seed,
        )
        result = recover(model, tokenizer, load_corpus_texts(domain), load_corpus_texts(domain, "eval"), args,
                         training_args, teacher=teacher if weight > 0 else None)
        if allocation == "rankadaptor" and searched is None:
            searched = list(result.ranks)
        model = result.model
        model.check_pruned_weights()
        add({"method": label, "seed": seed, "lora_parameters": result.lora_parameters,
             "layer_ranks": list(result.ranks), "search_seconds": result.seconds.get("search", 0.0),
             "train_seconds": result.seconds["train"], "sparsity": model.pruning_sparsity()["overall"],
             "search_runs": len(result.search.history) if result.search else 0,
             "search_noise": result.search.noise if result.search else None, **evaluate(model)})
    return rows


def seed_summary(rows: list[dict], method: str) -> dict | None:
    """Mean and sample spread of a method's domain perplexity over its seeds."""
    values = [r["domain_ppl"] for r in rows if r["method"] == method]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "seeds": len(values)}


def markdown(rows: list[dict], settings: dict, pruned: str) -> str:
    lines = [f"Checkpoint `{pruned}`; LoRA mean rank {settings['lora_r']} (same number of LoRA parameters for both), "
             f"{settings['max_steps']} steps of {settings['batch_size']} x {settings['seq_len']} tokens, lr "
             f"{settings['learning_rate']}; RankAdaptor: {settings['search_initial']} initial + up to "
             f"{settings['search_rounds']} online short runs of {settings['search_steps']} steps, once (seed 0); "
             f"its ranks are trained at every seed. Perplexity: first {settings['eval_tokens']} tokens of each eval "
             f"split, windows of {settings['eval_seq_len']}.", "",
             "| method | seed | domain ppl | general ppl | LoRA parameters | search (s) | training (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        seed = "" if r.get("seed") is None else r["seed"]
        lines.append(f"| {r['method']} | {seed} | {r['domain_ppl']:.2f} | {r['general_ppl']:.2f} | "
                     f"{r['lora_parameters']:,} | {r['search_seconds']:.0f} | {r['train_seconds']:.0f} |")
    by = {r["method"]: r for r in rows if r.get("seed") in (None, 0)}
    tuned = [r for r in by.values() if r["method"].startswith("LoRA")]
    if "dense" in by and tuned:
        distilled = [r for r in tuned if "distillation" in r["method"]]
        for what, candidates in (("distillation", distilled), ("any", tuned)):
            if not candidates:
                continue
            best = min(candidates, key=lambda r: r["domain_ppl"])
            ratio = best["domain_ppl"] / by["dense"]["domain_ppl"]
            lines += ["", f"Best recovery ({what}: {best['method']}, seed 0): domain perplexity {ratio:.2f}x the "
                          f"dense model's (goal of the chain with distillation: <= 1.3x within 100 steps) — "
                          f"{'met' if ratio <= 1.3 else 'MISSED'} at {settings['max_steps']} steps."]
    uniform, adaptive = seed_summary(rows, "LoRA uniform"), seed_summary(rows, "LoRA rankadaptor")
    if uniform and adaptive:
        gain = 1 - adaptive["mean"] / uniform["mean"]
        lines += ["", f"Goal (RankAdaptor's domain perplexity >= 2% below uniform LoRA's at equal budget, mean over "
                      f"seeds): uniform {uniform['mean']:.2f} ± {uniform['std']:.2f}, RankAdaptor "
                      f"{adaptive['mean']:.2f} ± {adaptive['std']:.2f} ({adaptive['seeds']} seeds, ± the sample "
                      f"spread): {abs(gain):.1%} {'lower' if gain >= 0 else 'higher'} — "
                      f"{'met' if gain >= 0.02 else 'MISSED'}.",
                  f"RankAdaptor ranks per layer: {by['LoRA rankadaptor']['layer_ranks']}"]
        search = by["LoRA rankadaptor"]
        lines.append(f"RankAdaptor search: {search['search_runs']} short runs, {search['search_seconds']:.0f} s, "
                     f"against {search['train_seconds']:.0f} s for the final training.")
        noise = search.get("search_noise")
        if noise:
            ratio = noise["signal_to_noise"]
            lines.append(f"Search signal vs noise (log-ppl of the {settings['search_steps']}-step runs): spread "
                         f"between {noise['configs']} configurations {noise['config_std']:.4f}, spread of one "
                         f"configuration over {noise['seeds']} seeds {noise['seed_std']:.4f} (ratio "
                         f"{'n/a' if ratio is None else f'{ratio:.2f}'}).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in rows]
    for offset, key in ((-0.2, "domain_ppl"), (0.2, "general_ppl")):
        left.bar([i + offset for i in range(len(rows))], [r[key] for r in rows], width=0.4, label=key)
    left.set_xticks(range(len(rows)), [n.replace(" + ", "\n+ ").replace(", ", ",\n") for n in names], fontsize=7)
    left.set(ylabel="perplexity", title="after recovery (lower is better)")
    left.legend(fontsize=7)
    for r in (r for r in rows if r["layer_ranks"]):
        right.plot(range(len(r["layer_ranks"])), r["layer_ranks"], marker="o", label=r["method"])
    right.set(xlabel="decoder layer", ylabel="LoRA rank", title="ranks per layer (same total)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", help="A pruned checkpoint of the embedded model. Default: prune one first.")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--max-steps", type=int, default=SETTINGS["max_steps"])
    parser.add_argument("--seeds", type=int, default=SETTINGS["seeds"],
                        help="Seeds of uniform LoRA and RankAdaptor (the goal compares their means).")
    args = parser.parse_args(argv)
    metadata = start_metadata(__file__, args, argv)
    settings = {**SETTINGS, "max_steps": args.max_steps, "seeds": args.seeds}
    pruned = args.pruned
    if pruned is None:
        pruned = str(Path(tempfile.mkdtemp(prefix="bench-pruned-")) / "smollm2-med-50")
        subprocess.run([sys.executable, "-m", "hf_dpruner.commands.cli", "prune", "--domain", "medical",
                        "--sparsity", "0.5", "--output-dir", pruned, "--disable-tqdm", "true"], check=True)
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict], complete: bool) -> None:  # after every row: a killed run keeps what it measured
        results = {"metadata": finish_metadata(dict(metadata)), "settings": settings, "pruned": pruned, "runs": rows,
                   "complete": complete, "seconds": time.perf_counter() - start}
        (out / "recovery.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "recovery.md").write_text(markdown(rows, settings, Path(pruned).name))

    rows = measure(settings, Path(pruned), on_row=lambda partial: write(partial, complete=False))
    write(rows, complete=True)
    plot(rows, out / "recovery.png")
    print((out / "recovery.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
