"""lm-eval bridge: generated offline MMLU task configs, `run_lm_eval` against an independent scorer, `eval --tasks`."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from hf_dpruner.commands.cli import main
from hf_dpruner.evaluation import run_lm_eval
from hf_dpruner.lm_eval_bridge import build_task_manager, write_task_configs

LETTERS = "ABCD"
WORDS = [f"w{i}" for i in range(40)]
SUBJECTS = {"medical": ("anatomy", "college_medicine"), "legal": ("jurisprudence",)}


def make_rows(domain: str, n: int, seed: int) -> list[dict]:
    """Fabricated MMLU rows ``{question, choices, answer, subject}`` in the prepared corpus format."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (9,), generator=generator).tolist()]
        rows.append({
            "question": " ".join(words[:5]) + " ? ",
            "choices": words[5:],
            "answer": LETTERS[int(torch.randint(0, 4, (1,), generator=generator))],
            "subject": SUBJECTS[domain][i % len(SUBJECTS[domain])],
        })
    return rows


ROWS = {"medical": make_rows("medical", 12, seed=1), "legal": make_rows("legal", 8, seed=2)}


def expected_prompt(row: dict) -> str:
    """The MMLU-paper prompt, written out independently of the bridge."""
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, row["choices"], strict=False))
    subject = row["subject"].replace("_", " ")
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{row['question'].strip()}\n{options}Answer:")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace/punctuation word-level tokenizer whose vocabulary covers every prompt."""
    texts = [expected_prompt(row) + " " + " ".join(LETTERS) for rows in ROWS.values() for row in rows]
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", " ".join(texts + WORDS))))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "</s>", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]", pad_token="</s>")


@torch.no_grad()
def reference_predictions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> list[int]:
    """Index of the letter with the highest log-likelihood after each prompt, from plain forward passes."""
    predictions = []
    for row in rows:
        context = tokenizer(expected_prompt(row))["input_ids"]
        scores = []
        for letter in LETTERS:
            continuation = tokenizer(" " + letter)["input_ids"]
            logprobs = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation)))
        predictions.append(max(range(4), key=scores.__getitem__))
    return predictions


def reference_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> float:
    predictions = reference_predictions(model, tokenizer, rows)
    return sum(LETTERS[p] == row["answer"] for p, row in zip(predictions, rows, strict=False)) / len(rows)


@pytest.fixture
def mmlu_cache(tmp_path, monkeypatch):
    """An hf_dpruner cache holding a prepared ``mmlu`` corpus made of the fabricated rows."""
    cache = tmp_path / "cache"
    corpus = cache / "corpora" / "mmlu"
    corpus.mkdir(parents=True)
    for domain, rows in ROWS.items():
        (corpus / f"{domain}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (corpus / "manifest.json").write_text("{}")
    monkeypatch.setenv("HF_DPRUNER_CACHE", str(cache))
    return cache


def tiny_llama(model_factory, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    # a wider initialisation than the default makes the letter scores depend clearly on the whole prompt
    return model_factory("llama", seed=seed, vocab_size=len(tokenizer), max_position_embeddings=128,
                         initializer_range=0.2)


@pytest.fixture
def tiny(model_factory):
    tokenizer = word_tokenizer()
    return tiny_llama(model_factory, tokenizer), tokenizer


def test_generated_configs_load_through_task_manager(mmlu_cache, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = write_task_configs(tmp_path / "tasks")
    assert sorted(p.name for p in folder.iterdir()) == ["dpruner_mmlu_legal.yaml", "dpruner_mmlu_medical.yaml"]
    config = yaml.safe_load((folder / "dpruner_mmlu_medical.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(mmlu_cache / "corpora" / "mmlu" / "medical.jsonl")
    loaded = TaskManager(include_path=str(folder), include_defaults=False).load(
        ["dpruner_mmlu_medical", "dpruner_mmlu_legal"])["tasks"]
    for domain, rows in ROWS.items():
        task = loaded[f"dpruner_mmlu_{domain}"]
        docs = list(task.test_docs())
        assert task.OUTPUT_TYPE == "multiple_choice" and len(docs) == len(rows)
        for doc, row in zip(docs, rows, strict=False):
            assert task.fewshot_context(doc, 0) == expected_prompt(row)
            assert task.doc_to_choice(doc) == list(LETTERS)
            assert task.doc_to_target(doc) == row["answer"]
    medical = loaded["dpruner_mmlu_medical"]
    others = len(ROWS["medical"]) - 1
    # few-shot examples: all other questions, never itself
    for doc, row in zip(medical.test_docs(), ROWS["medical"], strict=False):
        context = medical.fewshot_context(doc, others)
        assert context.endswith(expected_prompt(row).split("\n\n", 1)[1])
        assert context.count("\nAnswer: ") == others and context.count(row["question"].strip()) == 1


def test_run_lm_eval_accuracy_matches_independent_scoring(mmlu_cache, tiny):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    model.train()
    results = run_lm_eval(model, tokenizer, ["dpruner_mmlu_medical", "dpruner_mmlu_legal"])
    assert model.training  # mode restored
    model.eval()
    assert set(results) == {"dpruner_mmlu_medical", "dpruner_mmlu_legal"}
    for domain, rows in ROWS.items():
        metrics = results[f"dpruner_mmlu_{domain}"]
        assert set(metrics) == {"acc", "acc_stderr"} and 0.0 <= metrics["acc"] <= 1.0
        assert metrics["acc"] == pytest.approx(reference_accuracy(model, tokenizer, rows))
    # the prompt matters: the model does not pick the same letter everywhere
    assert len(set(reference_predictions(model, tokenizer, ROWS["medical"]))) > 1
    json.dumps(results)

    limited = run_lm_eval(model, tokenizer, ["dpruner_mmlu_medical"], limit=5, batch_size=4)
    expected = reference_accuracy(model, tokenizer, ROWS["medical"][:5])
    assert limited["dpruner_mmlu_medical"]["acc"] == pytest.approx(expected)


def test_unknown_task_names_are_explained(mmlu_cache, tiny):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"dpruner_mmlu_surgery.*dpruner_mmlu_legal', 'dpruner_mmlu_medical"):
        run_lm_eval(model, tokenizer, ["dpruner_mmlu_medical", "dpruner_mmlu_surgery"])
    with pytest.raises(ValueError, match="non-empty list of task names"):
        run_lm_eval(model, tokenizer, "dpruner_mmlu_medical")
    with pytest.raises(ValueError, match=r"Unknown lm-eval task\(s\) \['hellaswagg'\].*'hellaswag'"):
        build_task_manager(["hellaswagg"])


def test_missing_lm_eval_names_the_extra(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=re.escape('pip install "hf_dpruner[lm-eval]"')):
        run_lm_eval(*tiny, ["dpruner_mmlu_medical"])


def test_cli_eval_tasks_writes_lm_eval_results(mmlu_cache, tiny, model_factory, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny
    folders = {"pruned": tmp_path / "pruned", "dense": tmp_path / "dense"}
    model.save_pretrained(folders["pruned"])
    dense = tiny_llama(model_factory, tokenizer, seed=1)
    dense.save_pretrained(folders["dense"])
    for folder in folders.values():
        tokenizer.save_pretrained(folder)
    (tmp_path / "text.txt").write_text(" ".join(WORDS * 5))
    text = str(tmp_path / "text.txt")
    with pytest.raises(SystemExit):
        main(["eval", str(folders["pruned"]), "--no-baseline", "--no-perplexity"])
    assert main(["eval", str(folders["pruned"]), "--baseline-model", str(folders["dense"]), "--general-data", text,
                 "--domain-data", text, "--seq-len", "32", "--tasks", "dpruner_mmlu_medical", "--limit", "6"]) == 0
    results = json.loads((folders["pruned"] / "eval_results.json").read_text())
    assert results["settings"]["lm_eval"]["tasks"] == ["dpruner_mmlu_medical"]
    assert results["settings"]["lm_eval"]["limit"] == 6 and results["settings"]["lm_eval"]["num_fewshot"] is None
    printed = capsys.readouterr().out
    assert "dpruner_mmlu_medical acc" in printed
    for label, reference in {"pruned": model, "dense": dense}.items():
        values = results["models"][label]
        assert values["general"]["perplexity"] > 1 and values["domain"]["num_tokens"] > 0
        acc = values["lm_eval"]["dpruner_mmlu_medical"]["acc"]
        assert acc == pytest.approx(reference_accuracy(reference, tokenizer, ROWS["medical"][:6]))
        assert f"{acc:.4f}" in printed

    only = tmp_path / "only.json"
    assert main(["eval", str(folders["pruned"]), "--no-baseline", "--no-perplexity", "--tasks", "dpruner_mmlu_legal",
                 "--limit", "2", "--output", str(only)]) == 0
    results = json.loads(only.read_text())
    assert list(results["settings"]) == ["lm_eval"] and list(results["models"]) == ["pruned"]
    assert set(results["models"]["pruned"]) == {"path", "lm_eval", "seconds"}
