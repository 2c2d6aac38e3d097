"""Every benchmark results file says what produced it, and the documented figures are the ones those files hold.

`benchmarks/_meta.py` defines the metadata block each script writes (code commit, dirty flag, CLI arguments, CPU
count, torch threads, date, versions). A results file without it fails here, with the command that re-measures it.
The figures of README.md and docs/*.md below are recomputed from the results files with the scripts' own
formatting; a figure that no results file produces does not belong in the README or the docs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
RESULTS_FILES = sorted(RESULTS.glob("*.json"))
RERUN = {  # the command that re-measures each results file the README and docs use
    "full": "python benchmarks/run.py",
    "memory": "python benchmarks/memory.py --variants default score-pass bf16-importance score-pass-bf16 "
              "dpruner-recon sparsegpt",
    "pat": "python benchmarks/pat.py",
    "recovery": "hf-dpruner prune --domain medical --sparsity 0.5 --output-dir out/smollm2-med-50 && "
                "python benchmarks/recovery.py --pruned out/smollm2-med-50",
    "cli": "python benchmarks/cli.py --tasks dpruner_mmlu_medical",  # MMLU (lm-eval extra) on the default variant
}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


meta = load_script("_meta")


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except OSError:
        return None


def metadata_blocks(results: dict) -> list[tuple[str, object]]:
    """The run's metadata and, for a file that keeps groups of earlier runs (run.py --append), theirs."""
    return [("metadata", results.get("metadata"))] + [
        (f"earlier_runs[{i}]", block) for i, block in enumerate(results.get("earlier_runs", []))]


def test_there_are_results_files():
    assert {"full", "memory", "pat", "recovery"} <= {p.stem for p in RESULTS_FILES}


@pytest.mark.parametrize("path", RESULTS_FILES, ids=lambda p: p.name)
def test_results_file_records_commit_settings_machine_and_date(path):
    results = json.loads(path.read_text())
    problems = [f"{where}: missing {', '.join(meta.missing_fields(block))}"
                for where, block in metadata_blocks(results) if meta.missing_fields(block)]
    if "settings" not in results:
        problems.append("no top-level `settings`")
    rows = results.get("runs", [])
    if rows and all("domain" in r and "sparsity" in r for r in rows):  # run.py: every group has its run's metadata
        covered = [tuple(g) for _, block in metadata_blocks(results) if isinstance(block, dict)
                   for g in block.get("groups", [])]
        groups = {(r["domain"], r["sparsity"]) for r in rows}
        if sorted(covered) != sorted(groups):
            problems.append(f"metadata groups {sorted(covered)} do not match the rows' groups {sorted(groups)}")
    shallow = _git("rev-parse", "--is-shallow-repository")
    if shallow is not None and shallow.returncode == 0 and shallow.stdout.strip() == "false":
        for where, block in metadata_blocks(results):
            commit = block.get("commit") if isinstance(block, dict) else None
            if commit and _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
                problems.append(f"{where}: commit {commit} is not in this repository")
    rerun = RERUN.get(path.stem, "the script that wrote it")
    assert not problems, f"{path.relative_to(ROOT)} must be re-run ({rerun}):\n" + "\n".join(problems)


def test_metadata_block_has_every_required_field(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCH / "run.py"), "--quick"])
    block = meta.finish_metadata(meta.start_metadata(str(BENCH / "run.py"), {"quick": True}))
    assert meta.missing_fields(block) == []
    assert block["command"] == "python benchmarks/run.py --quick" and block["cli_args"] == {"quick": True}
    assert block["cpu_count"] >= 1 and block["torch_threads"] >= 1 and block["date"].endswith("+00:00")
    assert block["versions"]["torch"] and block["versions"]["transformers"]
    head = _git("rev-parse", "HEAD")
    if head is not None and head.returncode == 0:
        assert block["commit"] == head.stdout.strip() and isinstance(block["commit_dirty"], bool)
    assert meta.missing_fields({"commit": "abc"}) == [f for f in meta.REQUIRED_FIELDS if f != "commit"]
    assert meta.missing_fields({"commit": "abc", "backfilled_from_git": "note"}) == ["date"]
    assert meta.missing_fields(None) == list(meta.REQUIRED_FIELDS)


def test_append_keeps_the_metadata_of_the_groups_it_keeps():
    run = load_script("run")
    block = {**{f: 1 for f in meta.REQUIRED_FIELDS}, "groups": [["medical", "0.5"], ["legal", "0.5"]]}
    earlier = {"metadata": block, "earlier_runs": [{**block, "commit": 0, "groups": [["medical", "2:4"]]}]}
    kept = run.kept_run_metadata(earlier, [["legal", "0.5"], ["medical", "2:4"]])
    assert [b["groups"] for b in kept] == [[["legal", "0.5"]], [["medical", "2:4"]]]
    assert kept[1]["commit"] == 0
    # groups from a file without metadata are kept, flagged, and fail the test above until measured again
    flagged = run.kept_run_metadata({"runs": []}, [["legal", "0.3"]])
    assert flagged[0]["groups"] == [["legal", "0.3"]] and meta.missing_fields(flagged[0])


def _results(stem: str) -> dict:
    return json.loads((RESULTS / f"{stem}.json").read_text())


def documented_text() -> str:
    """README.md and docs/*.md, whitespace collapsed (line breaks inside sentences do not matter)."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return " ".join(" ".join(path.read_text(encoding="utf-8").split()) for path in paths)


def readme_figures() -> list[tuple[str, str]]:
    """(text the README or docs state, results file it comes from), recomputed with the scripts' formatting."""
    figures: list[tuple[str, str]] = []
    full = _results("full")
    rows = full["runs"]
    figures += [(line, "full.json") for line in load_script("run").markdown(rows, full["settings"]).splitlines()
                if line.startswith(("| medical |", "| legal |"))]

    def row(domain, sparsity, method):
        return next(r for r in rows if (r["domain"], r["sparsity"], r["method"]) == (domain, sparsity, method))

    def ppl(domain, sparsity, method, key="domain_ppl", digits=1):
        return f"{row(domain, sparsity, method)[key]:,.{digits}f}"

    figures += [(text, "full.json") for text in (
        f"50%, medical {ppl('medical', '0.5', 'sparsegpt')} against D-Pruner's {ppl('medical', '0.5', 'dpruner')}",
        f"general {ppl('medical', '0.5', 'sparsegpt', 'general_ppl')} against "
        f"{ppl('medical', '0.5', 'dpruner', 'general_ppl')}",
        f"medical {ppl('medical', '0.3', 'dpruner')} vs {ppl('medical', '0.3', 'sparsegpt')}, legal "
        f"{ppl('legal', '0.3', 'dpruner')} vs {ppl('legal', '0.3', 'sparsegpt')}; general "
        f"{ppl('medical', '0.3', 'dpruner', 'general_ppl')} vs {ppl('medical', '0.3', 'sparsegpt', 'general_ppl')} "
        f"and {ppl('legal', '0.3', 'dpruner', 'general_ppl')} vs {ppl('legal', '0.3', 'wanda', 'general_ppl')}",
        f"medical {ppl('medical', '0.7', 'dpruner', digits=0)} vs {ppl('medical', '0.7', 'sparsegpt', digits=0)}, "
        f"legal {ppl('legal', '0.7', 'dpruner', digits=0)} vs {ppl('legal', '0.7', 'sparsegpt', digits=0)}",
        f"Wanda ({ppl('medical', '0.7', 'wanda', digits=0)} and {ppl('legal', '0.7', 'wanda', digits=0)})",
        f"medical {ppl('medical', '2:4', 'dpruner', digits=0)} vs {ppl('medical', '2:4', 'wanda', digits=0)}, "
        f"legal {ppl('legal', '2:4', 'dpruner', digits=0)} vs {ppl('legal', '2:4', 'wanda', digits=0)}",
    )]
    legal = {m: row("legal", "0.5", m) for m in ("dpruner-recon", "sparsegpt", "cross-calibration")}
    figures += [(text, "full.json") for text in (
        f"legal {legal['dpruner-recon']['domain_ppl']:.2f} / {legal['dpruner-recon']['general_ppl']:.2f} against "
        f"SparseGPT's {legal['sparsegpt']['domain_ppl']:.2f} / {legal['sparsegpt']['general_ppl']:.2f} and "
        f"cross-calibration's {legal['cross-calibration']['domain_ppl']:.2f} / "
        f"{legal['cross-calibration']['general_ppl']:.2f} "
        f"({legal['dpruner-recon']['domain_ppl'] / legal['sparsegpt']['domain_ppl']:.3f}×)",
        f"domain {legal['dpruner-recon']['domain_ppl']:.2f} = "
        f"{legal['dpruner-recon']['domain_ppl'] / legal['sparsegpt']['domain_ppl']:.3f}× the best peer's (SparseGPT, "
        f"{legal['sparsegpt']['domain_ppl']:.2f}",
        f"general {legal['dpruner-recon']['general_ppl']:.2f} against the reference "
        f"{legal['cross-calibration']['general_ppl']:.2f}",
        f"{legal['dpruner-recon']['prune_seconds']:.0f} s = "
        f"{legal['dpruner-recon']['prune_seconds'] / legal['sparsegpt']['prune_seconds']:.2f}× on legal",
    )]
    # the default recipe against its peers, medical 50% (run.goals: best peer, reference general, time)
    recipe, sgpt, cc, wanda = (row("medical", "0.5", m) for m in ("dpruner-recon", "sparsegpt", "cross-calibration",
                                                                   "wanda"))
    peers = [sgpt, cc, wanda]
    best = min(peers, key=lambda r: r["domain_ppl"])
    reference = min((r for r in peers if r["domain_ppl"] <= 1.1 * best["domain_ppl"]), key=lambda r: r["general_ppl"])
    ratio, seconds = recipe["domain_ppl"] / best["domain_ppl"], recipe["prune_seconds"]
    figures += [(text, "full.json") for text in (
        f"{recipe['domain_ppl']:.2f} / {recipe['general_ppl']:.2f} against SparseGPT's {sgpt['domain_ppl']:.2f} / "
        f"{sgpt['general_ppl']:.2f} and cross-calibration's {cc['domain_ppl']:.2f} / {cc['general_ppl']:.2f} "
        f"({ratio:.3f}× the best peer's domain perplexity",
        f"It takes {seconds / sgpt['prune_seconds']:.2f}× and "
        f"{legal['dpruner-recon']['prune_seconds'] / legal['sparsegpt']['prune_seconds']:.2f}× "
        "SparseGPT's pruning time",
        f"domain {recipe['domain_ppl']:.2f} = {ratio:.3f}× the best peer's",
        f"{best['domain_ppl']:.2f}; goal ≤ 0.85×: {'met' if ratio <= 0.85 else 'missed'}",
        f"general {recipe['general_ppl']:.2f} against the reference {reference['general_ppl']:.2f}",
        f"{seconds:.0f} s = {seconds / sgpt['prune_seconds']:.2f}× SparseGPT's on medical",
        f"Peak RSS {recipe['peak_rss_mib']:,.0f} MiB against SparseGPT's {sgpt['peak_rss_mib']:,.0f}",
        f"is at {wanda['domain_ppl']:.2f} / {wanda['general_ppl']:.2f}, ahead of the paper's D-Pruner "
        f"({ppl('medical', '0.5', 'dpruner', digits=2)} / {ppl('medical', '0.5', 'dpruner', 'general_ppl', 2)})",
    )]
    dense = row("medical", "0.5", "dense")

    memory = _results("memory")
    model, act = memory["runs"][0]["model_fp32_mib"], memory["activations_mib"]
    figures += [(f"fp32 model {model:.0f} MiB", "memory.json"),
                (f"micro-batch ({act:.0f} MiB), i.e. {3 * model + act:,.0f} MiB", "memory.json")]
    for r in memory["runs"]:  # D-Pruner's general stage, or a registry method's prune stage
        first = r["stages"].get("general_importance", r["stages"].get("prune"))
        general = first["peak_mib"] - r["baseline_mib"]
        peak = r["run_peak_mib"] - r["baseline_mib"]
        goal = "**met**" if peak <= 3 * model + act else "missed"
        figures.append((f"| {general:,.0f} | {peak:,.0f} | {peak / model:.2f} | {goal} |", "memory.json"))
    default = next(r for r in memory["runs"] if r["variant"] == "default")
    figures.append((f"peaks at {default['run_peak_mib'] / 1024:.1f} GiB", "memory.json"))
    general_x = (default["stages"]["general_importance"]["peak_mib"] - default["baseline_mib"]) / model
    figures.append((f"stays at {general_x:.1f}× (the model plus G)", "memory.json"))

    recovery = _results("recovery")
    recovery_bench = load_script("recovery")
    runs = recovery["runs"]
    by = {r["method"]: r for r in runs if r.get("seed") in (None, 0)}  # the seed-0 row of each method
    figures.append((f"| dense (before pruning) | | {dense['domain_ppl']:.2f} | {dense['general_ppl']:.2f} |",
                    "full.json"))
    for r in runs:
        figures.append((f"| {r['domain_ppl']:.2f} | {r['general_ppl']:.2f} | {r['lora_parameters']:,} | "
                        f"{r['search_seconds']:.0f} | {r['train_seconds']:.0f} |", "recovery.json"))
    none, uniform, adaptive = by["no recovery"], by["LoRA uniform"], by["LoRA rankadaptor"]
    mixed, alone = by["LoRA uniform + distillation 0.5"], by["LoRA uniform, distillation only"]
    means = {name: recovery_bench.seed_summary(runs, name) for name in ("LoRA uniform", "LoRA rankadaptor")}
    gain = 1 - means["LoRA rankadaptor"]["mean"] / means["LoRA uniform"]["mean"]
    noise = adaptive["search_noise"]
    figures += [
        (f"{recovery['seconds'] / 60:.0f} minutes on", "recovery.json"),
        (f"lowers the domain perplexity by {1 - uniform['domain_ppl'] / none['domain_ppl']:.0%} in "
         f"{recovery['settings']['max_steps']} steps ({none['domain_ppl']:.2f} → {uniform['domain_ppl']:.2f}, "
         f"{uniform['domain_ppl'] / by['dense']['domain_ppl']:.2f}× the dense model's {by['dense']['domain_ppl']:.2f})",
         "recovery.json"),
        (f"{mixed['domain_ppl']:.2f} / {mixed['general_ppl']:.2f} "
         f"({mixed['domain_ppl'] / by['dense']['domain_ppl']:.2f}×", "recovery.json"),
        (f"distillation alone {alone['domain_ppl']:.2f} / {alone['general_ppl']:.2f}", "recovery.json"),
        (f"uniform {means['LoRA uniform']['mean']:.2f} ± {means['LoRA uniform']['std']:.2f}, RankAdaptor "
         f"{means['LoRA rankadaptor']['mean']:.2f} ± {means['LoRA rankadaptor']['std']:.2f} "
         f"({means['LoRA rankadaptor']['seeds']} seeds", "recovery.json"),
        (f"{abs(gain):.1%} {'lower' if gain >= 0 else 'higher'}", "recovery.json"),
        (f"spread between {noise['configs']} configurations {noise['config_std']:.4f}", "recovery.json"),
        (f"over {noise['seeds']} seeds {noise['seed_std']:.4f} (ratio {noise['signal_to_noise']:.2f})",
         "recovery.json"),
        (f"({adaptive['search_runs']} measured configurations, {adaptive['search_seconds']:.0f} s", "recovery.json"),
        (f"perplexity {none['domain_ppl']:.2f} / {none['general_ppl']:.2f}", "recovery.json"),
        (f"value: {none['domain_ppl']:.4f}, name: domain perplexity", "recovery.json"),
        (f"| pruned | {none['general_ppl']:.2f} | {none['domain_ppl']:.2f} |", "recovery.json"),
        (f"| dense | {dense['general_ppl']:.2f} | {dense['domain_ppl']:.2f} |", "full.json"),
    ]

    pat = _results("pat")
    pat_bench = load_script("pat")
    settings = pat["settings"]
    text = pat_bench.markdown(pat["runs"], settings, pat["curves"])
    figures += [(line, "pat.json") for line in text.splitlines()
                if line.startswith("| ") and not line.startswith(("| method", "|---", "| pruning ratio"))]
    figures += [(goal, "pat.json") for goal in pat_bench.goals(pat["runs"], settings)]
    p = {r["method"]: r for r in pat["runs"]}
    small, big = p[pat_bench.pat_label(settings)], p["dense"]
    paper = p[pat_bench.pat_label(settings, " (paper: mask from zeros)")]
    figures += [
        (f"{pat['seconds'] / 60:.0f} minutes on", "pat.json"),
        (f"hidden {big['hidden_size']} → {small['hidden_size']}", "pat.json"),
        (f"({small['checkpoint_bytes'] / 2**20:.0f} vs {big['checkpoint_bytes'] / 2**20:.0f} MiB)", "pat.json"),
        (f"{small['parameters'] / 1e6:.1f}M parameters against {big['parameters'] / 1e6:.1f}M", "pat.json"),
        (f"mask collapses at this learning rate ({paper['domain_ppl']:.2f}", "pat.json"),
        (f"it is {small['tokens_per_s_prefill'] / big['tokens_per_s_prefill']:.2f}× faster to prefill", "pat.json"),
    ]
    return figures


def test_readme_figures_are_the_results_files_figures():
    documented = documented_text()
    missing = [f"{source}: {text}" for text, source in readme_figures() if " ".join(text.split()) not in documented]
    assert not missing, ("README/docs figures that differ from their results file (update README.md or docs/*.md):\n"
                         + "\n".join(missing))
