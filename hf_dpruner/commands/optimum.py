"""``optimum-cli dpruner SUBCOMMAND ...``: the same subcommands as ``hf-dpruner``, registered in optimum's CLI.

optimum loads ``optimum/commands/register/register_dpruner.py`` (shipped in optimum's namespace package, as
optimum's own subpackages do), which lists `DPrunerOptimumCommand`. Each subcommand hands its arguments, ``--help``
included, to the ``hf-dpruner`` parser of that subcommand, so both CLIs accept exactly the same flags.
"""

from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .cli import SUBCOMMANDS, main


class _ForwardedCommand(BaseOptimumCLICommand):
    """A leaf that passes every argument after its name to ``hf-dpruner <name>``."""

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.prefix_chars = "\0"  # no option is ours: '--sparsity 0.5', '--help'... all go to hf-dpruner's parser
        parser.add_argument("args", nargs=argparse.REMAINDER, help="Arguments of `hf-dpruner %(prog)s`.")

    def run(self) -> None:
        code = main([self.COMMAND.name, *self.args.args])
        if code:
            sys.exit(code)


class DPrunerOptimumCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="dpruner", help="Domain-specific pruning with hf_dpruner (D-Pruner and its peers).")
    SUBCOMMANDS = tuple(
        CommandInfo(name=name, help=summary, subcommand_class=_ForwardedCommand)
        for name, (_, summary) in SUBCOMMANDS.items()
    )
