"""General (open-domain) importance G: OBS saliency from layer Hessians, or diagonal Fisher."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..distributed import all_reduce_count, all_reduce_sum_
from ..layerwise import input_statistics, iterate_blocks
from ..targets import PrunableWeight
from .base import ImportanceScorer
from .sparsegpt import inverse_hessian_cholesky


def obs_saliency(weight_out_in: torch.Tensor, hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """SparseGPT's per-weight saliency ``W^2 / diag(U)^2`` with ``U = chol(H^-1)`` (upper).

    ``diag(U)^2`` is the OBS denominator ``[H^-1]_qq`` of each column eliminated in order. Inputs that never
    fire (zero Hessian diagonal) get a unit diagonal so the factorisation exists.
    """
    upper, _ = inverse_hessian_cholesky(hessian, damping)
    return (weight_out_in.double() ** 2 / torch.diagonal(upper).unsqueeze(0) ** 2).float()


class OBSImportance(ImportanceScorer):
    """OBS/SparseGPT saliency with ``H = (2/n) Σ x xᵀ``, one decoder block at a time (bounded memory).

    Under several processes each rank passes its share of the batches; the Hessians are summed over ranks."""

    name = "obs"

    def __init__(self, damping: float = 0.01) -> None:
        self.damping = damping

    @torch.no_grad()
    def score(
        self,
        model: torch.nn.Module,
        weights: Mapping[str, PrunableWeight],
        batches: Sequence[dict[str, torch.Tensor]],
        disable_tqdm: bool = False,
    ) -> dict[str, torch.Tensor]:
        by_block: dict[int, list[PrunableWeight]] = defaultdict(list)
        for weight in weights.values():
            by_block[weight.layer_index].append(weight)
        scores: dict[str, torch.Tensor] = {}
        for step in iterate_blocks(model, batches, desc="general importance (OBS)", disable_tqdm=disable_tqdm):
            targets = by_block.get(step.index, [])
            statistics = input_statistics(step, targets, batches, gram=True)
            all_reduce_sum_([gram for gram, _ in statistics.values()])
            for w in targets:
                gram, count = statistics[w.name]
                count = all_reduce_count(count, gram.device)
                saliency = obs_saliency(w.as_out_in(w.weight.detach()), gram * (2.0 / count), self.damping)
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
                model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels, use_cache=False).loss.backward()
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
