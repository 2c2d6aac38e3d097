"""Per-hidden-channel importance, to start PAT's shared mask from what matters instead of from zeros.

- `activation_channel_importance`: the magnitude of each hidden channel at the outputs of the RMSNorms on the
  residual stream (Minitron's activation-based width importance, Muralidharan et al. 2024): per norm, the mean
  ``|x_i|`` over a window's tokens, aggregated over windows by their root mean square; each norm's vector is scaled
  to mean 1 and the norms are summed, so no layer dominates by its scale.
- `taylor_channel_importance`: first-order Taylor estimate of the loss change when channel ``i`` is closed at every
  HSM: ``Σ_batches |∂L/∂gate_i|`` at the all-open gate.
- `logits_from_importance`: the mask logits, ``scale ·`` the standardised log-importance, so the initial top-k
  follows the importance and the channels near the boundary can still swap during the warm-up.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import Batches, CalibrationBatch, calibration_pass
from .modules import PATModules


def _residual_norms(base: nn.Module) -> list[nn.Module]:
    layers = base.model.layers
    return [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [base.model.norm]


def activation_channel_importance(base: nn.Module, batches: Batches) -> torch.Tensor:
    """Float32 ``[hidden_size]`` activation importance of the hidden channels of a Llama-family `base` model (with
    or without PAT modules attached: call it while the gate is all open) over the calibration `batches`."""
    norms = _residual_norms(base)
    squares = [None] * len(norms)
    current = CalibrationBatch()

    def hook(index: int):
        def record(module, args, output):
            out = output.detach().float().abs()  # [batch, tokens, hidden]
            if current.attention_mask is not None:
                weights = current.attention_mask.to(out.device, out.dtype).unsqueeze(-1)
                per_window = (out * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            else:
                per_window = out.mean(1)
            total = per_window.pow(2).sum(0)
            squares[index] = total if squares[index] is None else squares[index] + total

        return record

    handles = [norm.register_forward_hook(hook(i)) for i, norm in enumerate(norms)]
    windows = calibration_pass([base], batches, current, handles)
    if not windows:
        raise ValueError("activation_channel_importance needs at least one calibration batch.")
    importance = torch.zeros_like(squares[0])
    for total in squares:
        rms = (total / windows).sqrt()
        importance += rms / rms.mean().clamp_min(1e-12)
    return importance.cpu()


def taylor_channel_importance(model: nn.Module, pat: PATModules, batches: Batches) -> torch.Tensor:
    """Float32 ``[hidden_size]``: ``Σ_batches |∂L/∂gate_i|`` of the LM loss at the all-open gate of `pat`, on a
    model prepared by `get_pat_model` (its parameters get no gradients)."""
    if not batches:
        raise ValueError("taylor_channel_importance needs at least one calibration batch.")
    gate = torch.ones(pat.mask.hidden_size, device=pat.mask.logits.device, requires_grad=True)
    importance = torch.zeros(pat.mask.hidden_size)
    was_training = model.training
    model.eval()
    try:
        with pat.fixed_gate(gate), torch.enable_grad():
            for batch in batches:
                labels = batch.get("labels", batch["input_ids"])
                loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             labels=labels).loss
                (grad,) = torch.autograd.grad(loss, gate)
                importance += grad.detach().abs().float().cpu()
    finally:
        model.train(was_training)
    return importance


def logits_from_importance(importance: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · (log s − mean) / std`` of the importance `s` (higher importance, higher logit)."""
    if importance.ndim != 1 or not torch.isfinite(importance).all() or (importance < 0).any():
        raise ValueError("Channel importance must be a finite, non-negative vector.")
    logs = importance.float().clamp_min(1e-12).log()
    return scale * (logs - logs.mean()) / logs.std().clamp_min(1e-12)
