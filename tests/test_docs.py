"""The README stays a short user README, the docs' links resolve, and the generated config tables are current.

The config tables of docs/python-api.md and docs/pat.md are generated from the dataclasses' field help by
`python docs/_generate.py`; after changing a field, run it (the `--check` test below fails until then).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

import hf_dpruner

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_BYTES = 12_000
MARKDOWN_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
DOC_NAMES = ["python-api", "checkpoint-format", "hub-and-cards", "recovery", "pat", "results", "scale", "reliability",
             "development"]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), ![alt](src)
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_generator()


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links and images outside code, less web/mail links and pure #anchors."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"(https?:|mailto:|#)", t, flags=re.I)]


def generated_table(path: Path, marker: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    match = re.search(f"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", text, flags=re.S)
    assert match, f"{path.relative_to(ROOT)} has no {marker} markers"
    return match.group(1).splitlines()


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}): move detail to docs/"


def test_docs_exist_and_the_readme_lists_every_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert {f"{name}.md" for name in DOC_NAMES} <= {p.name for p in DOCS.glob("*.md")}
    unlisted = [p.name for p in DOCS.glob("*.md") if f"(docs/{p.name})" not in readme]
    assert not unlisted, f"docs not linked from the README's Documentation list: {unlisted}"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    broken = [target for target in relative_links(path.read_text(encoding="utf-8"))
              if not (path.parent / target.split("#", 1)[0]).exists()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_link_finder():
    text = ("[a](docs/x.md#part) ![b](../img.png) [c](https://x.org/y) [d](#anchor) [e](mailto:a@b.c)\n"
            "`[f](not/a/link.md)`\n```\n[g](in/code.md)\n```\n")
    assert relative_links(text) == ["docs/x.md#part", "../img.png"]


def test_generated_tables_are_current():
    stale = generate.stale_files(write=False)
    assert not stale, f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}; run `python docs/_generate.py`"
    assert generate.main(["--check"]) == 0


def test_check_flag_fails_on_a_stale_table_and_writes_nothing(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("python-api.md", "pat.md"):
        shutil.copy(DOCS / name, docs / name)
    stale = generate.render((docs / "python-api.md").read_text(encoding="utf-8"), "config-table", "| old |")
    (docs / "python-api.md").write_text(stale, encoding="utf-8")
    monkeypatch.setattr(generate, "DOCS", docs)
    assert generate.main(["--check"]) == 1
    assert (docs / "python-api.md").read_text(encoding="utf-8") == stale
    assert generate.main([]) == 0 and generate.main(["--check"]) == 0
    assert (docs / "python-api.md").read_text(encoding="utf-8") == (DOCS / "python-api.md").read_text(encoding="utf-8")


def _config_classes():
    classes = [("python-api.md", "config-table", hf_dpruner.DPrunerConfig)]
    try:
        from hf_dpruner.pat import PATConfig
    except ImportError:
        return classes
    return classes + [("pat.md", "pat-config-table", PATConfig)]


@pytest.mark.parametrize(("doc", "marker", "config_class"), _config_classes(), ids=lambda v: getattr(v, "__name__", v))
def test_every_config_field_is_in_its_table(doc, marker, config_class):
    rows = generated_table(DOCS / doc, marker)
    assert rows[:2] == ["| field | default | help |", "|---|---|---|"]
    names = [re.match(r"\| `([^`]+)` \|", row).group(1) for row in rows[2:]]
    fields = [f.name for f in dataclasses.fields(config_class)]
    assert names == fields, f"docs/{doc}: fields missing {sorted(set(fields) - set(names))}, " \
                            f"extra {sorted(set(names) - set(fields))}; run `python docs/_generate.py`"
    for row, field in zip(rows[2:], dataclasses.fields(config_class), strict=True):
        cells = re.split(r"(?<!\\)\|", row)[1:-1]  # an escaped \| stays inside its cell
        assert len(cells) == 3, f"docs/{doc}: the row of {field.name} does not have 3 cells: {row}"
        assert cells[2].strip() == generate._cell(field.metadata.get("help", "")), field.name


def test_table_escapes_pipes_and_collapses_whitespace():
    @dataclasses.dataclass
    class Example:
        a: int = dataclasses.field(default=1, metadata={"help": "x | y\n  z"})
        b: list = dataclasses.field(default_factory=list, metadata={"help": "b"})
        c: float = dataclasses.field(default=1 / 3)

    assert generate.config_table(Example).splitlines()[2:] == [
        "| `a` | `1` | x \\| y z |", "| `b` | `[]` | b |", "| `c` | `0.3333` |  |"]
