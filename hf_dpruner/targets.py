"""Which weights get pruned: the Linear/Conv1D layers inside a model's decoder blocks."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class PrunableWeight:
    """One prunable weight matrix: its module, full parameter name and which dim holds the inputs."""

    name: str  # full parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    module_name: str
    module: nn.Module
    layer_index: int

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def input_dim(self) -> int:
        """nn.Linear stores (out, in); transformers' Conv1D (GPT-2) stores (in, out)."""
        return 0 if isinstance(self.module, Conv1D) else 1

    def as_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a weight-shaped tensor as (out_features, in_features)."""
        return tensor.t() if self.input_dim == 0 else tensor


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.layers``, ``transformer.h``, ...), found generically."""
    # transformers' attribute_map aliases num_hidden_layers for every architecture (GPT-2's n_layer, MPT's n_layers)
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the decoder blocks of {type(model).__name__}: no nn.ModuleList with "
            f"{expected} layers. hf_dpruner supports decoder-only models whose blocks are in one ModuleList."
        )
    return min(candidates, key=lambda item: item[0].count("."))[1]


def _is_prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def find_prunable_weights(model: nn.Module, target_modules: list[str] | None = None) -> dict[str, PrunableWeight]:
    """Map full parameter name -> PrunableWeight for the targeted Linear/Conv1D modules of the decoder blocks.

    `target_modules` entries match the end of a module name (``"q_proj"`` matches ``...self_attn.q_proj``).
    Raises ValueError naming the unknown entries and the available names.
    """
    layers = decoder_layers(model)
    layer_ids = {id(layer): index for index, layer in enumerate(layers)}
    prefix = {id(m): n for n, m in model.named_modules()}
    found: dict[str, PrunableWeight] = {}
    available: set[str] = set()
    for layer in layers:
        layer_prefix = prefix[id(layer)]
        for sub_name, module in layer.named_modules():
            if not _is_prunable(module) or not sub_name:
                continue
            available.add(sub_name.split(".")[-1])
            if target_modules is not None and not any(
                sub_name == t or sub_name.endswith("." + t) for t in target_modules
            ):
                continue
            module_name = f"{layer_prefix}.{sub_name}"
            found[f"{module_name}.weight"] = PrunableWeight(
                f"{module_name}.weight", module_name, module, layer_ids[id(layer)]
            )
    if target_modules is not None:
        unknown = [t for t in target_modules if not any(n.endswith("." + t) or n == t for n in _module_names(found))]
        if unknown:
            raise ValueError(
                f"Unknown target_modules {unknown} for {type(model).__name__}; the decoder blocks contain "
                f"{sorted(available)}."
            )
    if not found:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv1D layers inside its decoder blocks to prune.")
    return found


def _module_names(found: dict[str, PrunableWeight]) -> list[str]:
    return [w.module_name for w in found.values()]


def module_type(param_name: str) -> str:
    """Short type of a weight for summaries: ``"...mlp.down_proj.weight"`` -> ``"down_proj"``."""
    parts = param_name.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]


def group_by_block(weights: dict[str, PrunableWeight]) -> dict[int, list[PrunableWeight]]:
    """The prunable weights of each decoder block, keyed by the block's index."""
    by_block: dict[int, list[PrunableWeight]] = defaultdict(list)
    for weight in weights.values():
        by_block[weight.layer_index].append(weight)
    return dict(by_block)
