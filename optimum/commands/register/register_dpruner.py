"""Registers ``optimum-cli dpruner`` (read by optimum's CLI from the optimum.commands.register namespace)."""

from hf_dpruner.commands.optimum import DPrunerOptimumCommand

REGISTER_COMMANDS = [DPrunerOptimumCommand]
