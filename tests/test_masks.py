"""Scores -> masks (unstructured, row, N:M, Conv1D orientation), bit packing, mask files, sparsity report."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_dpruner import DPrunerConfig
from hf_dpruner.importance import MagnitudeImportance
from hf_dpruner.masks import (
    apply_masks,
    compute_mask,
    compute_masks,
    load_masks,
    pack_mask,
    save_masks,
    sparsity_report,
    unpack_mask,
)
from hf_dpruner.targets import find_prunable_weights


def _scores(shape, seed=0) -> torch.Tensor:
    # a random permutation: all scores distinct, so the reference is unambiguous
    generator = torch.Generator().manual_seed(seed)
    numel = int(torch.tensor(shape).prod())
    return torch.randperm(numel, generator=generator).float().reshape(shape) / numel


def _reference_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = scores.reshape(-1).tolist()
    num_pruned = round(sparsity * len(flat))
    pruned = sorted(range(len(flat)), key=lambda i: flat[i])[:num_pruned]
    keep = [True] * len(flat)
    for i in pruned:
        keep[i] = False
    return torch.tensor(keep).reshape(scores.shape)


@pytest.mark.parametrize("shape", [(8, 16), (7, 13), (1, 5), (32, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.9])
def test_unstructured_prunes_the_lowest_scores(shape, sparsity):
    scores = _scores(shape, seed=shape[0] * 100 + int(sparsity * 100))
    keep = compute_mask(scores, sparsity, "unstructured")
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert int((~keep).sum()) == round(sparsity * scores.numel())
    assert torch.equal(keep, _reference_unstructured(scores, sparsity))
    if (~keep).any() and keep.any():
        assert scores[~keep].max() < scores[keep].min()


def test_unstructured_with_ties_prunes_exact_count():
    scores = torch.zeros(4, 8)  # all tied
    keep = compute_mask(scores, 0.5, "unstructured")
    assert int((~keep).sum()) == 16


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_row_mode_prunes_the_same_count_in_every_output_row(sparsity):
    scores = _scores((6, 20), seed=3)
    keep = compute_mask(scores, sparsity, "row")
    expected = round(sparsity * 20)
    assert ((~keep).sum(dim=1) == expected).all()
    for row in range(6):
        assert torch.equal(keep[row], _reference_unstructured(scores[row], sparsity))


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_keeps_the_n_highest_of_every_m_consecutive_inputs(n, m):
    rows, cols = 5, 32
    scores = _scores((rows, cols), seed=n * 10 + m)
    keep = compute_mask(scores, 0.0, f"{n}:{m}")  # sparsity is ignored for N:M
    groups_keep = keep.reshape(rows, cols // m, m)
    groups_scores = scores.reshape(rows, cols // m, m)
    assert (groups_keep.sum(dim=-1) == n).all()
    for r in range(rows):
        for g in range(cols // m):
            top = set(torch.topk(groups_scores[r, g], n).indices.tolist())
            assert set(torch.nonzero(groups_keep[r, g]).flatten().tolist()) == top


@pytest.mark.parametrize("sparsity_type", ["unstructured", "row", "2:4", "4:8"])
def test_conv1d_orientation_gives_the_transpose(sparsity_type):
    scores = _scores((12, 16), seed=7)  # Linear (out=12, in=16)
    linear = compute_mask(scores, 0.4, sparsity_type, input_dim=1)
    conv1d = compute_mask(scores.t().contiguous(), 0.4, sparsity_type, input_dim=0)  # Conv1D stores (in, out)
    assert conv1d.shape == (16, 12)
    assert torch.equal(conv1d, linear.t())


def test_n_m_along_inputs_for_conv1d():
    scores = _scores((8, 3), seed=1)  # Conv1D: 8 inputs, 3 outputs
    keep = compute_mask(scores, 0.0, "2:4", input_dim=0)
    assert (keep.reshape(2, 4, 3).sum(dim=1) == 2).all()  # groups of 4 consecutive inputs, per output column


def test_n_m_needs_inputs_multiple_of_m():
    with pytest.raises(ValueError, match=r"input size \(10\) to be a multiple of 4"):
        compute_mask(_scores((4, 10)), 0.5, "2:4")
    with pytest.raises(ValueError, match="multiple of 8"):
        compute_mask(_scores((12, 4)), 0.5, "4:8", input_dim=0)  # Conv1D: inputs are dim 0 (12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_rejected(bad):
    scores = _scores((4, 8))
    scores[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        compute_mask(scores, 0.5, "unstructured")


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (9, 11), (2, 3, 5), (64, 64)])
def test_pack_unpack_round_trip(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    keep = torch.rand(shape, generator=generator) > 0.5
    packed = pack_mask(keep)
    numel = keep.numel()
    assert packed.dtype == torch.uint8
    assert packed.numel() == (numel + 7) // 8  # 1 bit per weight
    assert torch.equal(unpack_mask(packed, shape), keep)


def test_pack_bit_order_is_big_endian_within_a_byte():
    keep = torch.tensor([True, False, False, False, False, False, False, True, True])
    assert pack_mask(keep).tolist() == [0b10000001, 0b10000000]


def test_unpack_rejects_wrong_size_or_dtype():
    packed = pack_mask(torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit shape"):
        unpack_mask(packed, (3, 7))
    with pytest.raises(ValueError, match="does not fit shape"):
        unpack_mask(packed.to(torch.int32), (4, 4))


def _example_masks() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.rand(5, 7, generator=generator) > 0.3,
        "model.layers.0.mlp.down_proj.weight": torch.rand(3, 11, generator=generator) > 0.6,
        "transformer.h.0.attn.c_attn.weight": torch.rand(13, 9, generator=generator) > 0.5,
    }


def test_save_load_masks_round_trip(tmp_path):
    masks = _example_masks()
    save_masks(masks, tmp_path / "m.safetensors")
    loaded = load_masks(tmp_path / "m.safetensors")
    assert set(loaded) == set(masks)
    for name, keep in masks.items():
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], keep)


def test_mask_file_is_bit_packed(tmp_path):
    masks = {"w": torch.ones(64, 64, dtype=torch.bool)}
    save_masks(masks, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").stat().st_size < 64 * 64 // 8 + 1024


def test_truncated_mask_file_is_a_value_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_masks(_example_masks(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_masks(path)


def test_garbage_mask_file_is_a_value_error(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_masks(path)


def test_file_without_shapes_metadata_is_a_value_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": pack_mask(torch.ones(8, dtype=torch.bool))}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an hf_dpruner mask file"):
        load_masks(path)


def test_file_with_mismatching_shapes_metadata_is_a_value_error(tmp_path):
    path = tmp_path / "m.safetensors"
    packed = {"a": pack_mask(torch.ones(8, dtype=torch.bool))}
    save_file(packed, str(path), metadata={"shapes": json.dumps({"a": [8], "b": [4]})})
    with pytest.raises(ValueError, match="lack a recorded shape"):
        load_masks(path)


def test_missing_mask_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path / "none.safetensors")


def test_sparsity_report_on_a_hand_made_mask():
    masks = {
        "model.layers.0.self_attn.q_proj.weight": torch.tensor([[True, False], [False, False]]),  # 3/4 pruned
        "model.layers.1.self_attn.q_proj.weight": torch.tensor([[True, True], [True, False]]),  # 1/4 pruned
        "model.layers.0.mlp.down_proj.weight": torch.tensor([[True, True, True, True]]),  # 0/4 pruned
        "model.layers.1.mlp.down_proj.weight": torch.tensor([[False, False, False, True, True, True]]),  # 3/6
    }
    report = sparsity_report(masks)
    assert report["num_pruned"] == 7
    assert report["num_targeted"] == 18
    assert report["overall"] == pytest.approx(7 / 18)
    assert report["per_module_type"] == {"down_proj": pytest.approx(3 / 10), "q_proj": pytest.approx(4 / 8)}
    assert report["per_matrix"] == {
        "model.layers.0.self_attn.q_proj.weight": pytest.approx(0.75),
        "model.layers.1.self_attn.q_proj.weight": pytest.approx(0.25),
        "model.layers.0.mlp.down_proj.weight": pytest.approx(0.0),
        "model.layers.1.mlp.down_proj.weight": pytest.approx(0.5),
    }


def test_sparsity_report_of_no_masks():
    assert sparsity_report({})["overall"] == 0.0


def test_compute_masks_honours_layer_sparsity_and_conv1d(model_factory):
    model = model_factory("gpt2")
    weights = find_prunable_weights(model)
    config = DPrunerConfig(sparsity=0.5, layer_sparsity={r"mlp\.c_fc": 0.25})
    masks = compute_masks(MagnitudeImportance().score(model, weights, []), weights, config)
    for name, keep in masks.items():
        assert keep.shape == weights[name].weight.shape
        expected = 0.25 if "mlp.c_fc" in name else 0.5
        assert int((~keep).sum()) == round(expected * keep.numel())
    apply_masks(model, masks)
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert (params[name][~keep] == 0).all()
        assert (params[name][keep] != 0).all()


def test_compute_masks_row_on_conv1d_counts_per_output(model_factory):
    model = model_factory("gpt2")
    weights = find_prunable_weights(model)
    masks = compute_masks(MagnitudeImportance().score(model, weights, []), weights, DPrunerConfig(0.5, "row"))
    keep = masks["transformer.h.0.mlp.c_fc.weight"]  # Conv1D (in=64, out=128)
    assert keep.shape == (64, 128)
    assert ((~keep).sum(dim=0) == 32).all()  # per output (column), half of the 64 inputs


def test_apply_masks_rejects_unknown_parameter(model_factory):
    model = model_factory("llama")
    with pytest.raises(ValueError, match="names no parameter"):
        apply_masks(model, {"model.layers.9.mlp.up_proj.weight": torch.ones(128, 64, dtype=torch.bool)})


@pytest.mark.parametrize("seed", range(6))
def test_unstructured_selection_with_ties_prunes_lowest_index_first(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (12, 10), generator=generator).float()  # many ties
    num_pruned = round(0.55 * scores.numel())
    keep = compute_mask(scores, 0.55, "unstructured")
    order = sorted(range(scores.numel()), key=lambda i: (scores.flatten()[i].item(), i))
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[order[:num_pruned]] = False
    assert torch.equal(keep.flatten(), expected)
