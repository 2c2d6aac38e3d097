"""Regenerate the config tables of the docs from the dataclasses' field help.

    python docs/_generate.py          # rewrite the tables between their marker comments
    python docs/_generate.py --check  # exit 1 if a table is out of date (nothing is written)

`DPrunerConfig` goes into docs/python-api.md (markers `<!-- config-table:start -->` / `<!-- config-table:end -->`),
`hf_dpruner.pat.PATConfig` into docs/pat.md (`<!-- pat-config-table:start -->` / `<!-- pat-config-table:end -->`).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def _targets() -> list[tuple[Path, str, type]]:
    """(Markdown file, marker name, dataclass) of every generated table."""
    import hf_dpruner

    targets = [(DOCS / "python-api.md", "config-table", hf_dpruner.DPrunerConfig)]
    try:
        from hf_dpruner.pat import PATConfig
    except ImportError:
        return targets
    return targets + [(DOCS / "pat.md", "pat-config-table", PATConfig)]


def _cell(text: str) -> str:
    """One table cell: whitespace collapsed to single spaces, `|` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, float) and len(repr(value)) > 8:
        return f"`{value:.4g}`"  # 1/3 -> 0.3333
    return f"`{value}`"


def config_table(config_class: type) -> str:
    """A Markdown table `| field | default | help |` with one row per dataclass field."""
    rows = ["| field | default | help |", "|---|---|---|"]
    for field in dataclasses.fields(config_class):
        rows.append(f"| `{field.name}` | {_cell(_default(field))} | {_cell(field.metadata.get('help', ''))} |")
    return "\n".join(rows)


def render(text: str, marker: str, table: str) -> str:
    """`text` with the part between the `marker` start/end comments replaced by `table`."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected one {start} ... {end} block, found {len(pattern.findall(text))}")
    return pattern.sub(lambda _: f"{start}\n{table}\n{end}", text)


def stale_files(write: bool = False) -> list[Path]:
    """The docs files whose generated tables are out of date; with `write`, rewrite them."""
    stale = []
    for path, marker, config_class in _targets():
        text = path.read_text(encoding="utf-8")
        new = render(text, marker, config_table(config_class))
        if new != text:
            stale.append(path)
            if write:
                path.write_text(new, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated table is out of date")
    args = parser.parse_args(argv)
    stale = stale_files(write=not args.check)
    for path in stale:
        verb = "out of date (run `python docs/_generate.py`)" if args.check else "rewritten"
        print(f"{path.relative_to(DOCS.parent)}: {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
