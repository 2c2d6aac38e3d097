"""OWL layer-wise sparsity: the outlier ratio, the ratios it gives, and ``layer_sparsity="owl"`` through
`prune_model` for any method."""

from __future__ import annotations

import json

import pytest
import torch

from hf_dpruner import DPrunerConfig
from hf_dpruner.importance.owl import outlier_ratio, owl_sparsities
from hf_dpruner.methods import prune_model

from testing_utils import build_tiny, text, training_args, word_tokenizer


def test_outlier_ratio_counts_scores_above_m_times_their_matrix_mean():
    flat = torch.ones(10, 10)
    spiky = torch.ones(10, 10)
    spiky[0, :3] = 100.0  # mean 3.97: three entries above 5 x mean
    assert outlier_ratio([flat], 5.0) == 0.0
    assert outlier_ratio([spiky], 5.0) == pytest.approx(3 / 100)
    assert outlier_ratio([flat, spiky], 5.0) == pytest.approx(3 / 200)
    with pytest.raises(ValueError, match="at least one"):
        outlier_ratio([], 5.0)


def test_owl_sparsities_keep_the_mean_and_prune_outlier_rich_blocks_less():
    s = owl_sparsities([0.01, 0.02, 0.05, 0.03], 0.7, 0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[2] == min(s) and s[0] == max(s)  # most outliers -> lowest sparsity
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    with pytest.raises(ValueError, match="lambda"):
        owl_sparsities([0.1], 0.5, 1.5)


def test_owl_config_is_checked():
    with pytest.raises(ValueError, match="N:M sparsity has a fixed ratio"):
        DPrunerConfig(layer_sparsity="owl", sparsity_type="2:4")
    with pytest.raises(ValueError, match="resolved into per-block ratios by prune_model"):
        DPrunerConfig(layer_sparsity="owl").sparsity_for("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="owl_lambda"):
        DPrunerConfig(owl_lambda=1.0)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "cross-calibration"])
def test_prune_model_resolves_owl_into_block_ratios_with_the_mean_target(tmp_path, method):
    model = build_tiny("llama", num_hidden_layers=4)
    with torch.no_grad():  # make block 2 outlier-rich: a few huge weights
        model.model.layers[2].mlp.down_proj.weight[:, :4] *= 40.0
    config = DPrunerConfig(sparsity=0.6, layer_sparsity="owl", owl_lambda=0.1, num_samples=4, seq_len=16,
                           general_weight=0.5 if method == "cross-calibration" else None)
    args = training_args(tmp_path, disable_tqdm=True)
    pruned, result = prune_model(model, word_tokenizer(), method, config, args, [text(1, 800)], [text(2, 800)])
    ratios = pruned.pruning_config.layer_sparsity
    assert isinstance(ratios, dict) and len(ratios) == 4
    assert sum(ratios.values()) / 4 == pytest.approx(0.6)
    assert ratios[r"^model\.layers\.2\."] == min(ratios.values())
    assert max(ratios.values()) - min(ratios.values()) == pytest.approx(0.2)
    block_sparsity = {}
    for name, keep in pruned.pruning_masks.items():
        index = int(name.split(".")[2])
        block_sparsity.setdefault(index, []).append((int((~keep).sum()), keep.numel()))
    for index, counts in block_sparsity.items():
        achieved = sum(c for c, _ in counts) / sum(n for _, n in counts)
        assert achieved == pytest.approx(ratios[rf"^model\.layers\.{index}\."], abs=0.01)
    saved = tmp_path / "saved"
    pruned.save_pretrained(saved)
    assert json.loads((saved / "pruning_config.json").read_text())["layer_sparsity"] == ratios
