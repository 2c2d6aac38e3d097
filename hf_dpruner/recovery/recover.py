"""End-to-end recovery of a pruned model: optional RankAdaptor search, masked-LoRA training with the Trainer, merge."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.utils import logging

from ..data import CausalLMCollator, build_windows, collate_batches
from ..targets import find_prunable_weights, module_type
from ..utils import replacing_folder
from .distillation_trainer import DistillationTrainer
from .lora import get_masked_peft_model, merge_masked_lora
from .performance_model import PerformanceModel
from .rank_space import RankSpace, lora_parameter_count
from .rankadaptor import (
    RankAdaptorConfig,
    RankSearchResult,
    ShortRecoveryRun,
    layer_sparsity,
    layer_statistics,
    lora_config_for,
    search_ranks,
)

logger = logging.get_logger(__name__)

RANK_ALLOCATIONS = ("uniform", "rankadaptor")


@dataclass
class RecoveryArguments:
    """What LoRA recovery trains, and how RankAdaptor searches the per-layer ranks."""

    rank_allocation: str = field(default="uniform", metadata={"help": "'uniform' (one rank) or 'rankadaptor'."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; with rankadaptor the mean rank (the budget)."})
    layer_ranks: list[int] | None = field(
        default=None,
        metadata={"help": "LoRA rank of each decoder layer, e.g. the `layer_ranks` an earlier RankAdaptor search "
                  "recorded: trains with these ranks and runs no search (rank_allocation is then ignored)."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaled with each layer's rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt. Default: the pruned module types of the blocks."}
    )
    num_samples: int = field(default=64, metadata={"help": "Training windows of recovery text."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per window."})
    search_steps: int = field(default=10, metadata={"help": "Optimizer steps of each short search run."})
    search_initial: int = field(default=8, metadata={"help": "Configurations measured before the first model fit."})
    search_rounds: int = field(default=4, metadata={"help": "Predicted-best configurations measured for real."})
    search_eval_samples: int = field(default=8, metadata={"help": "Held-out windows that score each search run."})
    search_min_rounds: int = field(
        default=2, metadata={"help": "Online rounds before a close prediction may stop the search."}
    )
    search_noise_seeds: int = field(
        default=3,
        metadata={"help": "Seeds the uniform ranks are measured with first: the seed noise, reported beside the "
                  "spread between configurations (1: not measured)."},
    )
    distill_weight: float = field(
        default=0.0,
        metadata={"help": "Weight a of distillation from the dense teacher: loss = (1 - a) * LM loss + a * T^2 * "
                  "KL(teacher || student) per predicted token. 0: the LM loss alone; 1: distillation alone. The "
                  "teacher is held in memory beside the student (one more model) and runs one more forward per batch; "
                  "the RankAdaptor search runs stay LM-only."},
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the distillation."})
    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher for distillation: a folder or Hub id. Default: the base model the checkpoint "
                  "records."},
    )
    performance_model: str | None = field(
        default=None,
        metadata={"help": "Folder of logged search runs (offline meta-learning): read if it exists, then written "
                  "back with this search's runs added."},
    )

    def __post_init__(self) -> None:
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise ValueError(f"rank_allocation must be one of {RANK_ALLOCATIONS}, got {self.rank_allocation!r}.")
        for name in ("lora_r", "num_samples", "seq_len", "search_steps", "search_initial", "search_rounds",
                     "search_eval_samples", "search_noise_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.layer_ranks is not None and (not self.layer_ranks or min(self.layer_ranks) < 1):
            raise ValueError(f"layer_ranks must be one rank >= 1 per decoder layer, got {self.layer_ranks!r}.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight!r}.")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}.")


@dataclass
class RecoveryResult:
    model: PreTrainedModel  # merged, still exactly sparse, masks attached
    ranks: tuple[int, ...]
    lora_parameters: int
    search: RankSearchResult | None
    seconds: dict[str, float]


def rank_space_for(num_layers: int, mean_rank: int) -> RankSpace:
    """The paper's grid {2, 4, ..., 16} around rank 8, scaled to other budgets (multiples of 4), else 1..2r."""
    if mean_rank % 4 == 0:
        step = mean_rank // 4
        return RankSpace(num_layers, mean_rank, tuple(step * k for k in range(1, 9)))
    return RankSpace(num_layers, mean_rank, tuple(range(1, 2 * mean_rank + 1)))


def recover(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    args: RecoveryArguments,
    training_args: TrainingArguments,
    adapter_dir: str | Path | None = None,
    teacher: PreTrainedModel | None = None,
) -> RecoveryResult:
    """Recover a pruned model (from `AutoPrunedModelForCausalLM`) with masked LoRA and return it merged.

    With ``rank_allocation="rankadaptor"`` the per-layer ranks come from `search_ranks` (short runs on the training
    windows, scored on `search_eval_samples` windows of `eval_texts`) at the budget of uniform rank `lora_r`. The
    final adapter is trained with `transformers.Trainer` under `training_args` (same steps for both allocations),
    saved in peft format to `adapter_dir` if given, then merged: the result is exactly as sparse as before. With
    ``distill_weight > 0`` the final training distils from `teacher` (the dense model, required then).
    """
    if args.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 needs a teacher: pass the dense model (recover(..., teacher=model)), or "
                         "set distill_weight=0.")
    seconds: dict[str, float] = {}
    targets = args.lora_target_modules or sorted({module_type(n) for n in find_prunable_weights(model)})
    base_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    windows = build_windows(train_texts, tokenizer, args.seq_len, args.num_samples, training_args.seed)
    num_layers = len(layer_sparsity(model))
    space = rank_space_for(num_layers, args.lora_r)
    if args.layer_ranks is not None and len(args.layer_ranks) != num_layers:
        raise ValueError(f"layer_ranks has {len(args.layer_ranks)} ranks but the model has {num_layers} decoder layers "
                         "with prunable weights: give one rank per layer.")
    search = None
    if args.rank_allocation == "rankadaptor" and args.layer_ranks is None:
        start = time.perf_counter()
        device = next(model.parameters()).device
        eval_windows = build_windows(eval_texts, tokenizer, args.seq_len, args.search_eval_samples, training_args.seed)
        bs = training_args.per_device_train_batch_size
        runner = ShortRecoveryRun(
            model, collate_batches(windows, bs, tokenizer.pad_token_id, device),
            collate_batches(eval_windows, bs, tokenizer.pad_token_id, device), base_config,
            max_steps=args.search_steps, learning_rate=training_args.learning_rate, seed=training_args.seed,
        )
        offline = None
        if args.performance_model and (Path(args.performance_model) / "performance_runs.json").is_file():
            offline = PerformanceModel.from_pretrained(args.performance_model)
        search = search_ranks(
            runner, space, layer_statistics(model),
            RankAdaptorConfig(mean_rank=space.mean_rank, rank_choices=space.choices, num_initial=args.search_initial,
                              max_rounds=args.search_rounds, min_rounds=args.search_min_rounds,
                              noise_seeds=args.search_noise_seeds, seed=training_args.seed),
            offline=offline, meta={"model": str(model.config._name_or_path), "steps": args.search_steps},
            disable_tqdm=training_args.disable_tqdm,
        )
        if args.performance_model:
            search.performance_model.save_pretrained(args.performance_model)
        seconds["search"] = time.perf_counter() - start
    if args.layer_ranks is not None:
        ranks = tuple(args.layer_ranks)
    else:
        ranks = search.ranks if search else space.uniform()
    config = lora_config_for(model, base_config, ranks, space.mean_rank)
    start = time.perf_counter()
    set_seed(training_args.seed)  # the adapters' initialisation follows the seed, whatever ran before (the search)
    peft_model: PeftModel = get_masked_peft_model(model, config)
    trainer_kwargs = dict(model=peft_model, args=training_args, train_dataset=windows,
                          data_collator=CausalLMCollator(tokenizer.pad_token_id))
    if args.distill_weight > 0:
        DistillationTrainer(**trainer_kwargs, teacher=teacher, distill_weight=args.distill_weight,
                            distill_temperature=args.distill_temperature).train()
    else:
        Trainer(**trainer_kwargs).train()
    seconds["train"] = time.perf_counter() - start
    if adapter_dir is not None:
        with replacing_folder(adapter_dir) as folder:
            peft_model.save_pretrained(folder)
    merged = merge_masked_lora(peft_model)
    recovery = merged.pruning_record["recovery"]
    allocation = "given" if args.layer_ranks is not None else args.rank_allocation
    recovery.update(rank_allocation=allocation, layer_ranks=list(ranks), max_steps=training_args.max_steps,
                    num_samples=len(windows), seq_len=args.seq_len)
    if args.distill_weight > 0:
        recovery["distillation"] = {"weight": args.distill_weight, "temperature": args.distill_temperature,
                                    "teacher": args.teacher or str(getattr(teacher.config, "_name_or_path", ""))}
    if search is not None:
        recovery["search"] = {"runs": len(search.history), "seconds": round(seconds["search"], 1),
                              "short_run_steps": args.search_steps, "uniform_log_ppl": search.uniform_score,
                              "chosen_log_ppl": search.score}
        if search.noise is not None:
            recovery["search"]["noise"] = {k: search.noise[k] for k in ("seeds", "seed_std", "configs", "config_std",
                                                                         "signal_to_noise")}
    return RecoveryResult(merged, tuple(ranks), lora_parameter_count(model, ranks, targets), search, seconds)


def plot_ranks(ranks: Sequence[int], path: str | Path, title: str = "LoRA rank per decoder layer") -> Path | None:
    """Bar plot of the per-layer ranks (PNG); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no rank plot (pip install matplotlib).")
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(ranks)), 3.0))
    ax.bar(range(len(ranks)), ranks)
    ax.axhline(sum(ranks) / len(ranks), color="gray", linestyle="--", linewidth=1, label="mean (budget)")
    ax.set(xlabel="decoder layer", ylabel="LoRA rank", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
