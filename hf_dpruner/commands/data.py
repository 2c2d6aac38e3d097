"""``hf-dpruner data prepare``: fetch and convert the embedded model and corpora into the cache."""

from __future__ import annotations

import argparse

from ..corpora import CORPORA, prepare_corpus
from ..resources import prepare_default_model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-dpruner data", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    prepare = sub.add_parser("prepare", help="Prepare the default model and corpora (idempotent).")
    prepare.add_argument("--corpora", nargs="*", default=list(CORPORA), choices=list(CORPORA),
                         help="Corpora to prepare (default: all).")
    prepare.add_argument("--no-model", action="store_true", help="Skip the embedded default model.")
    prepare.add_argument("--force", action="store_true", help="Rebuild even if already prepared.")
    args = parser.parse_args(argv)
    if not args.no_model:
        print(f"model: {prepare_default_model(force=args.force)}")
    for name in args.corpora:
        print(f"{name}: {prepare_corpus(name, force=args.force)}")
    return 0
