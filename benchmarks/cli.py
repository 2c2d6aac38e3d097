"""Command-line benchmark: the quick start's `hf-dpruner prune` + `hf-dpruner eval`, as a user runs them, for the
domain-pass / importance-dtype variants of docs/scale.md, on the embedded SmolLM2-135M.

    python benchmarks/cli.py                                   # the 4 variants, medical, 50%, seed 42
    python benchmarks/cli.py --tasks dpruner_mmlu_medical   # + MMLU on the default variant (the lm-eval extra)

Each variant runs ``hf-dpruner prune --domain medical --sparsity 0.5 --seed 42 [flags] --output-dir D`` in a fresh
process with the CLI's defaults (its resume checkpoints included): wall time, the time per stage it prints and the
peak RSS of that process (imports included). Then ``hf-dpruner eval D`` (domain and general perplexity of the pruned
and the dense model, eval defaults: first 16,384 tokens of each eval split, windows of 512) and, for each of
``--other-domains``, the pruned model's perplexity on that corpus. ``--tasks`` runs lm-eval tasks in the default
variant's eval. Writes ``<output-dir>/cli.json`` and ``cli.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # run as a script or loaded by path from the tests
    sys.path.insert(0, str(_HERE))
from _meta import finish_metadata, start_metadata  # noqa: E402

VARIANTS = {
    "default": [],
    "bf16-importance": ["--importance-dtype", "bfloat16"],
    "score-pass": ["--domain-pass", "score"],
    "score-pass-bf16": ["--domain-pass", "score", "--importance-dtype", "bfloat16"],
}
CLI = [sys.executable, "-m", "hf_dpruner.commands.cli"]
STAGE_LINE = re.compile(r"^time: (\S+)\s+([0-9.]+) s$")


def run_measured(cmd: list[str]) -> tuple[str, float, float]:
    """Runs `cmd` (stderr passed through): its stdout, wall seconds and the peak RSS (MiB) of that one process."""
    start = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would mix the variants)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed with exit code {proc.returncode}:\n{stdout[-3000:]}")
    return stdout, time.perf_counter() - start, usage.ru_maxrss / 1024


def stage_seconds(prune_stdout: str) -> dict[str, float]:
    """The time per stage from the summary table that `hf-dpruner prune` prints."""
    return {m.group(1): float(m.group(2)) for m in map(STAGE_LINE.match, prune_stdout.splitlines()) if m}


def measure_variant(name: str, args: argparse.Namespace, folder: Path) -> dict:
    out = folder / f"smollm2-{args.domain}-{name}"
    prune = [*CLI, "prune", "--method", "dpruner", "--domain", args.domain, "--sparsity", str(args.sparsity),
             "--seed", str(args.seed), *VARIANTS[name], *shlex.split(args.extra_prune_args), "--output-dir", str(out),
             "--disable-tqdm", "true"]
    print(f"[cli] {name}: {shlex.join(prune[2:])}", file=sys.stderr, flush=True)
    stdout, seconds, peak_mib = run_measured(prune)
    tasks = ["--tasks", *args.tasks] if args.tasks and name == "default" else []
    run_measured([*CLI, "eval", str(out), *tasks, *shlex.split(args.extra_eval_args)])
    evaluated = json.loads((out / "eval_results.json").read_text())
    pruned, dense = evaluated["models"]["pruned"], evaluated["models"].get("dense", {})
    row = {"variant": name, "flags": VARIANTS[name], "prune_seconds": seconds, "stage_seconds": stage_seconds(stdout),
           "peak_rss_mib": peak_mib, "domain_ppl": pruned["domain"]["perplexity"],
           "general_ppl": pruned["general"]["perplexity"],
           "dense_domain_ppl": dense.get("domain", {}).get("perplexity"),
           "dense_general_ppl": dense.get("general", {}).get("perplexity"),
           "eval_settings": evaluated["settings"], "other_domains_ppl": {}}
    if tasks:
        row["lm_eval"] = {label: model.get("lm_eval") for label, model in evaluated["models"].items()}
    for other in args.other_domains:
        target = folder / f"eval-{name}-{other}.json"
        run_measured([*CLI, "eval", str(out), *shlex.split(args.extra_eval_args), "--no-baseline", "--domain-data",
                      other, "--output", str(target)])  # after the extra flags: this --domain-data wins
        row["other_domains_ppl"][other] = json.loads(target.read_text())["models"]["pruned"]["domain"]["perplexity"]
    record = json.loads((out / "pruning_config.json").read_text())
    row["achieved_sparsity"] = record["achieved_sparsity"]["overall"]
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def markdown(rows: list[dict], settings: dict) -> str:
    others = list(settings["other_domains"])
    lines = [f"`hf-dpruner prune --domain {settings['domain']} --sparsity {settings['sparsity']} --seed "
             f"{settings['seed']} [flags]` (CLI defaults, resume checkpoints included), then `hf-dpruner eval`. "
             "Peak RSS of the prune process, imports included; time: its wall time.", "",
             "| variant | flags | domain ppl | general ppl | " + "".join(f"{o} ppl | " for o in others)
             + "peak RSS (GiB) | time (s) | stages (s) |",
             "|---|---|---|---|" + "---|" * len(others) + "---|---|---|"]
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
        lines.append(f"| {r['variant']} | `{' '.join(r['flags']) or '(none)'}` | {r['domain_ppl']:.2f} | "
                     f"{r['general_ppl']:.2f} | " + "".join(f"{r['other_domains_ppl'][o]:.2f} | " for o in others)
                     + f"{r['peak_rss_mib'] / 1024:.1f} | {r['prune_seconds']:.0f} | {stages} |")
    dense = next((r for r in rows if r.get("dense_domain_ppl") is not None), None)
    if dense:
        lines += ["", f"Dense: domain ppl {dense['dense_domain_ppl']:.2f}, "
                      f"general ppl {dense['dense_general_ppl']:.2f}."]
    for r in rows:
        for label, scores in (r.get("lm_eval") or {}).items():
            for task, metrics in (scores or {}).items():
                values = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
                lines.append(f"- {r['variant']}, {label}: {task}: {values}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--domain", default="medical")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--other-domains", nargs="*", default=["legal"],
                        help="Corpora on which the pruned model's perplexity is measured too (default: legal).")
    parser.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks for the default variant's eval.")
    parser.add_argument("--extra-prune-args", default="", help="More `hf-dpruner prune` flags, as one string.")
    parser.add_argument("--extra-eval-args", default="", help="More `hf-dpruner eval` flags, as one string.")
    parser.add_argument("--keep", help="Keep the pruned checkpoints in this folder (default: a temporary one).")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    metadata = start_metadata(__file__, args, argv)
    settings = {k: getattr(args, k) for k in ("variants", "domain", "sparsity", "seed", "other_domains", "tasks",
                                              "extra_prune_args", "extra_eval_args")}
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-cli-"))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [measure_variant(name, args, folder) for name in args.variants]
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"metadata": finish_metadata(metadata), "settings": settings, "runs": rows,
               "seconds": time.perf_counter() - start}
    (out / "cli.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "cli.md").write_text(markdown(rows, settings))
    print((out / "cli.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
