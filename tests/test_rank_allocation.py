"""RankAdaptor: budget-exact rank spaces, peft rank patterns, the performance model and the search."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from hf_dpruner import (
    AutoPrunedModelForCausalLM,
    DPrunerConfig,
    get_masked_peft_model,
    make_pruned,
)
from hf_dpruner.commands.cli import main as cli_main
from hf_dpruner.importance import MagnitudeImportance
from hf_dpruner.masks import compute_masks
from hf_dpruner.recovery import (
    PerformanceModel,
    RankAdaptorConfig,
    RankSpace,
    RecoveryRun,
    ShortRecoveryRun,
    layer_sparsity,
    layer_statistics,
    lora_parameter_count,
    rank_patterns,
    search_ranks,
)
from hf_dpruner.targets import find_prunable_weights

from testing_utils import build_tiny, make_batches, text


def pruned(arch: str = "llama", num_hidden_layers: int = 4, layer_sparsity_map=None):
    overrides = {"num_hidden_layers": num_hidden_layers} if arch != "gpt2" else {"n_layer": num_hidden_layers}
    model = build_tiny(arch, **overrides)
    config = DPrunerConfig(sparsity=0.5, layer_sparsity=layer_sparsity_map)
    weights = find_prunable_weights(model)
    masks = compute_masks(MagnitudeImportance().score(model, weights), weights, config)
    return make_pruned(model, masks, config, {"method": "magnitude"}, apply=True)


# ---- the rank space ----

@pytest.mark.parametrize("num_layers,mean_rank", [(1, 8), (4, 8), (30, 8), (6, 2), (6, 16)])
def test_every_sampled_vector_respects_the_budget_exactly(num_layers, mean_rank):
    space = RankSpace(num_layers, mean_rank)
    rng = random.Random(0)
    samples = [space.sample(rng) for _ in range(300)] + space.candidates(200, seed=1)
    for ranks in samples:
        assert sum(ranks) == mean_rank * num_layers and all(r in space.choices for r in ranks)
        assert space.is_valid(ranks)
    if num_layers > 1 and 2 < mean_rank < 16:
        assert len(set(samples)) > 50  # the search space is actually explored


def test_candidates_are_distinct_and_exclude_measured():
    space = RankSpace(4, 8)
    excluded = [space.uniform(), (10, 6, 8, 8)]
    found = space.candidates(100, seed=3, exclude=excluded)
    assert len(found) == len(set(found)) == 100
    assert not set(found) & set(excluded)


def test_invalid_spaces_and_vectors():
    with pytest.raises(ValueError, match="mean_rank 5 must be one of"):
        RankSpace(4, 5)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        RankSpace(0, 8)
    space = RankSpace(3, 8)
    assert not space.is_valid((8, 8)) and not space.is_valid((8, 8, 10)) and not space.is_valid((7, 8, 9))


# ---- peft patterns ----

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rank_pattern_keys_are_peft_module_names(arch):
    model = pruned(arch, num_hidden_layers=3)
    ranks = (4, 8, 12)
    rank_pattern, alpha_pattern = rank_patterns(model, ranks, lora_alpha=16, mean_rank=8, target_modules=None)
    module_names = {name for name, _ in model.named_modules()}
    assert set(rank_pattern) <= module_names
    counted, uniform = lora_parameter_count(model, ranks), lora_parameter_count(model, (8, 8, 8))
    assert counted == uniform  # same budget, same number of LoRA parameters
    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]
    peft_model = get_masked_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == len(rank_pattern)
    for name, layer in layers.items():
        key = name.removeprefix("base_model.model.")
        layer_index = int(key.split(".")[2])  # model.layers.<i>... / transformer.h.<i>...
        assert layer.r["default"] == ranks[layer_index] == rank_pattern[key]
        assert layer.scaling["default"] == pytest.approx(16 / 8)  # alpha scales with r: same scaling everywhere
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert trainable == counted


def test_layer_sparsity_follows_the_masks():
    model = pruned(num_hidden_layers=3, layer_sparsity_map={r"layers\.1\.": 0.2})
    stats = layer_sparsity(model)
    assert stats[0] == pytest.approx(0.5, abs=1e-3) and stats[1] == pytest.approx(0.2, abs=1e-3)
    assert stats[2] == pytest.approx(0.5, abs=1e-3)


# ---- the performance model ----

def synthetic_runs(count: int, seed: int = 0) -> list[RecoveryRun]:
    """A known law: more rank on the first layers helps (score = -0.01 * (r_1 + r_2 - r_3 - r_4))."""
    space, rng = RankSpace(4, 8), random.Random(seed)
    runs = []
    for _ in range(count):
        ranks = space.sample(rng)
        runs.append(RecoveryRun(list(ranks), [0.5] * 4, -0.01 * (ranks[0] + ranks[1] - ranks[2] - ranks[3])))
    return runs


def test_performance_model_learns_and_round_trips(tmp_path):
    model = PerformanceModel(runs=synthetic_runs(40)).fit()
    probe = [(16, 16, 2, 2), (2, 2, 16, 16), (8, 8, 8, 8)]
    predicted = model.predict(probe, [0.5] * 4)
    assert predicted[0] < predicted[2] < predicted[1]  # it learned the direction of the law
    assert predicted[0] == pytest.approx(-0.28, abs=0.08)
    model.save_pretrained(tmp_path / "pm")
    saved = json.loads((tmp_path / "pm" / "performance_runs.json").read_text())
    assert len(saved) == 40 and saved[0]["ranks"] == model.runs[0].ranks
    reloaded = PerformanceModel.from_pretrained(tmp_path / "pm")
    assert reloaded.predict(probe, [0.5] * 4).tolist() == pytest.approx(predicted.tolist(), abs=1e-9)


def test_performance_model_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 2 runs"):
        PerformanceModel(runs=synthetic_runs(1)).fit()
    with pytest.raises(ValueError, match="not fitted"):
        PerformanceModel().predict([(8, 8, 8, 8)], [0.5] * 4)
    with pytest.raises(ValueError, match="per model family"):
        PerformanceModel(runs=synthetic_runs(2)).add_run(RecoveryRun([8, 8], [0.5, 0.5], 0.0))
    with pytest.raises(FileNotFoundError, match="performance_runs.json"):
        PerformanceModel.from_pretrained(tmp_path)
    (tmp_path / "performance_runs.json").write_text("[{")
    (tmp_path / "performance_model.json").write_text("{}")
    with pytest.raises(ValueError, match="not valid JSON"):
        PerformanceModel.from_pretrained(tmp_path)


# ---- the search ----

def test_search_finds_the_better_allocation_of_a_known_law():
    space = RankSpace(4, 8)
    calls = []

    def evaluate(ranks, mean_rank):
        calls.append(tuple(ranks))
        return 3.0 - 0.01 * (ranks[0] + ranks[1] - ranks[2] - ranks[3])

    result = search_ranks(evaluate, space, [0.5] * 4, RankAdaptorConfig(num_initial=8, max_rounds=6, seed=0),
                          disable_tqdm=True)
    assert calls[0] == space.uniform() and result.uniform_score == pytest.approx(3.0)
    assert all(space.is_valid(c) for c in calls) and len(calls) == len(set(calls))  # never measured twice
    assert result.score < result.uniform_score - 0.05  # clearly better than uniform
    assert result.ranks[0] + result.ranks[1] > result.ranks[2] + result.ranks[3]
    assert result.score == min(evaluate(c, 8) for c in calls[: len(result.history)])
    online = [h for h in result.history if h["phase"] == "online"]
    assert online and all(h["predicted_gain"] is not None for h in online)


def test_the_search_measures_the_seed_noise_against_the_spread_between_configurations(caplog):
    space = RankSpace(4, 8)
    seeds = []

    def evaluate(ranks, mean_rank, seed=0):
        seeds.append(seed)
        return 3.0 - 0.01 * (ranks[0] + ranks[1] - ranks[2] - ranks[3]) + 0.002 * seed

    config = RankAdaptorConfig(num_initial=4, max_rounds=1, noise_seeds=3)
    result = search_ranks(evaluate, space, [0.5] * 4, config, disable_tqdm=True)
    noise = result.noise
    assert seeds.count(1) == 1 and seeds.count(2) == 1 and len(result.history) == 5  # noise runs are not history
    assert noise["seed_scores"] == pytest.approx([3.0, 3.002, 3.004]) and noise["seed_std"] == pytest.approx(0.002)
    scores = [h["log_ppl"] for h in result.history if h["phase"] == "initial"]
    assert noise["configs"] == 4 and noise["config_std"] == pytest.approx(float(np.std(scores, ddof=1)))
    assert noise["signal_to_noise"] == pytest.approx(noise["config_std"] / 0.002)

    def noisy(ranks, mean_rank, seed=0):  # seeds move the score far more than the ranks do
        return 3.0 + 0.0001 * ranks[0] + 0.5 * seed

    with caplog.at_level("WARNING", logger="hf_dpruner"):
        assert search_ranks(noisy, space, [0.5] * 4, config, disable_tqdm=True).noise["signal_to_noise"] < 0.01
    assert "the short runs measure noise" in caplog.text
    assert search_ranks(lambda r, m: 3.0, space, [0.5] * 4, RankAdaptorConfig(num_initial=2, max_rounds=1),
                        disable_tqdm=True).noise is None  # 1 seed (the default): not measured


def test_the_tolerance_stops_the_search_only_after_min_rounds():
    space = RankSpace(4, 8)

    def evaluate(ranks, mean_rank):
        return 3.0  # every prediction of a zero gain is exact at once

    rounds = [sum(h["phase"] == "online" for h in search_ranks(
        evaluate, space, [0.5] * 4, RankAdaptorConfig(num_initial=4, max_rounds=5, min_rounds=m, tolerance=1.0),
        disable_tqdm=True).history) for m in (0, 3)]
    assert rounds == [1, 3]
    with pytest.raises(ValueError, match="min_rounds must be >= 0"):
        RankAdaptorConfig(min_rounds=-1)


def test_layer_statistics_add_the_recorded_block_errors():
    model = pruned(num_hidden_layers=3)
    assert layer_statistics(model) == layer_sparsity(model)  # magnitude pruning records no block errors
    model.pruning_record["calibration"] = {"block_errors": {"0": 0.1, "1": 0.4, "2": 0.2}}
    assert layer_statistics(model) == pytest.approx(layer_sparsity(model) + [0.25, 1.0, 0.5])
    model.pruning_record["calibration"]["block_errors"] = {"0": 0.1}  # not every layer: left out
    assert layer_statistics(model) == layer_sparsity(model)


def test_offline_runs_shorten_the_initial_phase():
    space = RankSpace(4, 8)
    prior = PerformanceModel(runs=synthetic_runs(30, seed=5)).fit()
    calls = []

    def evaluate(ranks, mean_rank):
        calls.append(ranks)
        return 3.0 - 0.01 * (ranks[0] + ranks[1] - ranks[2] - ranks[3])

    result = search_ranks(evaluate, space, [0.5] * 4, RankAdaptorConfig(num_initial=8, max_rounds=2), offline=prior,
                          disable_tqdm=True)
    assert sum(h["phase"] == "initial" for h in result.history) == 2
    assert len(result.performance_model.runs) == 30 + len(calls)


def test_search_on_a_tiny_model_with_real_short_recovery_runs():
    model = pruned(num_hidden_layers=3)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = make_batches(n_batches=2, batch_size=2, length=16, seed=0)
    eval_batches = make_batches(n_batches=1, batch_size=2, length=16, seed=1)
    run = ShortRecoveryRun(model, batches, eval_batches, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                           max_steps=3, learning_rate=1e-2)
    space = RankSpace(3, 8, choices=(4, 8, 12))
    result = search_ranks(run, space, layer_sparsity(model), RankAdaptorConfig(num_initial=3, max_rounds=2),
                          disable_tqdm=True)
    assert space.is_valid(result.ranks) and math.isfinite(result.score)
    assert result.score <= result.uniform_score
    assert 3 <= len(result.history) <= 5
    # the runs leave the pruned model untouched: no adapter left, same weights, masks still hold
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
    model.check_pruned_weights()
    # a measurement is reproducible (same seed, same data)
    assert run(result.ranks, 8) == pytest.approx(result.score, abs=1e-6)


# ---- the CLI ----

@pytest.mark.parametrize("allocation", ["uniform", "rankadaptor"])
def test_cli_recover_writes_a_sparse_merged_checkpoint_and_the_adapter(tiny_model_dir, tmp_path, allocation):  # noqa: F811
    (tmp_path / "domain.txt").write_text(text(5, 600))
    (tmp_path / "general.txt").write_text(text(6, 400))
    pruned_dir, out = tmp_path / "pruned", tmp_path / "recovered"
    assert cli_main(["prune", "--method", "dpruner",
                     "--model", str(tiny_model_dir), "--general-data", str(tmp_path / "general.txt"),
                     "--domain-data", str(tmp_path / "domain.txt"), "--num-samples", "4", "--seq-len", "16",
                     "--output-dir", str(pruned_dir), "--disable-tqdm", "true"]) == 0
    flags = ["--rank-allocation", allocation, "--lora-r", "8", "--num-samples", "6", "--seq-len", "16",
             "--search-steps", "2", "--search-initial", "3", "--search-rounds", "1", "--search-eval-samples", "2",
             "--eval-data", str(tmp_path / "general.txt"), "--max-steps", "3", "--per-device-train-batch-size", "2",
             "--disable-tqdm", "true", "--output-dir", str(out)]
    with pytest.raises(ValueError, match="outside its folder.*pass --data"):  # the recorded domain file
        cli_main(["recover", str(pruned_dir), *flags])
    assert cli_main(["recover", str(pruned_dir), *flags, "--data", str(tmp_path / "domain.txt")]) == 0
    before = AutoPrunedModelForCausalLM.from_pretrained(pruned_dir)
    after = AutoPrunedModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(before.pruning_masks[n], after.pruning_masks[n]) for n in before.pruning_masks)
    weights_changed = any(not torch.equal(p, dict(before.named_parameters())[n]) for n, p in after.named_parameters())
    assert weights_changed  # the merged LoRA moved the kept weights; the pruned ones stay 0 (checked by loading)
    recovery = json.loads((out / "pruning_config.json").read_text())["recovery"]
    assert recovery["rank_allocation"] == allocation and sum(recovery["layer_ranks"]) == 8 * 2
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    for name, r in adapter["rank_pattern"].items():
        assert r == recovery["layer_ranks"][int(name.split(".")[2])]
    assert (out / "lora_ranks.png").stat().st_size > 5_000
    assert "## Recovery" in (out / "README.md").read_text()
    if allocation == "rankadaptor":
        assert recovery["search"]["runs"] == 4  # 3 initial + 1 online
    else:
        assert set(recovery["layer_ranks"]) == {8} and "search" not in recovery


def test_recover_trains_given_layer_ranks_without_a_search(tmp_path):
    from transformers import TrainingArguments

    from hf_dpruner.recovery import RecoveryArguments, recover

    from testing_utils import word_tokenizer

    tokenizer = word_tokenizer()
    training = TrainingArguments(str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                                 save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match="one rank per layer"):
        recover(pruned(num_hidden_layers=3), tokenizer, [text(5, 400)], [],
                RecoveryArguments(lora_r=4, num_samples=4, seq_len=16, layer_ranks=[4, 4]), training)
    with pytest.raises(ValueError, match="layer_ranks must be one rank >= 1"):
        RecoveryArguments(layer_ranks=[4, 0, 8])
    args = RecoveryArguments(rank_allocation="rankadaptor", lora_r=4, num_samples=4, seq_len=16, layer_ranks=[2, 4, 6])
    result = recover(pruned(num_hidden_layers=3), tokenizer, [text(5, 400)], [], args, training,
                     adapter_dir=tmp_path / "adapter")
    assert result.search is None and "search" not in result.seconds  # the given ranks replace the search
    assert result.ranks == (2, 4, 6)
    recovery = result.model.pruning_record["recovery"]
    assert recovery["rank_allocation"] == "given" and recovery["layer_ranks"] == [2, 4, 6]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {int(name.split(".")[2]): r for name, r in adapter["rank_pattern"].items()} == {0: 2, 1: 4, 2: 6}
    result.model.check_pruned_weights()
