"""``hf-dpruner eval``: general and domain perplexity (and lm-eval tasks) of a pruned model and its dense base."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from ..config import read_pruning_record, recorded_source
from ..corpora import DOMAIN_CORPORA, GENERAL_CORPUS
from ..data import load_texts
from ..evaluation import perplexity
from ..lm_eval_bridge import MMLU_TASKS, build_task_manager, run_lm_eval
from ..model_card import EVAL_RESULTS_NAME, write_model_card
from ..modeling import load_causal_lm
from ..pat.config import PAT_CONFIG_NAME, read_pat_record
from ..resources import model_location


def _base_model(record: dict, model_dir: Path) -> str | None:
    base = recorded_source(record.get("base_model"), model_dir, "base_model", "--baseline-model")
    return None if base is None else model_location(base)


def _pat_record(model_dir: Path) -> dict:
    """Base model and training data of a PAT export (``pat_config.json``), in the shape of a pruning record."""
    if not (model_dir / PAT_CONFIG_NAME).is_file():
        return {}
    record = read_pat_record(model_dir)
    return {"base_model": record.get("base_model"),
            "calibration": {"domain_data": (record.get("training") or {}).get("data")}}


def _print_table(models: dict[str, dict], corpora: list[str], tasks: list[str]) -> None:
    """One row per model: perplexity per corpus, then every non-stderr metric of each requested task."""
    columns = [(f"{name} ppl", lambda values, name=name: values[name]["perplexity"], ".2f") for name in corpora]
    first = next(iter(models.values()))
    for task in tasks:
        for metric in first["lm_eval"].get(task, {}):
            if "_stderr" not in metric:
                columns.append((f"{task} {metric}", lambda values, t=task, m=metric: values["lm_eval"][t][m], ".4f"))
    widths = [max(12, len(header)) for header, _, _ in columns]
    headers = [f"{header:>{width}}" for (header, _, _), width in zip(columns, widths, strict=True)]
    print(" ".join([f"{'model':<8}", *headers]))
    for label, values in models.items():
        cells = [f"{get(values):>{width}{spec}}" for (_, get, spec), width in zip(columns, widths, strict=False)]
        print(" ".join([f"{label:<8}"] + cells))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-dpruner eval", description=__doc__)
    parser.add_argument("model", help="Pruned checkpoint folder (or any causal LM folder / Hub id).")
    parser.add_argument("--baseline-model", help="Dense model to compare with. Default: the checkpoint's base model.")
    parser.add_argument("--no-baseline", action="store_true", help="Evaluate only MODEL.")
    parser.add_argument("--general-data", default=GENERAL_CORPUS, help="General text (default: bundled 'general').")
    parser.add_argument("--domain-data", help="Domain text. Default: the checkpoint's domain corpus, else 'medical'.")
    parser.add_argument("--split", default="eval", help="Split of bundled corpora / datasets (default: eval).")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="Default: seq-len (non-overlapping windows).")
    parser.add_argument("--max-tokens", type=int, default=16384, help="Tokens of each text used (default 16384).")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", help=f"JSON file for the results (default: MODEL/{EVAL_RESULTS_NAME}).")
    parser.add_argument("--tasks", nargs="+", metavar="TASK",
                        help=f"lm-eval tasks to run too: the offline {', '.join(MMLU_TASKS)} or any lm-eval task "
                        "name (needs the lm-eval extra).")
    parser.add_argument("--num-fewshot", type=int, default=None, help="Few-shot examples for --tasks (default 0).")
    parser.add_argument("--limit", type=int, default=None, help="Questions per task for --tasks (default: all).")
    parser.add_argument("--no-perplexity", action="store_true", help="Skip perplexity (run only --tasks).")
    parser.add_argument("--allow-pickle-weights", action="store_true",
                        help="Allow models whose weights exist only as pytorch_model.bin (a pickle; trusted sources "
                        "only). Default: safetensors only.")
    args = parser.parse_args(argv)
    if not args.tasks and (args.no_perplexity or args.num_fewshot is not None or args.limit is not None):
        parser.error("--no-perplexity, --num-fewshot and --limit apply to --tasks: pass --tasks too.")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        parser.error(f"--num-fewshot must be >= 0, got {args.num_fewshot}.")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}.")
    task_manager = build_task_manager(args.tasks) if args.tasks else None

    model_dir = Path(args.model)
    pruned_checkpoint = (model_dir / "pruning_config.json").is_file()
    record = read_pruning_record(model_dir) if pruned_checkpoint else _pat_record(model_dir)
    domain = args.domain_data or recorded_source(
        (record.get("calibration") or {}).get("domain_data"), model_dir, "calibration.domain_data", "--domain-data"
    ) or DOMAIN_CORPORA["medical"]
    texts = {} if args.no_perplexity else {"general": load_texts(args.general_data, split=args.split),
                                           "domain": load_texts(domain, split=args.split)}
    models = {"pruned": args.model}
    if not args.no_baseline:
        baseline = args.baseline_model or _base_model(record, model_dir)
        if baseline is None:
            parser.error("No base model recorded in the checkpoint: pass --baseline-model or --no-baseline.")
        models = {"dense": baseline, **models}

    results: dict = {"settings": {}, "models": {}}
    if texts:
        results["settings"] = {"seq_len": args.seq_len, "stride": args.stride or args.seq_len,
                               "max_tokens": args.max_tokens, "general_data": args.general_data,
                               "domain_data": domain, "split": args.split}
    if args.tasks:
        results["settings"]["lm_eval"] = {"tasks": args.tasks, "num_fewshot": args.num_fewshot, "limit": args.limit,
                                          "lm_eval_version": importlib.metadata.version("lm_eval")}
    for label, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_causal_lm(path, allow_pickle=args.allow_pickle_weights)
        start = time.perf_counter()
        results["models"][label] = {"path": str(path)}
        for name, corpus in texts.items():
            measured = perplexity(model, tokenizer, corpus, seq_len=args.seq_len, stride=args.stride,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens)
            results["models"][label][name] = measured
        if args.tasks:
            results["models"][label]["lm_eval"] = run_lm_eval(
                model, tokenizer, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                batch_size=args.batch_size, task_manager=task_manager,
            )
        results["models"][label]["seconds"] = round(time.perf_counter() - start, 1)
        del model

    _print_table(results["models"], list(texts), args.tasks or [])
    output = Path(args.output) if args.output else model_dir / EVAL_RESULTS_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {output}")
    if output.resolve() == (model_dir / EVAL_RESULTS_NAME).resolve() and pruned_checkpoint:
        card = write_model_card(model_dir)  # the card's results table and model-index come from this file
        print(f"model card: {card}" if card else f"model card: kept the README of {model_dir} (not generated by us)")
    return 0
