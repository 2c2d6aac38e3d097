"""RankAdaptor (Zhou et al. 2024): per-layer LoRA ranks for recovering a pruned model, chosen under a fixed budget by
a performance model trained on short real recovery runs (offline runs reused, then refined online)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import cycle

import torch
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.utils import logging

from ..targets import find_prunable_weights
from .lora import get_masked_peft_model
from .performance_model import PerformanceModel, RecoveryRun
from .rank_space import RankSpace, rank_patterns

logger = logging.get_logger(__name__)


@dataclass
class RankAdaptorConfig:
    """Settings of the rank search."""

    mean_rank: int = field(default=8, metadata={"help": "Budget: ranks sum to mean_rank x layers (= uniform LoRA)."})
    rank_choices: tuple[int, ...] = field(
        default=(2, 4, 6, 8, 10, 12, 14, 16), metadata={"help": "Ranks a layer may get."}
    )
    num_initial: int = field(default=8, metadata={"help": "Configurations measured before the first fit (uniform "
                                                  "included); a quarter of it when offline runs are given."})
    max_rounds: int = field(default=4, metadata={"help": "Predicted-best configurations measured for real, at most."})
    min_rounds: int = field(
        default=2, metadata={"help": "Online rounds before the tolerance may stop the search (at most max_rounds)."}
    )
    noise_seeds: int = field(
        default=1,
        metadata={"help": "Seeds the uniform configuration is measured with, to compare the seed noise with the "
                  "spread between configurations (1: not measured; more needs evaluate(..., seed=s))."},
    )
    num_candidates: int = field(default=2000, metadata={"help": "Random configurations scored per round."})
    tolerance: float = field(default=0.01, metadata={"help": "Stop once a predicted gain over uniform (in "
                                                     "log-perplexity) is within this of the measured one."})
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_initial", "max_rounds", "num_candidates", "noise_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.min_rounds < 0:
            raise ValueError(f"min_rounds must be >= 0, got {self.min_rounds}.")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}.")


@dataclass
class RankSearchResult:
    """The chosen ranks (the best *measured* configuration), the uniform baseline and every measured run."""

    ranks: tuple[int, ...]
    score: float  # log-perplexity of the chosen ranks after the short run
    uniform_score: float
    history: list[dict]
    seconds: float
    performance_model: PerformanceModel
    noise: dict | None = None  # seed spread of the uniform configuration vs spread between configurations


def layer_statistics(model: PreTrainedModel) -> list[float]:
    """What the performance model knows of each decoder layer: its fraction of pruned weights (the paper's
    statistic), followed, when the pruning recorded them for every layer (``calibration.block_errors`` of the
    reconstruction methods), by each block's relative output error divided by the largest (a per-layer
    sensitivity)."""
    sparsity = layer_sparsity(model)
    errors = ((getattr(model, "pruning_record", None) or {}).get("calibration") or {}).get("block_errors") or {}
    values = [errors.get(str(i)) for i in range(len(sparsity))]
    if not errors or any(v is None for v in values):
        return sparsity
    top = max(values) or 1.0
    return sparsity + [float(v) / top for v in values]


def layer_sparsity(model: PreTrainedModel) -> list[float]:
    """Fraction of pruned weights per decoder layer (the per-layer statistic the performance model sees)."""
    weights = find_prunable_weights(model)
    masks = getattr(model, "pruning_masks", {}) or {}
    pruned: dict[int, list[int]] = {}
    for name, w in weights.items():
        counts = pruned.setdefault(w.layer_index, [0, 0])
        counts[0] += int((~masks[name]).sum()) if name in masks else 0
        counts[1] += w.weight.numel()
    return [pruned[i][0] / pruned[i][1] for i in sorted(pruned)]


class ShortRecoveryRun:
    """Measures a rank vector for real: masked LoRA with those ranks, `max_steps` AdamW steps on `train_batches`,
    then the mean token NLL (log-perplexity) on `eval_batches`. The pruned model is reused: the adapter is unloaded
    after each run, so the base weights never change."""

    def __init__(self, model: PreTrainedModel, train_batches: Sequence[dict], eval_batches: Sequence[dict],
                 lora_config: LoraConfig, max_steps: int = 20, learning_rate: float = 2e-4, seed: int = 0) -> None:
        if not train_batches or not eval_batches:
            raise ValueError("A short recovery run needs non-empty train_batches and eval_batches.")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
        self.model, self.train_batches, self.eval_batches = model, list(train_batches), list(eval_batches)
        self.lora_config, self.max_steps, self.learning_rate, self.seed = lora_config, max_steps, learning_rate, seed

    def __call__(self, ranks: Sequence[int], mean_rank: int, seed: int | None = None) -> float:
        torch.manual_seed(self.seed if seed is None else seed)
        peft_model = get_masked_peft_model(self.model, lora_config_for(self.model, self.lora_config, ranks, mean_rank))
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.learning_rate)
            peft_model.train()
            for _, batch in zip(range(self.max_steps), cycle(self.train_batches)):
                loss = peft_model(**{"labels": batch["input_ids"], **batch}).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return _mean_nll(peft_model, self.eval_batches)
        finally:
            peft_model.unload()  # back to the bare pruned model (adapters removed, nothing merged)
            self.model.eval()


def lora_config_for(model: PreTrainedModel, base: LoraConfig, ranks: Sequence[int], mean_rank: int) -> LoraConfig:
    """A copy of `base` whose ``rank_pattern``/``alpha_pattern`` give decoder layer i rank ``ranks[i]``."""
    targets = base.target_modules
    rank_pattern, alpha_pattern = rank_patterns(
        model, ranks, base.lora_alpha, mean_rank,
        None if targets in (None, "all-linear") else [targets] if isinstance(targets, str) else list(targets),
    )
    config = copy.deepcopy(base)
    config.r, config.rank_pattern, config.alpha_pattern = mean_rank, rank_pattern, alpha_pattern
    return config


@torch.no_grad()
def _mean_nll(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {"labels": batch["input_ids"], **batch}
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return total / count


def search_ranks(
    evaluate: Callable[[Sequence[int], int], float],
    space: RankSpace,
    layer_stats: Sequence[float],
    config: RankAdaptorConfig | None = None,
    offline: PerformanceModel | None = None,
    meta: dict | None = None,
    disable_tqdm: bool = False,
) -> RankSearchResult:
    """Find per-layer ranks with the sum fixed by `space`.

    Measures the uniform configuration and random ones with `evaluate(ranks, mean_rank) -> log-perplexity`, fits the
    performance model on the gains over uniform (together with the `offline` runs of other models of the family),
    then repeatedly measures the configuration it predicts best and refits, until (after `config.min_rounds`) a
    prediction is within `config.tolerance` or `config.max_rounds` is reached. Returns the best configuration
    actually measured. With ``config.noise_seeds > 1`` the uniform configuration is also measured with seeds
    ``1 .. noise_seeds - 1`` (`evaluate(..., seed=s)`), and the result's ``noise`` compares that seed spread with
    the spread between the initial configurations; a warning says when the runs cannot tell configurations apart.
    """
    config = config or RankAdaptorConfig(mean_rank=space.mean_rank, rank_choices=space.choices)
    start = time.perf_counter()
    model = PerformanceModel(max_rank=max(space.choices), seed=config.seed, runs=offline.runs if offline else ())
    measured: dict[tuple[int, ...], float] = {}
    history: list[dict] = []
    progress = tqdm(total=config.num_initial + config.max_rounds, desc="rank search", disable=disable_tqdm)

    def measure(ranks: tuple[int, ...], phase: str, predicted: float | None = None) -> float:
        if not space.is_valid(ranks):
            raise ValueError(f"Rank vector {ranks} breaks the budget (sum {space.budget}, choices {space.choices}).")
        nll = evaluate(ranks, space.mean_rank)
        if not math.isfinite(nll):
            raise ValueError(f"The recovery run of ranks {ranks} gave a non-finite loss ({nll}): lower the learning "
                             "rate.")
        measured[ranks] = nll
        gain = nll - measured[space.uniform()] if space.uniform() in measured else 0.0
        model.add_run(RecoveryRun(list(ranks), list(layer_stats), gain, dict(meta or {})))
        history.append({"ranks": list(ranks), "log_ppl": nll, "gain": gain, "predicted_gain": predicted,
                        "phase": phase})
        progress.update(1)
        return gain

    num_initial = config.num_initial if offline is None or len(offline.runs) < 2 else max(2, config.num_initial // 4)
    measure(space.uniform(), "initial")
    for ranks in space.candidates(num_initial - 1, seed=config.seed, exclude=[space.uniform()]):
        measure(ranks, "initial")
    noise = None
    if config.noise_seeds > 1:
        base_seed = getattr(evaluate, "seed", 0)
        scores = [measured[space.uniform()]] + [evaluate(space.uniform(), space.mean_rank, seed=base_seed + k)
                                                for k in range(1, config.noise_seeds)]
        noise = spread_summary(scores, [h["log_ppl"] for h in history if h["phase"] == "initial"])
        if noise["signal_to_noise"] is not None and noise["signal_to_noise"] < 2.0:
            logger.warning(
                f"RankAdaptor: the spread between configurations ({noise['config_std']:.4f} log-ppl) is less than "
                f"twice the seed noise of one configuration ({noise['seed_std']:.4f}): the short runs measure noise. "
                "Use more search steps (search_steps) or held-out windows (search_eval_samples)."
            )
    for round_index in range(config.max_rounds):
        model.fit()
        candidates = space.candidates(config.num_candidates, seed=config.seed + 1 + round_index, exclude=list(measured))
        if not candidates:
            break
        predictions = model.predict(candidates, layer_stats)
        best = int(predictions.argmin())
        gain = measure(candidates[best], "online", float(predictions[best]))
        if round_index + 1 >= config.min_rounds and abs(gain - float(predictions[best])) <= config.tolerance:
            break
    progress.close()
    model.fit()
    chosen = min(measured, key=measured.get)
    logger.info(f"RankAdaptor: {len(measured)} short runs; chosen ranks {chosen} (log-ppl {measured[chosen]:.4f} vs "
                f"uniform {measured[space.uniform()]:.4f}).")
    return RankSearchResult(chosen, measured[chosen], measured[space.uniform()], history,
                            time.perf_counter() - start, model, noise)


def spread_summary(seed_scores: Sequence[float], config_scores: Sequence[float]) -> dict:
    """Standard deviations of one configuration's score over seeds and of the scores of different configurations,
    and their ratio (``signal_to_noise``, None for no seed noise; above ~2 the search can rank configurations)."""
    def std(values: Sequence[float]) -> float:
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))

    seed_std, config_std = std(seed_scores), std(config_scores)
    ratio = config_std / seed_std if seed_std > 0 else None
    return {"seeds": len(seed_scores), "seed_scores": list(seed_scores), "seed_std": seed_std,
            "configs": len(config_scores), "config_std": config_std, "signal_to_noise": ratio}
