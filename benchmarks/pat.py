"""PAT benchmark: dense + LoRA vs PAT (structured, smaller export) vs one-shot width pruning + LoRA, side by side.

    python benchmarks/pat.py            # the embedded SmolLM2-135M, medical, 25% of the hidden channels, 40 steps
    python benchmarks/pat.py --quick    # CI-sized (a few steps, short windows)

Every tuned model trains the same number of AdamW steps (bf16 autocast, float32 weights) on the same medical windows
with LoRA of the same rank at the same learning rate: dense + LoRA (also at a second learning rate, so the goals
compare against its best); PAT learning a mask on the hidden channels (the paper's axis, the mask started from
activation importance); PAT as in the paper (mask logits from zeros); PAT with distillation from the dense model
(when ``distill_weight`` is set: the quick run; left out of the full run to keep it near an hour); and the one-shot
structured peer (`hf_dpruner.pat.width_prune`: the channels of largest activation importance, chosen once, then the
same LoRA steps), also with least-squares compensation of the weights that read the residual stream
(``compensate=True``, fitted on the same calibration windows); and MLP-neuron pruning (`prune_mlp_neurons`, as many
parameters removed, down_proj refitted); PAT learning that many neurons per MLP (``PATConfig(axis="neurons",
strategy="learned")``) instead of hidden channels; and the structured recipe, the library's default
(``PATConfig(axis="neurons", strategy="one-shot")``: OBS neurons, block reconstruction, then the same LoRA steps).
Perplexity on the held-out eval splits; parameters and checkpoint size of the saved models; CPU throughput of every
saved model, loaded with ``from_pretrained`` in one fresh process (so the training before cannot tilt the timings),
interleaved, median of repeats: greedy decoding at batch 1 and 8, and the prefill of a long prompt. Two curves of
PAT (learned hidden-channel mask) on smaller steps (fewer tokens per step, to fit the time budget): domain
perplexity against the number of steps, and against the pruning ratio. Writes
``<output-dir>/pat[-quick][-partial].json``, ``.md`` and ``.png``.
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
from _meta import finish_metadata, run_worker_process, start_metadata  # noqa: E402

MODES = {
    "full": dict(steps=40, batch_size=4, seq_len=256, learning_rate=3e-3, baseline_learning_rate=5e-3, bf16=True,
                 lora_r=8, pruning_ratio=0.25, distill_weight=None, mask_init_samples=16,
                 eval_tokens=16384, eval_seq_len=512,
                 reconstruction=dict(domain_windows=160, general_windows=96, epochs=8, lr=2e-3),
                 prompt_tokens=32, new_tokens=32, prefill_tokens=512, repeats=3,
                 curve=dict(batch_size=2, seq_len=128, steps=[40, 100, 200], ratios=[0.1, 0.25, 0.4],
                            ratio_steps=100, eval_tokens=4096)),
    "quick": dict(steps=6, batch_size=2, seq_len=64, learning_rate=3e-3, baseline_learning_rate=5e-3, bf16=True,
                  lora_r=4, pruning_ratio=0.25, distill_weight=0.5, mask_init_samples=4,
                  eval_tokens=1024, eval_seq_len=256,
                  reconstruction=dict(domain_windows=4, general_windows=2, epochs=1, lr=2e-3),
                  prompt_tokens=8, new_tokens=4, prefill_tokens=64, repeats=1,
                  curve=dict(batch_size=1, seq_len=32, steps=[2, 4], ratios=[0.25, 0.5], ratio_steps=2,
                             eval_tokens=256)),
}
DOMAIN = "medical"
GOALS = {"quality_vs_lora": 1.5, "vs_one_shot": 0.10, "speed": 1.25}


def pat_label(settings: dict, suffix: str = "") -> str:
    return f"PAT {settings['pruning_ratio']:.0%}{suffix}"


MLP_LABEL = "one-shot MLP neurons (same parameters) + compensation + LoRA"
RECIPE_LABEL = "MLP neurons, OBS + reconstruction + LoRA (same parameters)"
PARTIAL = ("dense", "dense + LoRA", MLP_LABEL, RECIPE_LABEL)  # --partial: the recipe beside its references
NEURON_PAT_LABEL = "PAT on MLP neurons (same parameters)"


def one_shot_label(settings: dict, compensate: bool = False) -> str:
    return f"one-shot {settings['pruning_ratio']:.0%}{' + compensation' if compensate else ''} + LoRA"


def _training_args(settings: dict, **overrides):
    """The Trainer's arguments of every tuned row: bf16 mixed precision when ``settings["bf16"]`` (autocast; the
    weights, LoRA and optimizer stay float32), on the CPU unless CUDA is there."""
    import torch
    from transformers import TrainingArguments

    values = dict(max_steps=settings["steps"], per_device_train_batch_size=settings["batch_size"],
                  learning_rate=settings["learning_rate"], bf16=settings["bf16"],
                  use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to="none", disable_tqdm=True,
                  logging_strategy="no", seed=0)
    return TrainingArguments(tempfile.mkdtemp(prefix="bench-pat-"), **{**values, **overrides})


def _tune_pat(path: str, tokenizer, windows, settings: dict, **config) -> tuple:
    """PAT with `config` over PAT's learned mask on the hidden channels (the paper's PAT, with the library's other
    defaults); the exported smaller model and the training seconds."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_dpruner.pat import PATConfig, PATTrainer

    start = time.perf_counter()
    pat_config = PATConfig(**{"axis": "hidden", "strategy": "learned",
                              "pruning_ratio": settings["pruning_ratio"], "lora_r": settings["lora_r"],
                              "lora_alpha": 2 * settings["lora_r"], "mask_init_samples": settings["mask_init_samples"],
                              **config})
    trainer = PATTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=_training_args(settings),
                         pat_config=pat_config, train_dataset=Dataset.from_dict(windows.to_dict()),
                         processing_class=tokenizer)
    trainer.train()
    return trainer.export(), time.perf_counter() - start  # written to the run's temporary output folder


def _tune_lora(model, windows, settings: dict, collator):
    """`model` with LoRA of the benchmark's rank trained on `windows`, merged."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, set_seed

    args = _training_args(settings)
    set_seed(args.seed)  # the adapters' initialisation follows the seed of the run, whatever ran before
    lora = LoraConfig(r=settings["lora_r"], lora_alpha=2 * settings["lora_r"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    Trainer(model=peft_model, args=args, train_dataset=windows, data_collator=collator).train()
    return peft_model.merge_and_unload()


def train_models(settings: dict, only: tuple[str, ...] | None = None):
    """Each method's tuned model (with its training time), and the tokenizer; with `only`, just those methods."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.data import CausalLMCollator, build_windows, collate_batches
    from hf_dpruner.pat import neurons_for_parameters, prune_mlp_neurons, width_prune
    from hf_dpruner.resources import default_model_path

    def wanted(label: str) -> bool:
        return only is None or label in only

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = build_windows(load_corpus_texts(DOMAIN), tokenizer, settings["seq_len"],
                            settings["steps"] * settings["batch_size"], 0)
    collator = CausalLMCollator(tokenizer.pad_token_id)
    models: dict[str, dict] = {"dense": {"model": AutoModelForCausalLM.from_pretrained(path), "train_seconds": 0.0}}

    # dense + LoRA at the benchmark's learning rate and at a second one, so the goals compare against its best
    baseline = settings["baseline_learning_rate"]
    for label, lr in (("dense + LoRA", settings["learning_rate"]), (f"dense + LoRA (lr {baseline:g})", baseline)):
        if wanted(label):
            start = time.perf_counter()
            tuned = _tune_lora(AutoModelForCausalLM.from_pretrained(path), windows,
                               {**settings, "learning_rate": lr}, collator)
            models[label] = {"model": tuned, "train_seconds": time.perf_counter() - start}
    variants = [("", {}), (" (paper: mask from zeros)", {"mask_init": "zeros"})]
    if settings["distill_weight"]:
        variants.append((f" + KD {settings['distill_weight']:g}", {"distill_weight": settings["distill_weight"]}))
    for suffix, config in variants:
        if wanted(pat_label(settings, suffix)):
            small, seconds = _tune_pat(path, tokenizer, windows, settings, **config)
            models[pat_label(settings, suffix)] = {"model": small, "train_seconds": seconds}

    # the one-shot peers measure the importance (and fit the compensation) on the same windows PAT's mask_init uses
    calibration = collate_batches(windows.select(range(settings["mask_init_samples"])), settings["batch_size"],
                                  tokenizer.pad_token_id)
    dense = models["dense"]["model"]
    width_pruned = None
    for compensate in (False, True):
        if wanted(one_shot_label(settings, compensate)):
            start = time.perf_counter()
            width_pruned = width_prune(AutoModelForCausalLM.from_pretrained(path), settings["pruning_ratio"],
                                       calibration, compensate=compensate)
            models[one_shot_label(settings, compensate)] = {
                "model": _tune_lora(width_pruned, windows, settings, collator),
                "train_seconds": time.perf_counter() - start}
    # MLP neurons instead of hidden channels, as many parameters removed as the width-pruned model
    if width_pruned is None:
        width_pruned = width_prune(AutoModelForCausalLM.from_pretrained(path), settings["pruning_ratio"], calibration)
    neurons = neurons_for_parameters(dense, dense.num_parameters() - width_pruned.num_parameters())
    if wanted(MLP_LABEL):
        start = time.perf_counter()
        small = prune_mlp_neurons(AutoModelForCausalLM.from_pretrained(path), neurons, calibration, compensate=True)
        models[MLP_LABEL] = {"model": _tune_lora(small, windows, settings, collator),
                             "train_seconds": time.perf_counter() - start}
    # the structured recipe: the neurons chosen by OBS, each block reconstructed toward the dense one on domain and
    # general windows, then the same LoRA steps
    if wanted(RECIPE_LABEL):  # the library's path: PATTrainer with strategy 'one-shot', the LoRA of every row
        recon = settings["reconstruction"]
        small, seconds = _tune_pat(path, tokenizer, windows, settings, axis="neurons", strategy="one-shot",
                                   pruning_ratio=neurons / dense.config.intermediate_size,
                                   reconstruction_samples=recon["domain_windows"],
                                   reconstruction_general_samples=recon["general_windows"],
                                   reconstruction_epochs=recon["epochs"], reconstruction_learning_rate=recon["lr"])
        if small.config.intermediate_size != dense.config.intermediate_size - neurons:
            raise RuntimeError(f"the recipe kept {small.config.intermediate_size} neurons, the peer "
                               f"{dense.config.intermediate_size - neurons}")
        models[RECIPE_LABEL] = {"model": small, "train_seconds": seconds}
    # PAT learning the same number of MLP neurons per layer instead of hidden channels
    if wanted(NEURON_PAT_LABEL):
        small, seconds = _tune_pat(path, tokenizer, windows, settings, axis="neurons",
                                   pruning_ratio=neurons / dense.config.intermediate_size)
        models[NEURON_PAT_LABEL] = {"model": small, "train_seconds": seconds}
    return models, tokenizer


def curves(settings: dict, tokenizer) -> dict[str, list[dict]]:
    """PAT's (learned hidden-channel mask) domain/general perplexity against the steps (at the benchmark's ratio)
    and against the ratio (at ``ratio_steps``), on the curve's smaller batches."""
    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.data import build_windows
    from hf_dpruner.resources import default_model_path

    curve = settings["curve"]
    path = default_model_path()
    texts = load_corpus_texts(DOMAIN)
    eval_texts = {key: load_corpus_texts(corpus, "eval") for key, corpus in (("domain_ppl", DOMAIN),
                                                                            ("general_ppl", "general"))}
    points: dict[tuple[float, int], dict] = {}
    wanted = [(settings["pruning_ratio"], steps) for steps in curve["steps"]]
    wanted += [(ratio, curve["ratio_steps"]) for ratio in curve["ratios"]]
    for ratio, steps in wanted:
        if (ratio, steps) in points:
            continue
        run = {**settings, "pruning_ratio": ratio, "steps": steps, "batch_size": curve["batch_size"],
               "seq_len": curve["seq_len"]}
        windows = build_windows(texts, tokenizer, curve["seq_len"], steps * curve["batch_size"], 0)
        small, seconds = _tune_pat(path, tokenizer, windows, run)
        points[(ratio, steps)] = {"pruning_ratio": ratio, "steps": steps, "train_seconds": seconds,
                                  "hidden_size": small.config.hidden_size,
                                  **_perplexities(small, tokenizer, eval_texts, settings["eval_seq_len"],
                                                  curve["eval_tokens"])}
    return {"steps": [points[(settings["pruning_ratio"], s)] for s in curve["steps"]],
            "ratios": [points[(r, curve["ratio_steps"])] for r in curve["ratios"]]}


def _perplexities(model, tokenizer, eval_texts: dict, seq_len: int, tokens: int) -> dict[str, float]:
    from hf_dpruner.evaluation import perplexity

    return {key: perplexity(model, tokenizer, texts, seq_len=seq_len, max_tokens=tokens,
                            disable_tqdm=True)["perplexity"] for key, texts in eval_texts.items()}


def throughput(models: dict[str, dict], tokenizer, settings: dict, texts: list[str]) -> dict[str, dict[str, float]]:
    """Tokens/s per model: greedy decoding at batch 1 and 8 (new tokens / time of `generate`), and the prefill of
    one ``prefill_tokens`` prompt (one forward); measured interleaved, median of the repeats."""
    import torch

    prompt_ids = tokenizer(" ".join(texts[:64]), return_tensors="pt")["input_ids"]
    if prompt_ids.shape[1] < settings["prefill_tokens"]:
        raise ValueError(f"The eval texts hold fewer than {settings['prefill_tokens']} tokens for the prefill.")
    prompt = prompt_ids[:, : settings["prompt_tokens"]]
    long_prompt = prompt_ids[:, : settings["prefill_tokens"]]
    new = settings["new_tokens"]
    kinds = ("batch1", "batch8", "prefill")
    timings: dict[str, dict[str, list[float]]] = {name: {k: [] for k in kinds} for name in models}

    def generate(model, batch: int) -> float:
        ids = prompt.repeat(batch, 1)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert out.shape[1] == ids.shape[1] + new
        return batch * new / (time.perf_counter() - start)

    def prefill(model) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=long_prompt, use_cache=False)
        return long_prompt.shape[1] / (time.perf_counter() - start)

    for entry in models.values():
        entry["model"].eval()
        generate(entry["model"], 1)  # warm-up
        prefill(entry["model"])
    for _ in range(settings["repeats"]):
        for kind in kinds:
            for name, entry in models.items():
                value = prefill(entry["model"]) if kind == "prefill" else generate(entry["model"], int(kind[-1]))
                timings[name][kind].append(value)
    return {name: {kind: statistics.median(values) for kind, values in t.items()} for name, t in timings.items()}


def throughput_in_fresh_process(folders: dict[str, str], settings: dict) -> dict[str, dict[str, float]]:
    """`throughput` of the models saved in `folders` (name -> folder), loaded with ``from_pretrained`` in a new
    Python process, as a user loads them: whatever training left in this process (a fragmented heap, copies of the
    weights) cannot tilt one model's timings against another's."""
    with tempfile.TemporaryDirectory(prefix="bench-pat-speed-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"folders": folders, "settings": settings}))
        return run_worker_process(__file__, ["--throughput-worker", str(spec)])


def throughput_worker(spec_path: str, result_path: str) -> None:
    """The worker of `throughput_in_fresh_process`: load every folder, time them, write the speeds as JSON."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpruner.corpora import load_corpus_texts
    from hf_dpruner.resources import default_model_path

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    models = {name: {"model": AutoModelForCausalLM.from_pretrained(folder)} for name, folder in spec["folders"].items()}
    speeds = throughput(models, tokenizer, spec["settings"], load_corpus_texts(DOMAIN, "eval"))
    Path(result_path).write_text(json.dumps(speeds, indent=2))


def measure(settings: dict, only: tuple[str, ...] | None = None) -> tuple[list[dict], dict[str, list[dict]] | None]:
    from hf_dpruner.corpora import load_corpus_texts

    models, tokenizer = train_models(settings, only)
    eval_texts = {key: load_corpus_texts(corpus, "eval") for key, corpus in (("domain_ppl", DOMAIN),
                                                                            ("general_ppl", "general"))}
    rows, folders = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-pat-models-") as run_dir:
        for index, name in enumerate(list(models)):  # each model leaves memory once measured and saved
            entry = models.pop(name)
            model = entry["model"]
            ppl = _perplexities(model, tokenizer, eval_texts, settings["eval_seq_len"], settings["eval_tokens"])
            folders[name] = str(Path(run_dir) / str(index))
            model.save_pretrained(folders[name])
            size = sum(f.stat().st_size for f in Path(folders[name]).glob("*.safetensors"))
            nonzero = sum(int((p != 0).sum()) for p in model.parameters())
            rows.append({"method": name, **ppl, "parameters": model.num_parameters(), "nonzero_parameters": nonzero,
                         "hidden_size": model.config.hidden_size,
                         "intermediate_size": model.config.intermediate_size, "checkpoint_bytes": size,
                         "train_seconds": entry["train_seconds"]})
            del model, entry
        speeds = throughput_in_fresh_process(folders, settings)
    for row in rows:
        row.update({f"tokens_per_s_{kind}": speeds[row["method"]][kind] for kind in ("batch1", "batch8", "prefill")})
    return rows, (curves(settings, tokenizer) if only is None else None)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def goals(rows: list[dict], settings: dict) -> list[str]:
    """The issue's goals, for the paper's axis (hidden channels) and, when measured, PAT on MLP neurons."""
    by = {r["method"]: r for r in rows}
    dense = by["dense"]
    lora = min((r for r in rows if r["method"].startswith("dense + LoRA")), key=lambda r: r["domain_ppl"])
    peers = [r for r in rows if r["method"].startswith("one-shot")]
    lines = []
    names = {pat_label(settings): "PAT", NEURON_PAT_LABEL: "PAT on MLP neurons",
             RECIPE_LABEL: "The default recipe (PATConfig())"}
    for label, name in names.items():
        if label not in by:
            continue
        pat = by[label]
        for key, what in (("batch8", "decoding at batch 8"), ("prefill", f"{settings['prefill_tokens']}-token prefill"),
                          ("batch1", "decoding at batch 1")):
            ratio = pat[f"tokens_per_s_{key}"] / dense[f"tokens_per_s_{key}"]
            lines.append(f"{name} tokens/s, {what}: {ratio:.2f}x the dense model (goal >= {GOALS['speed']}x) — "
                         f"{_met(ratio >= GOALS['speed'])}.")
        ratio = pat["domain_ppl"] / lora["domain_ppl"]
        lines.append(f"{name} domain perplexity {ratio:.2f}x {lora['method']}'s (goal <= "
                     f"{GOALS['quality_vs_lora']}x) — {_met(ratio <= GOALS['quality_vs_lora'])}.")
        if peers:
            peer = min(peers, key=lambda r: r["domain_ppl"])
            gain = 1 - pat["domain_ppl"] / peer["domain_ppl"]
            lines.append(f"{name} domain perplexity {abs(gain):.1%} {'lower' if gain >= 0 else 'higher'} than the "
                         f"best one-shot peer's ({peer['method']}; goal >= {GOALS['vs_one_shot']:.0%} lower) — "
                         f"{_met(gain >= GOALS['vs_one_shot'])}.")
    return lines


def markdown(rows: list[dict], settings: dict, curve_points: dict[str, list[dict]] | None = None) -> str:
    precision = " (bf16 autocast)" if settings.get("bf16") else ""
    lines = [f"Embedded SmolLM2-135M, {DOMAIN}; {settings['steps']} AdamW steps{precision} of "
             f"{settings['batch_size']} x {settings['seq_len']} tokens, lr {settings['learning_rate']}, "
             f"LoRA r {settings['lora_r']} on every linear layer for each tuned model. Perplexity: first "
             f"{settings['eval_tokens']} tokens of each eval split, windows of {settings['eval_seq_len']}. Speed: "
             f"greedy decoding of {settings['new_tokens']} tokens after a {settings['prompt_tokens']}-token prompt, "
             f"and one forward over a {settings['prefill_tokens']}-token prompt; median of {settings['repeats']}, "
             f"the saved models loaded side by side in one fresh process.",
             "",
             "| method | hidden | MLP | domain ppl | general ppl | parameters | checkpoint MiB | tok/s b1 | tok/s b8 | "
             "prefill tok/s | train (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['hidden_size']} | {r.get('intermediate_size', '')} | "
                     f"{r['domain_ppl']:.2f} | {r['general_ppl']:.2f} | "
                     f"{r['parameters'] / 1e6:.1f}M | {r['checkpoint_bytes'] / 2**20:.0f} | "
                     f"{r['tokens_per_s_batch1']:.1f} | {r['tokens_per_s_batch8']:.1f} | "
                     f"{r['tokens_per_s_prefill']:.0f} | {r['train_seconds']:.0f} |")
    lines += [""] + [f"- {g}" for g in goals(rows, settings)]
    if curve_points:
        curve = settings["curve"]
        lines += ["", f"Curves of PAT, learned mask on the hidden channels ({curve['batch_size']} x "
                  f"{curve['seq_len']} tokens per step, perplexity on the first {curve['eval_tokens']} tokens):", "",
                  "| pruning ratio | steps | hidden | domain ppl | general ppl | train (s) |",
                  "|---|---|---|---|---|---|"]
        seen = set()
        for point in curve_points["steps"] + curve_points["ratios"]:
            key = (point["pruning_ratio"], point["steps"])
            if key not in seen:
                seen.add(key)
                lines.append(f"| {point['pruning_ratio']:.0%} | {point['steps']} | {point['hidden_size']} | "
                             f"{point['domain_ppl']:.2f} | {point['general_ppl']:.2f} | {point['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], curve_points: dict[str, list[dict]] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 if curve_points else 1, 2, figsize=(13, 8 if curve_points else 4.5), squeeze=False)
    quality, speed = axes[0]
    names = [r["method"].replace(" (", "\n(") for r in rows]
    x = range(len(rows))
    for offset, key in ((-0.2, "domain_ppl"), (0.2, "general_ppl")):
        quality.bar([i + offset for i in x], [r[key] for r in rows], width=0.4, label=key)
    quality.set_yscale("log")
    quality.set_xticks(list(x), names, fontsize=6)
    quality.set(ylabel="perplexity (log)", title="quality (lower is better)")
    quality.legend(fontsize=7)
    dense = rows[0]
    for offset, key in ((-0.27, "batch1"), (0.0, "batch8"), (0.27, "prefill")):
        speed.bar([i + offset for i in x], [r[f"tokens_per_s_{key}"] / dense[f"tokens_per_s_{key}"] for r in rows],
                  width=0.27, label=key)
    speed.axhline(GOALS["speed"], color="grey", linestyle="--", linewidth=1, label=f"goal {GOALS['speed']}x")
    speed.set_xticks(list(x), names, fontsize=6)
    speed.set(ylabel="tokens/s vs dense", title="CPU speed (higher is better)")
    speed.legend(fontsize=7)
    curve_axes = ((axes[1][0], curve_points["steps"], "steps", "training steps"),
                  (axes[1][1], curve_points["ratios"], "pruning_ratio", "pruning ratio")) if curve_points else ()
    for axis, points, key, label in curve_axes:
        for metric in ("domain_ppl", "general_ppl"):
            axis.plot([p[key] for p in points], [p[metric] for p in points], marker="o", label=metric)
        axis.set_yscale("log")
        axis.set(xlabel=label, ylabel="perplexity (log)", title=f"PAT (hidden channels): perplexity vs {label}")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run.")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--steps", type=int, help="Override the number of training steps of the table's models.")
    parser.add_argument("--partial", action="store_true",
                        help="Only the structured recipe beside dense, dense + LoRA and the one-shot MLP-neuron peer, "
                             "no curves; writes pat[-quick]-partial.*.")
    parser.add_argument("--throughput-worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.throughput_worker:
        throughput_worker(args.throughput_worker, args.result)
        return 0
    metadata = start_metadata(__file__, args, argv)
    mode = "quick" if args.quick else "full"
    settings = dict(MODES[mode])
    if args.steps:
        settings["steps"] = args.steps
    start = time.perf_counter()
    rows, curve_points = measure(settings, PARTIAL if args.partial else None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("pat" if mode == "full" else "pat-quick") + ("-partial" if args.partial else "")
    results = {"metadata": finish_metadata(metadata), "settings": settings, "runs": rows, "curves": curve_points,
               "seconds": time.perf_counter() - start}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(rows, settings, curve_points))
    plot(rows, curve_points, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
