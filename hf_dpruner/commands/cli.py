"""``hf-dpruner SUBCOMMAND ...``: dispatches to the subcommand modules, each of which parses its own arguments."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "prune": ("hf_dpruner.commands.prune", "Prune a model with D-Pruner and save a pruned checkpoint."),
    "eval": ("hf_dpruner.commands.eval", "Perplexity on general and domain text, pruned vs dense, side by side."),
    "recover": ("hf_dpruner.commands.recover", "LoRA recovery that keeps the sparsity (uniform or RankAdaptor ranks)."),
    "pat": ("hf_dpruner.commands.pat",
            "Pruning-Aware Tuning: learn which hidden channels to drop, export a smaller model."),
    "run": ("hf_dpruner.commands.run",
            "prune -> recover -> eval -> push in one command (flags or a YAML recipe), resumable by stage."),
    "push": ("hf_dpruner.commands.push", "Upload a pruned checkpoint with its masks and model card to the Hub."),
    "data": ("hf_dpruner.commands.data", "Prepare the embedded default model and the bundled corpora offline."),
}


def _usage() -> str:
    lines = ["usage: hf-dpruner {" + ",".join(SUBCOMMANDS) + "} [--help] ...", "", "subcommands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ..version import __version__

        print(__version__)
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"hf-dpruner: unknown subcommand {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
