"""The side-by-side benchmark: its report logic on fabricated rows, and the quick mode end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from testing_utils import text

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, domain_ppl, general_ppl, seconds):
    return {"domain": "medical", "sparsity": "0.5", "method": method, "domain_ppl": domain_ppl,
            "general_ppl": general_ppl, "prune_seconds": seconds, "peak_rss_mib": 1000.0}


def test_goals_and_table_from_rows():
    bench = load_benchmark()
    rows = [row("dense", 20, 40, 0), row("wanda", 60, 100, 5), row("sparsegpt", 50, 90, 20),
            row("cross-calibration", 54, 70, 30), row("dpruner", 45, 93, 60), row("dpruner-recon", 42, 69, 70)]
    goals = "\n".join(bench.goals(rows))
    # the best peer is SparseGPT (50); cross-calibration is within 10% of it, so its 70 is the reference general
    assert "best peer sparsegpt (domain 50.00); reference general 70.00 (cross-calibration)" in goals
    assert "dpruner-recon: domain 42.00 = 0.840x the best peer (goal <= 0.85: met)" in goals
    assert "general 69.00 (goal <= 70.00: met); time 3.50x SparseGPT (goal <= 3x: MISSED)" in goals
    assert "dpruner (the paper's recipe): domain 45.00 = 0.900x the best peer" in goals
    rows[2]["domain_ppl"] = 62.0  # now Wanda is the best peer and cross-calibration is not within 10% of it
    goals = "\n".join(bench.goals(rows))
    assert "best peer cross-calibration (domain 54.00); reference general 70.00" in goals
    table = bench.markdown(rows, {"num_samples": 4, "seq_len": 128, "eval_tokens": 2048, "eval_seq_len": 256})
    assert "| medical | 0.5 | dpruner-recon | 42.00 | 69.00 | 70.0 | 3.50 | 1000 |" in table


@pytest.mark.slow
def test_quick_benchmark_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "quick.json").read_text())
    assert results["metadata"]["groups"] == [["medical", "0.5"]] and results["earlier_runs"] == []
    assert results["metadata"]["cli_args"]["quick"] is True and results["metadata"]["cpu_count"] >= 1
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"dense", "magnitude", "wanda", "sparsegpt", "cross-calibration", "dpruner-recon", "dpruner",
                         "dpruner-cached"}  # no OWL variant at 50%
    assert runs["dense"]["domain_ppl"] < runs["sparsegpt"]["domain_ppl"] < runs["magnitude"]["domain_ppl"]
    # the cached run reads G instead of computing it, and prunes to the same model
    general_seconds = [runs[m]["stage_seconds"]["general_importance"] for m in ("dpruner-cached", "dpruner")]
    assert general_seconds[0] < 0.1 * general_seconds[1]
    assert runs["dpruner-cached"]["domain_ppl"] == runs["dpruner"]["domain_ppl"]
    assert "| medical | 0.5 | wanda |" in (tmp_path / "quick.md").read_text()
    assert (tmp_path / "quick_domain_vs_general.png").stat().st_size > 10_000


def test_recovery_report_states_the_goal_from_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_recovery", SCRIPT.with_name("recovery.py"))
    recovery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recovery)
    def row(method, domain, seed=0, ranks=(8, 8), search=0.0, **extra):
        return {"method": method, "seed": seed, "domain_ppl": domain, "general_ppl": 110.0, "lora_parameters": 1000,
                "layer_ranks": list(ranks), "search_seconds": search, "train_seconds": 30.0, "search_runs": 9, **extra}

    rows = [
        {"method": "no recovery", "seed": None, "domain_ppl": 50.0, "general_ppl": 120.0, "lora_parameters": 0,
         "layer_ranks": None, "search_seconds": 0.0, "train_seconds": 0.0},
        row("LoRA uniform", 40.0), row("LoRA rankadaptor", 38.0, ranks=(12, 4), search=300.0),
        row("LoRA uniform", 42.0, seed=1), row("LoRA rankadaptor", 38.0, seed=1, ranks=(12, 4)),
    ]
    text = recovery.markdown(rows, recovery.SETTINGS, "ckpt")
    assert "| LoRA rankadaptor | 0 | 38.00 | 110.00 | 1,000 | 300 | 30 |" in text
    # means over the seeds: 41.00 +- 1.41 against 38.00 +- 0.00
    assert "uniform 41.00 ± 1.41, RankAdaptor 38.00 ± 0.00 (2 seeds" in text
    assert "7.3% lower — met" in text and "[12, 4]" in text
    assert "RankAdaptor search: 9 short runs, 300 s, against 30 s for the final training." in text
    rows[2]["domain_ppl"] = rows[4]["domain_ppl"] = 41.0 * 0.99  # 1% lower: under the 2% of the goal
    assert "1.0% lower — MISSED" in recovery.markdown(rows, recovery.SETTINGS, "ckpt")
    rows[2]["domain_ppl"] = rows[4]["domain_ppl"] = 43.05
    assert "5.0% higher — MISSED" in recovery.markdown(rows, recovery.SETTINGS, "ckpt")
    rows.insert(0, {"method": "dense", "seed": None, "domain_ppl": 30.0, "general_ppl": 60.0, "lora_parameters": 0,
                    "layer_ranks": None, "search_seconds": 0.0, "train_seconds": 0.0})
    rows.append(row("LoRA uniform + distillation 0.5", 36.0))
    text = recovery.markdown(rows, recovery.SETTINGS, "ckpt")
    assert ("Best recovery (distillation: LoRA uniform + distillation 0.5, seed 0): domain perplexity 1.20x the dense "
            "model's (goal of the chain with distillation: <= 1.3x within 100 steps) — met at 40 steps.") in text
    assert "Best recovery (any: LoRA uniform + distillation 0.5, seed 0): domain perplexity 1.20x" in text
    rows[3]["search_noise"] = {"configs": 8, "config_std": 0.01, "seeds": 3, "seed_std": 0.02, "signal_to_noise": 0.5}
    assert ("spread between 8 configurations 0.0100, spread of one configuration over 3 seeds 0.0200 (ratio 0.50)"
            in recovery.markdown(rows, recovery.SETTINGS, "ckpt"))
    recovery.plot(rows, tmp_path / "recovery.png")  # rows without ranks (dense, no recovery) are left off the right
    assert (tmp_path / "recovery.png").stat().st_size > 5_000


def load_pat_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_pat", SCRIPT.with_name("pat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pat_row(method, hidden, domain_ppl, b1, b8, prefill=1000.0, intermediate=1536):
    return {"method": method, "hidden_size": hidden, "intermediate_size": intermediate, "domain_ppl": domain_ppl,
            "general_ppl": 2 * domain_ppl,
            "parameters": 134_515_008, "nonzero_parameters": 134_000_000, "checkpoint_bytes": 538 * 2**20,
            "tokens_per_s_batch1": b1, "tokens_per_s_batch8": b8, "tokens_per_s_prefill": prefill,
            "train_seconds": 100.0}


def test_pat_report_states_every_goal_from_rows():
    bench = load_pat_benchmark()
    settings = bench.MODES["full"]
    rows = [pat_row("dense", 576, 20.0, 10.0, 40.0), pat_row("dense + LoRA", 576, 15.0, 10.0, 40.0),
            pat_row("PAT 25%", 432, 24.0, 13.0, 48.0, prefill=1300.0),
            pat_row("one-shot 25% + LoRA", 432, 30.0, 13.0, 48.0)]
    goals = bench.goals(rows, settings)
    assert goals[0] == "PAT tokens/s, decoding at batch 8: 1.20x the dense model (goal >= 1.25x) — MISSED."
    assert goals[1] == "PAT tokens/s, 512-token prefill: 1.30x the dense model (goal >= 1.25x) — met."
    assert goals[2] == "PAT tokens/s, decoding at batch 1: 1.30x the dense model (goal >= 1.25x) — met."
    assert goals[3] == "PAT domain perplexity 1.60x dense + LoRA's (goal <= 1.5x) — MISSED."
    assert goals[4] == ("PAT domain perplexity 20.0% lower than the best one-shot peer's (one-shot 25% + LoRA; goal "
                        ">= 10% lower) — met.")
    rows[3]["domain_ppl"] = 20.0
    assert bench.goals(rows, settings)[4] == ("PAT domain perplexity 20.0% higher than the best one-shot peer's "
                                              "(one-shot 25% + LoRA; goal >= 10% lower) — MISSED.")
    rows.append(pat_row("one-shot 25% + compensation + LoRA", 432, 16.0, 13.0, 48.0))  # the better peer counts
    assert bench.goals(rows, settings)[4] == ("PAT domain perplexity 50.0% higher than the best one-shot peer's "
                                              "(one-shot 25% + compensation + LoRA; goal >= 10% lower) — MISSED.")
    rows.pop()
    assert len(goals) == 5  # no neuron PAT row: no goals for it
    rows.append(pat_row(bench.NEURON_PAT_LABEL, 576, 21.0, 12.0, 44.0, intermediate=887))
    neuron_goals = bench.goals(rows, settings)[5:]
    assert neuron_goals[0] == ("PAT on MLP neurons tokens/s, decoding at batch 8: 1.10x the dense model (goal >= "
                               "1.25x) — MISSED.")
    assert neuron_goals[3] == "PAT on MLP neurons domain perplexity 1.40x dense + LoRA's (goal <= 1.5x) — met."
    assert neuron_goals[4] == ("PAT on MLP neurons domain perplexity 5.0% higher than the best one-shot peer's "
                               "(one-shot 25% + LoRA; goal >= 10% lower) — MISSED.")
    rows.append(pat_row(bench.RECIPE_LABEL, 576, 16.0, 12.0, 44.0, intermediate=887))
    recipe_goals = bench.goals(rows, settings)[10:]
    assert recipe_goals[3] == ("The default recipe (PATConfig()) domain perplexity 1.07x dense + LoRA's (goal <= "
                               "1.5x) — met.")
    assert recipe_goals[4] == ("The default recipe (PATConfig()) domain perplexity 20.0% lower than the best one-shot "
                               "peer's (one-shot 25% + LoRA; goal >= 10% lower) — met.")
    rows.pop()
    curve = {"steps": [{"pruning_ratio": 0.25, "steps": 40, "hidden_size": 432, "domain_ppl": 50.0,
                        "general_ppl": 90.0, "train_seconds": 80.0}],
             "ratios": [{"pruning_ratio": 0.1, "steps": 100, "hidden_size": 518, "domain_ppl": 30.0,
                         "general_ppl": 60.0, "train_seconds": 200.0}]}
    table = bench.markdown(rows, settings, curve)
    assert "| PAT 25% | 432 | 1536 | 24.00 | 48.00 | 134.5M | 538 | 13.0 | 48.0 | 1300 | 100 |" in table
    assert f"| {bench.NEURON_PAT_LABEL} | 576 | 887 | 21.00 |" in table
    assert "| 25% | 40 | 432 | 50.00 | 90.00 | 80 |" in table and "| 10% | 100 | 518 | 30.00 | 60.00 | 200 |" in table


@pytest.mark.slow
def test_quick_pat_benchmark_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("pat.py")), "--quick", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "pat-quick.json").read_text())
    assert results["metadata"]["cli_args"]["quick"] is True and results["metadata"]["torch_threads"] >= 1
    runs = {r["method"]: r for r in results["runs"]}
    small = ["PAT 25%", "PAT 25% (paper: mask from zeros)", "PAT 25% + KD 0.5", "one-shot 25% + LoRA",
             "one-shot 25% + compensation + LoRA"]
    mlp = runs.pop("one-shot MLP neurons (same parameters) + compensation + LoRA")
    neuron_pat = runs.pop("PAT on MLP neurons (same parameters)")
    recipe = runs.pop("MLP neurons, OBS + reconstruction + LoRA (same parameters)")
    assert set(runs) == {"dense", "dense + LoRA", "dense + LoRA (lr 0.005)", *small}
    assert runs["dense"]["hidden_size"] == 576 and all(runs[name]["hidden_size"] == 432 for name in small)
    assert all(runs[name]["parameters"] < runs["dense"]["parameters"] for name in small)
    # the MLP peer keeps the hidden size and removes as many parameters (to a neuron's worth) as width pruning
    assert mlp["hidden_size"] == 576 and abs(mlp["parameters"] - runs["PAT 25%"]["parameters"]) <= 3 * 576 * 30 / 2
    # PAT on the neuron axis ends at the same size as the one-shot MLP peer
    assert (neuron_pat["hidden_size"], neuron_pat["intermediate_size"], neuron_pat["parameters"]) == \
        (576, mlp["intermediate_size"], mlp["parameters"])
    assert (recipe["hidden_size"], recipe["intermediate_size"], recipe["parameters"]) == \
        (576, mlp["intermediate_size"], mlp["parameters"])
    assert recipe["domain_ppl"] > 1 and recipe["general_ppl"] > 1
    assert runs["PAT 25%"]["checkpoint_bytes"] < runs["dense"]["checkpoint_bytes"]
    assert all(r["tokens_per_s_prefill"] > 0 and r["domain_ppl"] > 1 for r in runs.values())
    curves = results["curves"]
    assert [p["steps"] for p in curves["steps"]] == [2, 4]
    assert [p["hidden_size"] for p in curves["ratios"]] == [432, 288]
    assert "PAT tokens/s, decoding at batch 1" in (tmp_path / "pat-quick.md").read_text()
    assert (tmp_path / "pat-quick.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_memory_benchmark_measures_every_stage_and_the_held_buffers(tmp_path):
    script = SCRIPT.with_name("memory.py")
    variants = ["default", "score-pass-bf16", "dpruner-recon"]
    done = subprocess.run([sys.executable, str(script), "--quick", "--variants", *variants,
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "memory-quick.json").read_text())
    assert results["settings"] == {"variants": variants, "quick": True, "release_freed": False}
    assert results["metadata"]["cli_args"]["variants"] == variants
    runs = {r["variant"]: r for r in results["runs"]}
    assert list(runs) == variants and results["activations_mib"] > 0
    for name, run in runs.items():
        stages = ["load", "prune", "save"] if name == "dpruner-recon" else [
            "load", "general_importance", "domain_importance", "masks", "save"]
        assert list(run["stages"]) == stages
        assert run["run_peak_mib"] >= run["baseline_mib"] > 0
    recipe = runs["dpruner-recon"]  # the registry method ran: its masks are in the run, no trainer buffers
    assert recipe["sparsity"] == pytest.approx(0.5) and "holders_after_domain_mib" not in recipe
    default, lean = runs["default"]["holders_after_domain_mib"], runs["score-pass-bf16"]["holders_after_domain_mib"]
    targets = default["S (domain scores)"]
    assert targets > 0 and default["W0 (regularizer.reference)"] == targets  # fp32, one buffer per target weight
    assert lean["S (domain scores)"] == pytest.approx(targets / 2, abs=0.15)  # bfloat16
    assert lean["G (trainer.general_importance)"] == pytest.approx(targets / 2, abs=0.15)
    assert lean["W0 (regularizer.reference)"] == 0  # the score pass never moves the weights
    assert default["G in the regularizer (beyond the shared G)"] == 0  # shared, not copied
    assert "Goal (whole run <= 3x model size + activations" in (tmp_path / "memory-quick.md").read_text()
    assert (tmp_path / "memory-quick.png").stat().st_size > 10_000


def test_cli_benchmark_measures_the_commands_on_a_tiny_model(tiny_model_dir, tmp_path):  # noqa: F811
    """benchmarks/cli.py end to end on a tiny Llama with a word tokenizer and text files (no real model)."""
    for seed, name in enumerate(("general", "domain", "other")):
        (tmp_path / f"{name}.txt").write_text(text(seed, 400))
    prune = (f"--model {tiny_model_dir} --general-data {tmp_path / 'general.txt'} "
             f"--domain-data {tmp_path / 'domain.txt'} --num-samples 4 --seq-len 16")
    evaluate = (f"--baseline-model {tiny_model_dir} --general-data {tmp_path / 'general.txt'} "
                f"--domain-data {tmp_path / 'domain.txt'} --seq-len 32")
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("cli.py")), "--variants", "score-pass",
                           "--other-domains", str(tmp_path / "other.txt"), "--extra-prune-args", prune,
                           "--extra-eval-args", evaluate, "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "cli.json").read_text())
    assert results["metadata"]["cli_args"]["variants"] == ["score-pass"] and results["metadata"]["cpu_count"] >= 1
    (run,) = results["runs"]
    assert run["flags"] == ["--domain-pass", "score"] and run["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert {"general_importance", "domain_importance", "save"} <= set(run["stage_seconds"])
    assert run["peak_rss_mib"] > 100 and run["prune_seconds"] > 0
    other = run["other_domains_ppl"][str(tmp_path / "other.txt")]
    assert run["domain_ppl"] > 1 and run["dense_domain_ppl"] > 1 and other > 1 and other != run["domain_ppl"]
    assert "| score-pass | `--domain-pass score` |" in (out / "cli.md").read_text()
