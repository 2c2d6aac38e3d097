"""General (open-domain) importance G: OBS saliency from layer Hessians, or diagonal Fisher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..distributed import all_reduce_count, all_reduce_sum_
from ..layerwise import input_statistics, iterate_blocks
from ..targets import PrunableWeight, group_by_block
from .base import ImportanceScorer
from .sparsegpt import inverse_hessian_cholesky


def obs_saliency(
    weight_out_in: torch.Tensor,
    hessian: torch.Tensor,
    damping: float,
    name: str = "a weight",
    increased_damping: dict[str, float] | None = None,
) -> torch.Tensor:
    """SparseGPT's per-weight saliency ``W^2 / diag(U)^2`` with ``U = chol(H^-1)`` (upper).

    ``diag(U)^2`` is the OBS denominator ``[H^-1]_qq`` of each column eliminated in order. Inputs that never
    fire (zero Hessian diagonal) get a unit diagonal so the factorisation exists. `name`, `increased_damping`: see
    `inverse_hessian_cholesky`.
    """
    upper, _ = inverse_hessian_cholesky(hessian, damping, name, increased_damping)
    return (weight_out_in.double() ** 2 / torch.diagonal(upper).unsqueeze(0) ** 2).float()


class OBSImportance(ImportanceScorer):
    """OBS/SparseGPT saliency with ``H = (2/n) Σ x xᵀ``, one decoder block at a time (bounded memory).

    Under several processes each rank passes its share of the batches; the Hessians are summed over ranks.
    After `score`, `increased_damping` maps each weight whose Hessian needed more than `damping` to the damping
    used (empty when none did)."""

    name = "obs"

    def __init__(self, damping: float = 0.01) -> None:
        self.damping = damping
        self.increased_damping: dict[str, float] = {}

    @torch.no_grad()
    def score(
        self,
        model: torch.nn.Module,
        weights: Mapping[str, PrunableWeight],
        batches: Sequence[dict[str, torch.Tensor]],
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        by_block = group_by_block(weights)
        scores: dict[str, torch.Tensor] = {}
        self.increased_damping = {}
        for step in iterate_blocks(model, batches, desc="general importance (OBS)", disable_tqdm=disable_tqdm):
            targets = by_block.get(step.index, [])
            statistics = input_statistics(step, targets, batches, gram=True)
            all_reduce_sum_([gram for gram, _ in statistics.values()])
            for w in targets:
                gram, count = statistics[w.name]
                count = all_reduce_count(count, gram.device)
                saliency = obs_saliency(
                    w.as_out_in(w.weight.detach()), gram * (2.0 / count), self.damping, w.name, self.increased_damping
                )
                scores[w.name] = saliency.t().contiguous() if w.input_dim == 0 else saliency
        return scores


class FisherImportance(ImportanceScorer):
    """Second-order Taylor with the diagonal empirical Fisher: ``G = ½ · mean(g²) · W²`` (``Σ g²`` and the batch
    count summed over processes)."""

    name = "fisher"

    def score(
        self,
        model: torch.nn.Module,
        weights: Mapping[str, PrunableWeight],
        batches: Sequence[dict[str, torch.Tensor]],
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        fisher = {name: torch.zeros_like(w.weight, dtype=torch.float32) for name, w in weights.items()}
        was_training = model.training
        requires_grad = {name: w.weight.requires_grad for name, w in weights.items()}
        model.eval()
        try:
            for w in weights.values():
                w.weight.requires_grad_(True)
            for batch in tqdm(batches, desc="general importance (Fisher)", disable=disable_tqdm):
                model.zero_grad(set_to_none=True)
                labels = batch.get("labels", batch["input_ids"])
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                model(**inputs, labels=labels, use_cache=False).loss.backward()
                for name, w in weights.items():
                    fisher[name].add_(w.weight.grad.float() ** 2)
        finally:
            model.zero_grad(set_to_none=True)
            for name, w in weights.items():
                w.weight.requires_grad_(requires_grad[name])
            model.train(was_training)
        all_reduce_sum_(list(fisher.values()))
        count = all_reduce_count(len(batches), next(iter(fisher.values())).device)
        for name, w in weights.items():  # in place: one fp32 buffer per weight, not two
            fisher[name].mul_(w.weight.detach().float() ** 2).mul_(0.5 / count)
        return fisher


def general_scorer(estimator: str, damping: float = 0.01) -> ImportanceScorer:
    """The general-importance scorer named in `DPrunerConfig.general_estimator`."""
    if estimator == "obs":
        return OBSImportance(damping)
    if estimator == "fisher":
        return FisherImportance()
    raise ValueError(f"Unknown general estimator {estimator!r}; valid: 'obs', 'fisher'.")
