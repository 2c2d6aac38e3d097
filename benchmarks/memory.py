"""Memory benchmark: peak resident memory (RSS) of each stage of a pruning run vs the model's fp32 size.

    python benchmarks/memory.py                                # the embedded SmolLM2-135M, variant "default"
    python benchmarks/memory.py --variants default score-pass  # several variants, each in a fresh process
    python benchmarks/memory.py --variants dpruner-recon sparsegpt  # registry methods (the default recipe)
    python benchmarks/memory.py --quick                        # CI-sized: a tiny random Llama (seconds)

D-Pruner's stages: load (model, tokenizer, texts, trainer with its tokenized windows), general_importance,
domain_importance, masks (the rest of `DPrunerTrainer.prune()`) and save. A registry method's stages (variants
``dpruner-recon``, ``sparsegpt``): load (model, tokenizer, calibration windows), prune (the method's ``prune`` on
the windows) and save (masks attached, checkpoint written). A thread samples RSS every 20 ms; a stage's peak is
raised to the kernel's high-water mark when that grew during it. Memory is counted above the baseline (the process
after importing the libraries); "activations" (one calibration micro-batch) is measured in a process of its own.
Goal: whole run <= 3x the fp32 model + activations. D-Pruner variants: default, score-pass
(``domain_pass="score"``), bf16-importance (``importance_dtype="bfloat16"``), score-pass-bf16 (both). Writes
``<output-dir>/memory[-quick].json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # run as a script or loaded by path from the tests
    sys.path.insert(0, str(_HERE))
from _meta import finish_metadata, run_worker_process, start_metadata  # noqa: E402

STAGES = ("load", "general_importance", "domain_importance", "masks", "save")
METHOD_STAGES = ("load", "prune", "save")
VARIANTS: dict[str, dict[str, Any]] = {  # DPrunerConfig overrides of a D-Pruner run
    "default": {}, "score-pass": {"domain_pass": "score"}, "bf16-importance": {"importance_dtype": "bfloat16"},
    "score-pass-bf16": {"domain_pass": "score", "importance_dtype": "bfloat16"},
}
METHODS = ("dpruner-recon", "sparsegpt")  # registry methods measured as variants of their own
QUICK = dict(num_samples=8, seq_len=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512)
MIB = 2**20
RELEASE_FREED = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


def rss_bytes(field: str = "VmRSS") -> int:
    """Current resident set size of this process (``RssFile``: its file-backed part)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


class StageSampler:
    """Samples RSS in a background thread and keeps the peak, end RSS and wall time of each named stage."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.current, self.peaks = interval, "", {}
        self.stages: dict[str, dict[str, float]] = {}
        threading.Thread(target=self._run, daemon=True).start()  # ends with the worker process

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), rss_bytes())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        hwm_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter()
        self.current, self.peaks[name] = name, rss_bytes()
        yield
        end_rss, hwm = rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(self.peaks[name], end_rss, hwm if hwm > hwm_before else 0)  # the high-water mark grew here
        self.stages[name] = {"peak_mib": peak / MIB, "end_mib": end_rss / MIB,
                             "end_file_mib": rss_bytes("RssFile") / MIB, "seconds": time.perf_counter() - start}
        self.current = ""


def unique_mib(tensors, seen: set[int]) -> float:
    """MiB of the storages of `tensors` not yet in `seen` (tied or shared tensors counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    total = sum(size for ptr, size in storages.items() if ptr not in seen)
    seen.update(storages)
    return total / MIB


def holders(trainer) -> dict[str, float]:
    """MiB the trainer holds after the domain stage, per holder, each storage counted once, in this order."""
    seen: set[int] = set()
    reg, dom, opt = trainer.regularizer, trainer.domain_importance, trainer.optimizer
    items = {
        "model parameters": list(trainer.model.parameters()),
        "G (trainer.general_importance)": list((trainer.general_importance or {}).values()),
        "G in the regularizer (beyond the shared G)": list(reg.importance.values()) if reg else [],
        "W0 (regularizer.reference)": list(reg.reference.values()) if reg else [],
        "S (domain scores)": list(dom.scores.values()) if dom else [],
        "_other_reference": list(trainer.pruning_state.reference.values()),  # W0 of the other trainable weights
        "gradients still held": [p.grad for p in trainer.model.parameters()],
        "optimizer state": [v for st in (opt.state.values() if opt else []) for v in st.values()
                            if hasattr(v, "shape")],
    }
    return {name: round(unique_mib(tensors, seen), 1) for name, tensors in items.items()}


def load_inputs(quick: bool, config) -> tuple[Any, Any, Any, Any]:
    """Model, tokenizer, general and domain data: the embedded model and corpora, or a tiny random Llama."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_dpruner.corpora import DOMAIN_CORPORA, GENERAL_CORPUS, load_corpus_texts
    from hf_dpruner.resources import default_model_path

    if not quick:
        path = default_model_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return (model, AutoTokenizer.from_pretrained(path), load_corpus_texts(GENERAL_CORPUS),
                load_corpus_texts(DOMAIN_CORPORA["medical"]))
    torch.manual_seed(0)
    sizes = {k: v for k, v in QUICK.items() if k not in ("num_samples", "seq_len")}
    model = LlamaForCausalLM(LlamaConfig(**sizes, num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, QUICK["vocab_size"], (2, config.num_samples, config.seq_len)).tolist()
    return (model, None, *(Dataset.from_dict({"input_ids": rows}) for rows in ids))


def worker(variant: str, quick: bool) -> dict[str, Any]:
    """One D-Pruner run (or registry method run, for a variant in `METHODS`), stage by stage, in this (fresh)
    process."""
    sampler = StageSampler()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    baseline_torch = rss_bytes() / MIB
    import datasets  # noqa: F401

    from hf_dpruner import DPrunerConfig, DPrunerTrainer
    from hf_dpruner.commands.prune import PruneTrainingArguments

    baseline = rss_bytes() / MIB
    method = variant in METHODS
    overrides = {"method": variant} if method else VARIANTS.get(variant, {})
    missing = set() if method else set(overrides) - set(DPrunerConfig.__dataclass_fields__)
    if missing:
        return {"variant": variant, "skipped": f"DPrunerConfig has no field {', '.join(sorted(missing))} yet"}
    config = DPrunerConfig(**({k: QUICK[k] for k in ("num_samples", "seq_len")} if quick else {}),
                           **({} if method else overrides))
    folder = tempfile.mkdtemp(prefix="bench-memory-")
    with sampler.stage("load"):
        model, tokenizer, general, domain = load_inputs(quick, config)
        if method:
            windows = calibration_windows(quick, config, tokenizer, domain, general)
        else:
            args = PruneTrainingArguments(output_dir=folder, report_to="none", disable_tqdm=True,
                                          logging_strategy="no", save_strategy="no")
            trainer = DPrunerTrainer(model=model, args=args, dpruner_config=config, train_dataset=domain,
                                     general_dataset=general, processing_class=tokenizer)
    model_mib = sum(p.numel() * 4 for p in model.parameters()) / MIB  # parameters() yields tied weights once
    result: dict[str, Any] = {"variant": variant, "config": overrides, "baseline_torch_mib": baseline_torch,
                              "baseline_mib": baseline, "model_fp32_mib": model_mib}
    if method:
        result["sparsity"] = method_stages(variant, model, windows, config, folder, sampler)
    elif variant == "activations":
        result["activations_mib"] = activations(trainer, sampler)
    else:
        with sampler.stage("general_importance"):
            trainer.compute_general_importance()
        with sampler.stage("domain_importance"):
            trainer.compute_domain_importance()
        result["holders_after_domain_mib"] = holders(trainer)
        with sampler.stage("masks"):  # prune() reuses G; its domain stage is stubbed to return the scores above
            trainer.compute_domain_importance = lambda *_: trainer.domain_importance.scores
            trainer.prune()
        with sampler.stage("save"):
            trainer.model.save_pretrained(folder)
    shutil.rmtree(folder, ignore_errors=True)
    result["stages"] = sampler.stages
    result["run_peak_mib"] = max(s["peak_mib"] for s in sampler.stages.values())
    return result


def calibration_windows(quick: bool, config, tokenizer, domain, general) -> list[list[dict]]:
    """The domain and the general calibration batches a registry method gets: the random windows one per batch
    (quick), or as `PruningMethod.run` builds them with the benchmark's batch size (1) and seed (0)."""
    import torch

    from hf_dpruner.data import calibration_batches

    if quick:
        return [[{"input_ids": torch.tensor([row])} for row in data["input_ids"]] for data in (domain, general)]
    return [calibration_batches(texts, tokenizer, config.seq_len, config.num_samples, 1, 0)
            for texts in (domain, general)]


def method_stages(method: str, model, windows: list[list[dict]], config, folder: str,
                  sampler: StageSampler) -> float:
    """The registry method's prune and save stages (domain + general windows, as the benchmark gives every
    method); returns the overall sparsity of its masks."""
    from hf_dpruner.masks import sparsity_report
    from hf_dpruner.methods import get_method
    from hf_dpruner.modeling import make_pruned

    with sampler.stage("prune"):
        masks = get_method(method).prune(model, windows[0], config, general_batches=windows[1], disable_tqdm=True)
    with sampler.stage("save"):
        make_pruned(model, masks, config, {"method": method})
        model.save_pretrained(folder)
    return sparsity_report(masks)["overall"]


def activations(trainer, sampler: StageSampler) -> float:
    """MiB of one calibration micro-batch's activations: held after the forward, or fwd+bwd peak less grads."""
    import torch

    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():  # page in the memory-mapped weights first: they are not activations
        sum(float(p.sum()) for p in model.parameters())
    model.train()
    with sampler.stage("forward"):
        before = rss_bytes() / MIB
        loss = model(**batch).loss
        held = rss_bytes() / MIB - before
    with sampler.stage("backward"):
        loss.backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None) / MIB
    return max(held, sampler.stages["backward"]["peak_mib"] - before - grads)


def run_worker(variant: str, quick: bool, env: dict[str, str]) -> dict[str, Any]:
    """`worker` in a fresh interpreter, so that no peak leaks between variants."""
    return run_worker_process(__file__, ["--worker", variant] + (["--quick"] if quick else []),
                              {"TOKENIZERS_PARALLELISM": "false", **env})


def markdown(runs: list[dict], act: float, skipped: list[dict], quick: bool, malloc: str) -> str:
    """The stage table, one goal line per variant and the holders of the domain stage."""
    skips = [f"- {s['variant']}: skipped ({s['skipped']})" for s in skipped]
    if not runs:
        return "\n".join(["No variant ran.", *skips]) + "\n"
    r0, model = runs[0], runs[0]["model_fp32_mib"]
    lines = [f"{'Tiny random Llama (quick mode)' if quick else 'Embedded SmolLM2-135M-Instruct'}, fp32 model "
             f"{model:.1f} MiB (tied weights once); activations of one calibration micro-batch {act:.0f} MiB. "
             f"Baseline: RSS after importing torch, transformers, datasets and hf_dpruner {r0['baseline_mib']:.0f} "
             f"MiB (torch + transformers alone {r0['baseline_torch_mib']:.0f}). Allocator: {malloc}. `masks` is the "
             "rest of `prune()` with the domain scores already computed. The weights are a copy-on-write map of the "
             "safetensors file: resident (file-backed) once read, anonymous once the domain pass writes them.", "",
             "| variant | stage | peak RSS (MiB) | above baseline | x model | end RSS | of it file-backed | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for name, st in r["stages"].items():
            above = st["peak_mib"] - r["baseline_mib"]
            lines.append(f"| {r['variant']} | {name} | {st['peak_mib']:.0f} | {above:.0f} | {above / model:.2f} | "
                         f"{st['end_mib']:.0f} | {st['end_file_mib']:.0f} | {st['seconds']:.1f} |")
    lines += ["", "Goal (whole run <= 3x model size + activations, above baseline):"]
    for r in runs:
        above = r["run_peak_mib"] - r["baseline_mib"]
        lines.append(f"- {r['variant']}: run peak {above:.0f} MiB above baseline = {above / model:.2f}x the model; "
                     f"goal <= {3 * model + act:.0f} MiB: {'met' if above <= 3 * model + act else 'MISSED'}")
    lines += skips
    held = [r for r in runs if "holders_after_domain_mib" in r]  # D-Pruner's runs
    if held:
        lines += ["", "Tensors held after the domain stage (MiB, each storage once; gradients, activations and "
                  "the penalty's gradient buffers are transient within the stage):", "",
                  f"| holder | {' | '.join(r['variant'] for r in held)} |", "|---" * (len(held) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{r['holders_after_domain_mib'][name]:.1f}" for r in held) + " |"
                  for name in held[0]["holders_after_domain_mib"]]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], act: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = (*STAGES[:-1], *METHOD_STAGES[1:])  # load, D-Pruner's stages, prune, save
    stages = [s for s in order if any(s in r["stages"] for r in runs)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(runs), 1)
    for i, r in enumerate(runs):
        at = [j for j, s in enumerate(stages) if s in r["stages"]]
        values = [r["stages"][stages[j]]["peak_mib"] - r["baseline_mib"] for j in at]
        ax.bar([j + (i - (len(runs) - 1) / 2) * width for j in at], values, width=width, label=r["variant"])
    model = runs[0]["model_fp32_mib"]
    ax.axhline(3 * model, color="grey", linestyle="--", linewidth=1, label=f"3x model ({3 * model:.0f} MiB)")
    ax.axhline(3 * model + act, color="black", linestyle=":", linewidth=1, label="3x model + activations")
    ax.set_xticks(range(len(stages)), stages)
    ax.set(ylabel="peak RSS above baseline (MiB)", title=f"Pruning memory per stage (fp32 model {model:.0f} MiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run on a tiny random Llama.")
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted((*VARIANTS, *METHODS)))
    parser.add_argument("--release-freed", action="store_true",
                        help="Make glibc return freed memory at once, so that RSS tracks live memory.")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args.quick), indent=2))
        return 0
    metadata = start_metadata(__file__, args, argv)
    env = {"GLIBC_TUNABLES": RELEASE_FREED} if args.release_freed else {}
    malloc = f"GLIBC_TUNABLES={RELEASE_FREED}, RSS tracks live memory" if env else "default glibc malloc"
    act = run_worker("activations", args.quick, env)["activations_mib"]
    results = [run_worker(v, args.quick, env) for v in args.variants]
    skipped = [r for r in results if "skipped" in r]
    runs = [r for r in results if "skipped" not in r]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "memory" + ("-quick" if args.quick else "") + ("-release-freed" if env else "")
    settings = {"variants": args.variants, "quick": args.quick, "release_freed": args.release_freed}
    summary = {"metadata": finish_metadata(metadata), "settings": settings, "malloc": malloc, "activations_mib": act,
               "runs": runs, "skipped": skipped}
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(runs, act, skipped, args.quick, malloc))
    if runs:
        plot(runs, act, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
