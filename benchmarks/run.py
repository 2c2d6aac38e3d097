"""Side-by-side benchmark: D-Pruner vs magnitude, Wanda and SparseGPT on the embedded SmolLM2-135M.

    python benchmarks/run.py --quick          # CI-sized: medical, 50%, tiny budget (a few minutes)
    python benchmarks/run.py                  # both domains, 50% / 2:4 / 30% / 70%, the CLI's default budget
    python benchmarks/run.py --sparsities 0.5 # a subset

Every method gets the same calibration budget (`--num-samples` windows of `--seq-len` tokens of general and of
domain text; the baselines calibrate on the domain windows). Each configuration runs in its own process so that
its peak RSS is its own. Writes ``<output-dir>/<mode>.json``, ``<mode>.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # run as a script or loaded by path from the tests
    sys.path.insert(0, str(_HERE))
from hf_dpruner.methods import method_names  # noqa: E402

from _meta import finish_metadata, start_metadata  # noqa: E402

# every registered method, the paper's D-Pruner last, then D-Pruner with its general importance cached (the cost
# for a second domain); "dense" is the unpruned reference. "<method>+owl" runs a method with OWL layer ratios
# (unstructured groups of 70% and more only).
PEERS = ("wanda", "sparsegpt", "cross-calibration")
RECIPE = "dpruner-recon"
OWL_FROM = 0.7
_BASE = tuple(m for m in method_names() if m != "dpruner")
METHODS = ("dense", *_BASE, "dpruner", "dpruner-cached", *(f"{m}+owl" for m in (*PEERS, RECIPE)))
# the goals per group: the recipe's domain perplexity <= factor x the best peer's
GOAL_FACTORS = {"0.5": 0.85, "0.7": 0.70, "2:4": 0.90}
TIME_GOAL = 3.0
MODES = {
    "quick": dict(domains=["medical"], sparsities=["0.5"], num_samples=4, seq_len=128, eval_tokens=2048,
                  eval_seq_len=256),
    "full": dict(domains=["medical", "legal"], sparsities=["0.5", "2:4", "0.3", "0.7"], num_samples=32, seq_len=256,
                 eval_tokens=16384, eval_seq_len=512),
}


def run_single(spec: dict) -> dict:
    """Prune and evaluate one (domain, sparsity, method); runs in a fresh process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from hf_dpruner import DPrunerConfig
    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.evaluation import perplexity
    from hf_dpruner.methods import prune_model
    from hf_dpruner.resources import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    sparsity = spec["sparsity"]
    n_m = ":" in sparsity
    config = DPrunerConfig(
        sparsity=0.5 if n_m else float(sparsity), sparsity_type=sparsity if n_m else "unstructured",
        num_samples=spec["num_samples"], seq_len=spec["seq_len"], **spec.get("config", {}),
    )
    args = TrainingArguments(
        tempfile.mkdtemp(prefix="bench-"), optim="sgd", learning_rate=0.03, lr_scheduler_type="constant",
        per_device_train_batch_size=1, gradient_accumulation_steps=4, num_train_epochs=1, save_strategy="no",
        report_to="none", disable_tqdm=True, logging_strategy="no", seed=0,
    )
    method, _, variant = spec["method"].partition("+")
    if variant == "owl":
        config = dataclasses.replace(config, layer_sparsity="owl")
    if method == "wanda" and config.sparsity_type == "unstructured":
        config = dataclasses.replace(config, sparsity_type="row")  # Wanda's own comparison group
    seconds, stages = 0.0, {}
    if method != "dense":
        general_importance = spec["general_importance"] if method in ("dpruner", "dpruner-cached") else None
        if method == "dpruner" and general_importance:
            Path(general_importance).unlink(missing_ok=True)  # fresh: compute (and write the cache for -cached)
        start = time.perf_counter()
        model, result = prune_model(
            model, tokenizer, method.removesuffix("-cached"), config, args,
            general_texts=load_corpus_texts("general"), domain_texts=load_corpus_texts(spec["domain"]),
            general_importance=general_importance,
        )
        seconds, stages = time.perf_counter() - start, result.stage_seconds
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ppl = {
        name: perplexity(model, tokenizer, load_corpus_texts(corpus, "eval"), seq_len=spec["eval_seq_len"],
                         max_tokens=spec["eval_tokens"], disable_tqdm=True)["perplexity"]
        for name, corpus in (("domain", spec["domain"]), ("general", "general"))
    }
    kept = {k: v for k, v in spec.items() if k != "general_importance"}  # a temporary path of this machine
    return {**kept, "domain_ppl": ppl["domain"], "general_ppl": ppl["general"], "prune_seconds": seconds,
            "stage_seconds": stages, "peak_rss_mib": peak_mib}


def _base(method: str) -> str:
    return method.partition("+")[0]


def goals(rows: list[dict]) -> list[str]:
    """The issue's targets, checked per (domain, sparsity): the recipe's domain perplexity against the best peer's
    (the lowest among the peers, with and without OWL), its general perplexity against the reference (the lowest
    general perplexity among the peers within 10% of the best peer's domain perplexity), and its prune time
    against SparseGPT's."""
    lines = []
    for domain, sparsity in dict.fromkeys((r["domain"], r["sparsity"]) for r in rows):
        by = {r["method"]: r for r in rows if r["domain"] == domain and r["sparsity"] == sparsity}
        peers = [r for m, r in by.items() if _base(m) in PEERS]
        recipes = [r for m, r in by.items() if _base(m) == RECIPE]
        if not peers or not recipes or "sparsegpt" not in by:
            continue
        best = min(peers, key=lambda r: r["domain_ppl"])
        reference = min((r for r in peers if r["domain_ppl"] <= 1.1 * best["domain_ppl"]),
                        key=lambda r: r["general_ppl"])
        factor = GOAL_FACTORS.get(sparsity)
        lines.append(f"- {domain} {sparsity}: best peer {best['method']} (domain {best['domain_ppl']:.2f}); "
                     f"reference general {reference['general_ppl']:.2f} ({reference['method']})")
        for r in recipes:
            ratio = r["domain_ppl"] / best["domain_ppl"]
            time_ratio = r["prune_seconds"] / by["sparsegpt"]["prune_seconds"]
            domain_goal = f"goal <= {factor:.2f}: {'met' if ratio <= factor else 'MISSED'}" if factor else "no goal"
            lines.append(
                f"  - {r['method']}: domain {r['domain_ppl']:.2f} = {ratio:.3f}x the best peer ({domain_goal}); "
                f"general {r['general_ppl']:.2f} (goal <= {reference['general_ppl']:.2f}: "
                f"{'met' if r['general_ppl'] <= reference['general_ppl'] else 'MISSED'}); time {time_ratio:.2f}x "
                f"SparseGPT (goal <= {TIME_GOAL:g}x: {'met' if time_ratio <= TIME_GOAL else 'MISSED'})")
        if "dpruner" in by:
            paper = by["dpruner"]
            lines.append(f"  - dpruner (the paper's recipe): domain {paper['domain_ppl']:.2f} = "
                         f"{paper['domain_ppl'] / best['domain_ppl']:.3f}x the best peer, general "
                         f"{paper['general_ppl']:.2f}")
    return lines


def markdown(rows: list[dict], settings: dict) -> str:
    header = ("| domain | sparsity | method | domain ppl | general ppl | prune time (s) | time / SparseGPT | "
              "peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        sgpt = next((x for x in rows if x["method"] == "sparsegpt" and x["domain"] == r["domain"]
                     and x["sparsity"] == r["sparsity"]), None)
        ratio = f"{r['prune_seconds'] / sgpt['prune_seconds']:.2f}" if sgpt and r["method"] != "dense" else ""
        lines.append(f"| {r['domain']} | {r['sparsity']} | {r['method']} | {r['domain_ppl']:.2f} | "
                     f"{r['general_ppl']:.2f} | {r['prune_seconds']:.1f} | {ratio} | {r['peak_rss_mib']:.0f} |")
    budget = (f"Calibration: {settings['num_samples']} general + {settings['num_samples']} domain windows of "
              f"{settings['seq_len']} tokens (baselines: the domain windows). Perplexity: first "
              f"{settings['eval_tokens']} tokens of each eval split, windows of {settings['eval_seq_len']}.")
    return "\n".join([budget, "", *lines, "", "Goals:", *goals(rows)]) + "\n"


def plots(rows: list[dict], out: Path, mode: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    domains = sorted({r["domain"] for r in rows})
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=False):
        for r in (r for r in rows if r["domain"] == domain):
            ax.scatter(r["general_ppl"], r["domain_ppl"], label=f"{r['method']} {r['sparsity']}")
        ax.set(xscale="log", yscale="log", xlabel="general perplexity", ylabel=f"{domain} perplexity",
               title=f"{domain}: lower-left is better")
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / f"{mode}_domain_vs_general.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    unstructured = sorted({r["sparsity"] for r in rows if ":" not in r["sparsity"]}, key=float)
    if len(unstructured) > 1:
        fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.5), squeeze=False)
        for ax, domain in zip(axes[0], domains, strict=False):
            for method in (m for m in METHODS[1:] if m != "dpruner-cached"):
                points = sorted((float(r["sparsity"]), r["domain_ppl"]) for r in rows
                                if r["domain"] == domain and r["method"] == method and ":" not in r["sparsity"])
                if points:
                    ax.plot(*zip(*points, strict=False), marker="o", label=method)
            ax.set(yscale="log", xlabel="sparsity", ylabel=f"{domain} perplexity",
                   title=f"{domain} perplexity vs sparsity")
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"{mode}_ppl_vs_sparsity.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def groups_of(rows: list[dict]) -> list[list[str]]:
    """The (domain, sparsity) groups of `rows`, in order of first appearance."""
    return [list(g) for g in dict.fromkeys((r["domain"], r["sparsity"]) for r in rows)]


def kept_run_metadata(earlier: dict, kept: list[list[str]]) -> list[dict]:
    """The metadata of the earlier runs that measured the `kept` groups of an earlier results file, each limited
    to the groups it still provides; groups no metadata covers get a block that says so (and fails the test of
    results files until they are measured again)."""
    blocks = [b for b in [earlier.get("metadata"), *earlier.get("earlier_runs", [])] if b]
    runs, covered = [], set()
    for block in blocks:
        groups = [g for g in block.get("groups", []) if g in kept and tuple(g) not in covered]
        covered.update(tuple(g) for g in groups)
        if groups:
            runs.append({**block, "groups": groups})
    unknown = [g for g in kept if tuple(g) not in covered]
    if unknown:
        runs.append({"groups": unknown, "note": "kept from an earlier results file that recorded no metadata for "
                     "these groups: measure them again"})
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run.")
    parser.add_argument("--domains", nargs="+")
    parser.add_argument("--sparsities", nargs="+", help="e.g. 0.5 2:4 0.3 0.7")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--append", action="store_true",
                        help="Keep the rows of an earlier <mode>.json for the (domain, sparsity) groups not rerun.")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(run_single(json.loads(args.single))))
        return 0
    metadata = start_metadata(__file__, args, argv)
    mode = "quick" if args.quick else "full"
    settings = dict(MODES[mode])
    settings["domains"] = args.domains or settings["domains"]
    settings["sparsities"] = args.sparsities or settings["sparsities"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="bench-general-")) / "general_importance.safetensors"
    rows = []
    for domain in settings["domains"]:
        for sparsity in settings["sparsities"]:
            for method in args.methods:
                if method == "dense" and sparsity != settings["sparsities"][0]:
                    rows.append({**next(r for r in rows if r["method"] == "dense" and r["domain"] == domain),
                                 "sparsity": sparsity})
                    continue
                if method.endswith("+owl") and (":" in sparsity or float(sparsity) < OWL_FROM):
                    continue
                spec = {k: settings[k] for k in ("num_samples", "seq_len", "eval_tokens", "eval_seq_len")}
                spec.update(domain=domain, sparsity=sparsity, method=method, general_importance=str(cache))
                print(f"[{mode}] {domain} {sparsity} {method} ...", file=sys.stderr, flush=True)
                done = subprocess.run([sys.executable, __file__, "--single", json.dumps(spec)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{domain} {sparsity} {method} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"    domain ppl {rows[-1]['domain_ppl']:.2f}, general ppl {rows[-1]['general_ppl']:.2f}, "
                      f"{rows[-1]['prune_seconds']:.1f} s", file=sys.stderr, flush=True)
    metadata["groups"] = groups_of(rows)
    earlier_runs: list[dict] = []
    previous = out / f"{mode}.json"
    if args.append and previous.is_file():
        earlier = json.loads(previous.read_text())
        rerun = {(r["domain"], r["sparsity"]) for r in rows}
        kept = [r for r in earlier["runs"] if (r["domain"], r["sparsity"]) not in rerun]
        earlier_runs = kept_run_metadata(earlier, groups_of(kept))
        rows = kept + rows
        for key in ("domains", "sparsities"):
            settings[key] = list(dict.fromkeys([*earlier["settings"][key], *settings[key]]))
        rows.sort(key=lambda r: (settings["domains"].index(r["domain"]), settings["sparsities"].index(r["sparsity"])))
    results = {"metadata": finish_metadata(metadata), "earlier_runs": earlier_runs, "settings": settings, "runs": rows}
    (out / f"{mode}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{mode}.md").write_text(markdown(rows, settings))
    written = plots(rows, out, mode)
    print((out / f"{mode}.md").read_text())
    print("written:", ", ".join(str(p) for p in [out / f"{mode}.json", out / f"{mode}.md", *written]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
