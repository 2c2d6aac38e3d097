"""``hf-dpruner eval``: general and domain perplexity of a pruned model and its dense base, side by side."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import read_pruning_record
from ..corpora import DOMAIN_CORPORA, GENERAL_CORPUS
from ..data import load_texts
from ..evaluation import perplexity
from ..resources import DEFAULT_MODEL_NAME, default_model_path

EVAL_RESULTS_NAME = "eval_results.json"


def _base_model(record: dict) -> str | None:
    base = record.get("base_model")
    return str(default_model_path()) if base == DEFAULT_MODEL_NAME else base


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
    args = parser.parse_args(argv)

    model_dir = Path(args.model)
    record = read_pruning_record(model_dir) if (model_dir / "pruning_config.json").is_file() else {}
    domain = args.domain_data or record.get("calibration", {}).get("domain_data") or DOMAIN_CORPORA["medical"]
    texts = {"general": load_texts(args.general_data, split=args.split), "domain": load_texts(domain, split=args.split)}
    models = {"pruned": args.model}
    if not args.no_baseline:
        baseline = args.baseline_model or _base_model(record)
        if baseline is None:
            parser.error("No base model recorded in the checkpoint: pass --baseline-model or --no-baseline.")
        models = {"dense": baseline, **models}

    results: dict = {
        "settings": {"seq_len": args.seq_len, "stride": args.stride or args.seq_len, "max_tokens": args.max_tokens,
                     "general_data": args.general_data, "domain_data": domain, "split": args.split},
        "models": {},
    }
    for label, path in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        start = time.perf_counter()
        results["models"][label] = {"path": str(path)}
        for name, corpus in texts.items():
            measured = perplexity(model, tokenizer, corpus, seq_len=args.seq_len, stride=args.stride,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens)
            results["models"][label][name] = measured
        results["models"][label]["seconds"] = round(time.perf_counter() - start, 1)
        del model

    print(f"{'model':<8} {'general ppl':>12} {'domain ppl':>12}")
    for label, values in results["models"].items():
        print(f"{label:<8} {values['general']['perplexity']:>12.2f} {values['domain']['perplexity']:>12.2f}")
    output = Path(args.output) if args.output else model_dir / EVAL_RESULTS_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {output}")
    return 0
