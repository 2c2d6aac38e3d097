"""One-shot pruning of MLP neurons: a smaller ``intermediate_size``, the other structured peer of PAT.

Where width pruning (`width_prune`) removes hidden channels of the residual stream, this removes neurons of every
MLP (LLM-Pruner / Minitron's "neuron" axis): rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``, the
same number in every layer, so the result is a standard checkpoint with a smaller ``intermediate_size``.

Neuron ``j`` of a layer is scored by the energy it sends to the residual stream, ``E[h_j²] · ‖W_down[:, j]‖²``
(``h = act(gate(x)) · up(x)``, mean over the calibration tokens). With ``compensate=True`` each ``down_proj`` is
refitted by least squares to reproduce its dense output from the kept neurons,
``W′ = W · Σ h h_Sᵀ · (Σ h_S h_Sᵀ + λI)⁻¹``, on the same tokens (the dense trajectory, one forward pass). The refit
holds one ``intermediate_size²`` float64 matrix per layer on the CPU (0.57 GB for SmolLM2-135M's 30 × 1536²).

``selection="obs"`` chooses the neurons by the error they leave after that refit (greedy Optimal Brain Surgeon,
`neuron_selection.obs_neuron_selection`) instead of by their energy, and always refits ``down_proj``.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .calibration import Batches, CalibrationBatch, calibration_pass
from .modules import check_supported
from .neuron_selection import obs_neuron_selection

SELECTIONS = ("energy", "obs")


def neurons_for_parameters(model: PreTrainedModel, parameters: int) -> int:
    """How many neurons per MLP to remove so that about `parameters` parameters go (each neuron holds one row of
    ``gate_proj`` and ``up_proj`` and one column of ``down_proj`` in every layer)."""
    per_neuron = 3 * model.config.hidden_size * len(model.model.layers)
    return min(model.config.intermediate_size - 1, max(0, round(parameters / per_neuron)))


@torch.no_grad()
def mlp_statistics(model: PreTrainedModel, batches: Batches, gram: bool) -> list[torch.Tensor]:
    """Per layer, ``Σ h²`` per neuron (``gram=False``) or ``Σ h hᵀ`` (``gram=True``, float64) over the calibration
    tokens of the input of ``down_proj``."""
    layers = model.model.layers
    size = model.config.intermediate_size
    stats = [torch.zeros((size, size) if gram else (size,), dtype=torch.float64) for _ in layers]
    current = CalibrationBatch()

    def hook(index: int):
        def record(module, args):
            h = current.tokens(args[0], size)
            stats[index].add_(h.t() @ h if gram else h.pow(2).sum(0))  # per batch in float32, summed in float64

        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    calibration_pass([model], batches, current, handles)
    return stats


def prune_mlp_neurons(
    model: PreTrainedModel,
    num_removed: int,
    calibration: Batches,
    compensate: bool = False,
    damping: float = 0.01,
    selection: str = "energy",
) -> PreTrainedModel:
    """A new, smaller standard model without `num_removed` MLP neurons in each layer, scored on the `calibration`
    batches (``input_ids``, optionally ``attention_mask``); `model` is unchanged.

    ``selection="energy"`` removes the neurons of least output energy (refitting ``down_proj`` with
    ``compensate=True``); ``"obs"`` removes those whose loss the refit of the others compensates best, and refits.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                      num_attention_heads=2, vocab_size=64))
        >>> small = prune_mlp_neurons(model, 16, [{"input_ids": torch.randint(0, 64, (2, 16))}], compensate=True)
        >>> small.config.intermediate_size
        48
    """
    check_supported(model)
    size = model.config.intermediate_size
    if not isinstance(num_removed, int) or not 0 < num_removed < size:
        raise ValueError(f"num_removed must be an integer in (0, {size}) (the intermediate size), got {num_removed!r}.")
    if not calibration:
        raise ValueError("prune_mlp_neurons needs at least one calibration batch to score the neurons.")
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping!r}.")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
    kept = size - num_removed
    layers = model.model.layers
    if selection == "obs":
        stats = mlp_statistics(model, calibration, gram=True)
        chosen = [obs_neuron_selection(s, layer.mlp.down_proj.weight, num_removed, damping)
                  for s, layer in zip(stats, layers, strict=True)]
        state = neuron_subset_state_dict(model.state_dict(), torch.stack([keep for keep, _ in chosen]))
        for i, (_, refit) in enumerate(chosen):
            state[f"model.layers.{i}.mlp.down_proj.weight"] = refit
        return smaller_mlp_model(model, state, kept)
    stats = mlp_statistics(model, calibration, gram=compensate)
    energy = [torch.diagonal(s) if compensate else s for s in stats]
    keep = torch.stack([torch.argsort(neuron_scores(e, layer), descending=True, stable=True)[:kept].sort().values
                        for e, layer in zip(energy, layers, strict=True)])
    state = neuron_subset_state_dict(model.state_dict(), keep)  # load_state_dict copies: `model` stays as it is
    if compensate:
        for i, layer in enumerate(layers):
            down = layer.mlp.down_proj.weight.detach().double().cpu()
            g = stats[i][keep[i]][:, keep[i]]
            g = g + damping * torch.diagonal(g).mean().clamp_min(1e-12) * torch.eye(kept, dtype=g.dtype)
            refit = torch.linalg.solve(g, stats[i][keep[i]] @ down.t()).t()  # W Σ h h_Sᵀ (Σ h_S h_Sᵀ + λI)⁻¹
            state[f"model.layers.{i}.mlp.down_proj.weight"] = refit.to(layer.mlp.down_proj.weight.dtype).contiguous()
    return smaller_mlp_model(model, state, kept)


def neuron_scores(energy: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """``E[h_j²] · ‖W_down[:, j]‖²`` per neuron of `layer`'s MLP, from the per-neuron `energy` (``Σ h²``); a
    LoRA-wrapped ``down_proj`` contributes its base weight (exact before training, when PAT's mask starts)."""
    down = layer.mlp.down_proj
    weight = down.get_base_layer().weight if hasattr(down, "get_base_layer") else down.weight
    return energy.double().cpu() * weight.detach().double().cpu().pow(2).sum(0)


def neuron_subset_state_dict(state: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """`state` (a Llama-family state dict) with only the neurons ``keep[i]`` (sorted indices, a row per layer) of
    every MLP: rows of ``gate_proj``/``up_proj`` and columns of ``down_proj``."""
    state = dict(state)
    for i, kept in enumerate(keep.cpu()):
        prefix = f"model.layers.{i}.mlp"
        for name in ("gate_proj", "up_proj"):
            for kind in ("weight", "bias"):
                if f"{prefix}.{name}.{kind}" in state:
                    state[f"{prefix}.{name}.{kind}"] = state[f"{prefix}.{name}.{kind}"][kept].contiguous()
        state[f"{prefix}.down_proj.weight"] = state[f"{prefix}.down_proj.weight"][:, kept].contiguous()
    return state


def smaller_mlp_model(model: PreTrainedModel, state: dict[str, torch.Tensor], kept: int) -> PreTrainedModel:
    """A new model of `model`'s class and dtype with ``intermediate_size = kept``, holding `state`."""
    config = copy.deepcopy(model.config)
    config.intermediate_size = kept
    small = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    small.load_state_dict(state)
    if config.tie_word_embeddings:
        small.tie_weights()
    small.generation_config = copy.deepcopy(model.generation_config)
    return small.eval()
