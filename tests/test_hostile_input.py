"""Hostile input: the mask-file checksum, malformed pruning configs, mask files and importance scores, unsafe
loaders in the sources, and fuzzers of the config and mask readers. Every error must name the bad file or tensor."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_dpruner
from hf_dpruner import (
    AutoPrunedModelForCausalLM,
    DPrunerConfig,
    DPrunerTrainer,
    make_pruned,
)
from hf_dpruner.config import PRUNING_CONFIG_NAME, RECORD_KEYS
from hf_dpruner.hub import push_folder_to_hub
from hf_dpruner.importance import MagnitudeImportance, load_importance, save_importance
from hf_dpruner.masks import (
    MASKS_NAME,
    compute_mask,
    compute_masks,
    load_masks,
    pack_mask,
    save_masks,
)
from hf_dpruner.modeling import attach_checkpoint_masks
from hf_dpruner.regularizer import GeneralImportanceRegularizer
from hf_dpruner.targets import find_prunable_weights

from testing_utils import build_tiny

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
UP_PROJ = "model.layers.0.mlp.up_proj.weight"


def pruned_llama(sparsity: float = 0.5, seed: int = 0):
    model = build_tiny("llama", seed)
    config = DPrunerConfig(sparsity=sparsity)
    weights = find_prunable_weights(model)
    masks = compute_masks(MagnitudeImportance().score(model, weights), weights, config)
    return make_pruned(model, masks, config, record={"method": "magnitude", "base_model": "tiny"}, apply=True)


def read_record(folder: Path) -> dict:
    return json.loads((folder / PRUNING_CONFIG_NAME).read_text())


def write_record(folder: Path, record: dict) -> None:
    (folder / PRUNING_CONFIG_NAME).write_text(json.dumps(record))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_masks(folder: Path, masks: dict[str, torch.Tensor], update_checksum: bool = True) -> None:
    """Replace the checkpoint's mask file by `masks`; optionally record the new file's sha256 (a consistent but
    wrong checkpoint, so the checks after the checksum are reached)."""
    save_masks(masks, folder / MASKS_NAME)
    record = read_record(folder)
    if update_checksum:
        record["masks_sha256"] = sha256_of(folder / MASKS_NAME)
    else:
        record.pop("masks_sha256")
    write_record(folder, record)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A pruned tiny Llama saved once; tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("hostile") / "ckpt"
    pruned_llama().save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    return folder


# ---------------------------------------------------------------- the mask-file checksum


def test_save_records_the_sha256_of_the_final_mask_file(tmp_path):
    out = tmp_path / "out"
    pruned_llama(0.5).save_pretrained(out)
    first = read_record(out)["masks_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert first == sha256_of(out / MASKS_NAME)
    # saving other masks into the same folder (temp dir, then swap) records the new file's hash
    pruned_llama(0.25).save_pretrained(out)
    second = read_record(out)["masks_sha256"]
    assert second == sha256_of(out / MASKS_NAME) != first
    assert os.listdir(tmp_path) == ["out"]  # no temp or backup folder left behind
    assert "masks_sha256" in RECORD_KEYS


def test_equal_masks_give_equal_bytes_and_checksum(ckpt, tmp_path):
    loaded = AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert "masks_sha256" not in loaded.pruning_record  # recomputed by every save, never carried over
    for again in ("a", "b"):  # several saves: safetensors must not be given metadata keys to order at random
        loaded.save_pretrained(tmp_path / again)
        assert (tmp_path / again / MASKS_NAME).read_bytes() == (ckpt / MASKS_NAME).read_bytes()
        assert read_record(tmp_path / again)["masks_sha256"] == read_record(ckpt)["masks_sha256"]
    reordered = dict(reversed(list(load_masks(ckpt / MASKS_NAME).items())))
    save_masks(reordered, tmp_path / "reordered.safetensors")
    assert sha256_of(tmp_path / "reordered.safetensors") == read_record(ckpt)["masks_sha256"]


def test_mask_file_changed_after_saving_is_rejected(ckpt):
    masks = load_masks(ckpt / MASKS_NAME)
    keep = masks[UP_PROJ]
    row, col = (~keep).nonzero()[0].tolist()
    keep[row, col] = True  # keeping a pruned (zero) weight would pass every other check
    recorded = read_record(ckpt)["masks_sha256"]
    save_masks(masks, ckpt / MASKS_NAME)  # a valid mask file, but not the one that was saved
    with pytest.raises(ValueError) as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    message = str(info.value)
    assert message.startswith(f"The mask file {ckpt / MASKS_NAME} has sha256 {sha256_of(ckpt / MASKS_NAME)}, ")
    assert f"but {ckpt / PRUNING_CONFIG_NAME} records {recorded}" in message
    assert "Re-save the checkpoint, or re-download it" in message


def test_checkpoint_saved_without_a_checksum_still_loads(ckpt, checkpoint):
    record = read_record(ckpt)
    del record["masks_sha256"]
    write_record(ckpt, record)
    loaded = AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    expected = load_masks(checkpoint / MASKS_NAME)
    assert set(loaded.pruning_masks) == set(expected)
    assert all(torch.equal(loaded.pruning_masks[n], expected[n]) for n in expected)


@pytest.mark.parametrize("with_checksum", [True, False], ids=["checksum", "no-checksum"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_mask_file_is_a_value_error_naming_it(ckpt, with_checksum, damage):
    path = ckpt / MASKS_NAME
    data = path.read_bytes()
    garbage = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": garbage, "empty": b""}[damage])
    if not with_checksum:
        record = read_record(ckpt)
        del record["masks_sha256"]
        write_record(ckpt, record)
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert str(path) in str(info.value) and "re-download" in str(info.value)


def test_push_refuses_a_mask_file_that_fails_its_checksum(ckpt):
    path = ckpt / MASKS_NAME
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=re.escape(f"The mask file {path} has sha256")):
        push_folder_to_hub(ckpt, "someone/model", token="not-used")  # fails before any network call


# ---------------------------------------------------------------- a malformed pruning_config.json


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"sparsity": 0.5,', "is not valid JSON"),
        ("\xff\xfe garbage", "is not valid JSON"),
        ("[0.5]", "must hold a JSON object, got list"),
        ("null", "must hold a JSON object, got NoneType"),
    ],
)
def test_unparsable_pruning_config_is_a_value_error_naming_it(ckpt, text, message):
    (ckpt / PRUNING_CONFIG_NAME).write_text(text, encoding="latin-1")
    with pytest.raises(ValueError, match=message) as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert str(ckpt / PRUNING_CONFIG_NAME) in str(info.value)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"sparsity": "0.5"}, ValueError, r"sparsity must be a number in \[0, 1\), got '0.5'"),
        ({"sparsity": True}, ValueError, r"sparsity must be a number in \[0, 1\), got True"),
        ({"sparsity": float("nan")}, ValueError, r"sparsity must be a number in \[0, 1\), got nan"),
        ({"sparsity_type": 4}, TypeError, r"sparsity_type must be a string .*got 4"),
        ({"target_modules": 5}, TypeError, r"target_modules must be a list of module names, got 5"),
        ({"target_modules": ["q_proj", 1]}, TypeError, r"target_modules must be a list .*\['q_proj', 1\]"),
        ({"num_samples": True}, ValueError, r"num_samples must be a positive integer, got True"),
        ({"seq_len": 2.5}, ValueError, r"seq_len must be a positive integer, got 2.5"),
        ({"damping": "x"}, ValueError, r"damping must be > 0, got 'x'"),
        ({"damping": float("inf")}, ValueError, r"damping must be > 0, got inf; give a finite number"),
        ({"regularization_lambda": None}, ValueError, r"regularization_lambda must be >= 0, got None"),
        ({"clamp_general_importance": "yes"}, TypeError, r"clamp_general_importance must be true or false"),
        ({"layer_sparsity": {"down_proj": True}}, ValueError, r"layer_sparsity\['down_proj'\] must be in \[0, 1\)"),
        ({"layer_sparsity": [0.3]}, TypeError, r"layer_sparsity must be a dict"),
        ({"domain_pass": ["score"]}, ValueError, r"domain_pass must be one of .*got \['score'\]"),
        ({"achieved_sparsity": [0.5]}, TypeError, r"Record key 'achieved_sparsity' must be a JSON dict"),
        ({"method": 3}, TypeError, r"Record key 'method' must be a JSON str, got 3"),
        ({"masks_sha256": "abc"}, ValueError, r"masks_sha256 must be 64 lowercase hex digits, got 'abc'"),
        ({"masks_sha256": None}, TypeError, r"Record key 'masks_sha256' must be a JSON str, got None"),
        ({"colour": "blue"}, ValueError, r"Unknown DPrunerConfig keys \['colour'\]"),
    ],
)
def test_wrong_field_in_pruning_config_names_the_file_and_field(ckpt, change, error, message):
    write_record(ckpt, {**read_record(ckpt), **change})
    config_file = str(ckpt / PRUNING_CONFIG_NAME)
    with pytest.raises(error, match=message) as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert str(info.value).startswith(f"{config_file} is not a valid {PRUNING_CONFIG_NAME}: ")
    assert str(info.value).endswith("re-download the checkpoint.")
    with pytest.raises(error, match=message) as info:
        DPrunerConfig.from_pretrained(ckpt)
    assert config_file in str(info.value)


def test_record_without_recipe_is_type_checked_too(ckpt):
    record = {k: v for k, v in read_record(ckpt).items() if k in RECORD_KEYS}
    write_record(ckpt, record)
    assert AutoPrunedModelForCausalLM.from_pretrained(ckpt).pruning_config is None  # a record alone is valid
    write_record(ckpt, {**record, "calibration": "c4"})
    with pytest.raises(TypeError, match=r"pruning_config.json is not a valid .*'calibration' must be a JSON dict"):
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)


def test_from_dict_of_a_non_dict_is_a_type_error():
    with pytest.raises(TypeError, match="read from a dict, got list"):
        DPrunerConfig.from_dict([("sparsity", 0.5)])


# ---------------------------------------------------------------- mask files that do not fit the model


def test_mask_file_with_an_extra_key_names_the_file_and_key(ckpt):
    masks = load_masks(ckpt / MASKS_NAME)
    masks["model.layers.9.mlp.up_proj.weight"] = torch.ones(128, 64, dtype=torch.bool)
    rewrite_masks(ckpt, masks)
    with pytest.raises(ValueError, match=r"does not have, e\.g\. 'model\.layers\.9\.mlp\.up_proj\.weight'") as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert str(info.value).startswith(f"{ckpt / MASKS_NAME} does not fit the model loaded from {ckpt}")


def test_mask_for_an_existing_but_unrecorded_parameter_is_rejected(ckpt):
    masks = load_masks(ckpt / MASKS_NAME)
    masks["model.norm.weight"] = torch.ones(64, dtype=torch.bool)
    rewrite_masks(ckpt, masks)
    message = re.escape("masks for 1 matrices that the pruning record does not list, e.g. ['model.norm.weight']")
    with pytest.raises(ValueError, match=message) as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert f"{ckpt / MASKS_NAME} does not match {ckpt / PRUNING_CONFIG_NAME}" in str(info.value)


def test_mask_file_with_a_missing_key_is_rejected(ckpt):
    masks = load_masks(ckpt / MASKS_NAME)
    del masks[UP_PROJ]
    rewrite_masks(ckpt, masks)
    message = re.escape(f"no mask for 1 matrices that the pruning record lists, e.g. ['{UP_PROJ}']")
    with pytest.raises(ValueError, match=message) as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert "re-save or re-download the checkpoint" in str(info.value)


def test_mask_file_with_a_wrong_shaped_entry_is_rejected(ckpt):
    masks = load_masks(ckpt / MASKS_NAME)
    masks[UP_PROJ] = masks[UP_PROJ].t().contiguous()
    rewrite_masks(ckpt, masks)
    with pytest.raises(ValueError, match=rf"{re.escape(UP_PROJ)} has shape \(64, 128\) but the weight has \(128, 64\)"):
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)


def test_mask_that_keeps_a_zero_weight_disagrees_with_the_recorded_count(ckpt):
    masks = load_masks(ckpt / MASKS_NAME)
    row, col = (~masks[UP_PROJ]).nonzero()[0].tolist()
    masks[UP_PROJ][row, col] = True
    rewrite_masks(ckpt, masks)
    pruned = read_record(ckpt)["achieved_sparsity"]["num_pruned"]
    with pytest.raises(ValueError, match=f"num_pruned = {pruned - 1}, the pruning record says {pruned}"):
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)


def test_mask_that_prunes_a_non_zero_weight_is_rejected(ckpt):
    masks = load_masks(ckpt / MASKS_NAME)
    keep = masks[UP_PROJ]
    kept, pruned = keep.nonzero()[0].tolist(), (~keep).nonzero()[0].tolist()
    keep[kept[0], kept[1]], keep[pruned[0], pruned[1]] = False, True  # same pruned count, other positions
    rewrite_masks(ckpt, masks)
    with pytest.raises(ValueError, match=f"1 weights of {re.escape(UP_PROJ)} that the pruning mask removes") as info:
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    assert str(info.value).startswith(f"The weights in {ckpt} and {ckpt / MASKS_NAME} disagree")


@pytest.mark.parametrize(
    "shapes, message",
    [
        ("{not json", "the 'shapes' metadata is not valid JSON"),
        ("[[8]]", "the 'shapes' metadata must map parameter names to shapes"),
        ('{"w": 8}', "the recorded shape of w must be a list of sizes >= 0, got 8"),
        ('{"w": [-8]}', r"the recorded shape of w must be a list of sizes >= 0, got \[-8\]"),
        ('{"w": [true, 8]}', r"the recorded shape of w must be a list of sizes >= 0"),
        ('{"w": [2.5]}', r"the recorded shape of w must be a list of sizes >= 0"),
        ('{"w": [3, 7]}', r"the mask of w is malformed \(Packed mask of 1 torch.uint8 bytes does not fit shape"),
    ],
)
def test_hostile_shapes_metadata_names_the_file(tmp_path, shapes, message):
    path = tmp_path / MASKS_NAME
    save_file({"w": pack_mask(torch.ones(8, dtype=torch.bool))}, str(path), metadata={"shapes": shapes})
    with pytest.raises(ValueError, match=message) as info:
        load_masks(path)
    assert str(info.value).startswith(str(path))


def test_packed_entry_of_the_wrong_dtype_is_rejected(tmp_path):
    path = tmp_path / MASKS_NAME
    save_file({"w": torch.ones(1, dtype=torch.int32)}, str(path), metadata={"shapes": '{"w": [8]}'})
    with pytest.raises(ValueError, match=r"the mask of w is malformed .*torch.int32"):
        load_masks(path)


# ---------------------------------------------------------------- NaN / Inf importance


@pytest.mark.parametrize("bad, counts", [(float("nan"), "1 NaN, 0 Inf"), (float("inf"), "0 NaN, 1 Inf")])
def test_cached_importance_with_nan_or_inf_is_refused(tmp_path, bad, counts):
    model = build_tiny("llama")
    weights = find_prunable_weights(model)
    scores = {name: torch.rand(w.weight.shape) for name, w in weights.items()}
    scores[UP_PROJ][3, 4] = bad
    path = tmp_path / "general.safetensors"
    save_file(scores, str(path))  # written behind save_importance's back, e.g. by an older version
    with pytest.raises(ValueError) as info:
        load_importance(path, weights)
    message = str(info.value)
    assert message.startswith(f"Importance file {path}: the importance scores of {UP_PROJ} hold NaN or Inf")
    assert counts in message and "delete the file to recompute it" in message


def test_trainer_with_a_nan_importance_cache_fails_at_construction(tmp_path):
    model = build_tiny("llama")
    scores = {name: torch.rand(w.weight.shape) for name, w in find_prunable_weights(model).items()}
    scores[UP_PROJ][0, 0] = float("nan")
    cache = tmp_path / "general.safetensors"
    save_file(scores, str(cache))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(str(tmp_path / "run"), report_to=[], disable_tqdm=True, use_cpu=True)
    with pytest.raises(ValueError, match=rf"Importance file {re.escape(str(cache))}: .*{re.escape(UP_PROJ)} hold NaN"):
        DPrunerTrainer(model=model, args=args, dpruner_config=DPrunerConfig(), general_importance=cache,
                       train_dataset=Dataset.from_dict({"input_ids": ids}))


def test_integer_importance_file_is_refused(tmp_path):
    path = tmp_path / "scores.safetensors"
    save_file({"w": torch.ones(4, 4, dtype=torch.int64)}, str(path))
    with pytest.raises(ValueError, match=rf"Importance file {re.escape(str(path))}: w holds torch.int64, not floats"):
        load_importance(path)


def test_saving_non_finite_importance_writes_nothing(tmp_path):
    path = tmp_path / "scores.safetensors"
    with pytest.raises(ValueError, match=r"Not caching importance to .*scores of b hold NaN or Inf \(0 NaN, 1 Inf\)"):
        save_importance({"a": torch.ones(2, 2), "b": torch.tensor([1.0, float("-inf")])}, path)
    assert list(tmp_path.iterdir()) == []


def test_float16_overflow_in_scores_is_refused_with_the_tensor_name():
    model = build_tiny("llama")
    weights = find_prunable_weights(model)
    scores = {name: torch.rand(w.weight.shape) for name, w in weights.items()}
    scores[UP_PROJ] = torch.full(weights[UP_PROJ].weight.shape, 300.0, dtype=torch.float16) ** 2  # > 65504: Inf
    assert torch.isinf(scores[UP_PROJ]).all()
    with pytest.raises(ValueError, match=rf"Mask computation: the importance scores of {re.escape(UP_PROJ)}") as info:
        compute_masks(scores, weights, DPrunerConfig())
    assert "(0 NaN, 8192 Inf)" in str(info.value) and "float16 overflows" in str(info.value)


def test_compute_mask_names_its_weight():
    with pytest.raises(ValueError, match="scores of my.weight hold NaN or Inf"):
        compute_mask(torch.tensor([[1.0, float("nan")]]), 0.5, "unstructured", name="my.weight")


def test_regularizer_refuses_non_finite_general_importance():
    model = build_tiny("llama")
    weights = find_prunable_weights(model)
    importance = {name: torch.ones(w.weight.shape) for name, w in weights.items()}
    importance[UP_PROJ][1, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"General importance: the importance scores of {re.escape(UP_PROJ)}"):
        GeneralImportanceRegularizer(weights, importance, lam=0.1)


# ---------------------------------------------------------------- unsafe loaders in the sources


PICKLE_MODULES = ("pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
WRITERS = {"open", "write_bytes", "write_text", "save", "save_file", "dump", "dumps", "copy", "copy2", "copyfile"}


def _pickle_file_name(node: ast.AST) -> str | None:
    """A string (or the constant tail of an f-string) that names a pickle file, e.g. ``"training_args.bin"``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Div)):
        node = node.right
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[-1]
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.startswith("*"):
        return node.value if node.value.endswith(PICKLE_SUFFIXES) else None
    return None


def unsafe_calls(source: str) -> list[str]:
    """Pickle-based loaders and writers, writes of pickle-named files (``.bin``, ``.pt``...), and
    ``trust_remote_code`` forced on, in Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                found += [f"from torch import {a.name}" for a in node.names if a.name in ("load", "save")]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _pickle_file_name(node):
            found.append(f"path / {_pickle_file_name(node)!r}")
        if not isinstance(node, ast.Call):
            continue
        keywords = {kw.arg: kw.value for kw in node.keywords}
        callee = ast.unparse(node.func)
        if callee == "torch.load" and not _is_constant(keywords.get("weights_only"), True):
            found.append(f"{callee} without weights_only=True")
        if callee == "torch.save":
            found.append("torch.save")
        if callee in ("np.load", "numpy.load") and _is_constant(keywords.get("allow_pickle"), True):
            found.append(f"{callee} with allow_pickle=True")
        if callee in ("np.save", "numpy.save") and not _is_constant(keywords.get("allow_pickle"), False):
            found.append(f"{callee} without allow_pickle=False")
        if _is_constant(keywords.get("trust_remote_code"), True):
            found.append(f"{callee}(trust_remote_code=True)")
        if callee.rsplit(".", 1)[-1] in WRITERS:
            names = [_pickle_file_name(arg) for arg in [*node.args, *keywords.values()]]
            found += [f"{callee}({name!r})" for name in names if name]
    return sorted(set(found))


def _is_constant(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_the_scanner_finds_unsafe_calls():
    source = (
        "import pickle\nfrom torch import load\ntorch.load(f)\nnp.load(f, allow_pickle=True)\n"
        "A.from_pretrained(p, trust_remote_code=True)\ntorch.save(args, path)\nfrom torch import save\n"
        "open(folder + '/training_args.bin', 'wb')\n(folder / 'optimizer.pt').write_bytes(b)\n"
        "save_file(t, f'{name}.pth')\nnp.save(f, a)\n"
    )
    assert unsafe_calls(source) == sorted([
        "import pickle", "from torch import load", "torch.load without weights_only=True",
        "np.load with allow_pickle=True", "A.from_pretrained(trust_remote_code=True)", "torch.save",
        "from torch import save", "open('/training_args.bin')", "path / 'optimizer.pt'", "save_file('.pth')",
        "np.save without allow_pickle=False",
    ])
    assert unsafe_calls(
        "torch.load(f, weights_only=True)\nA.from_pretrained(p, trust_remote_code=args.trust)\n"
        "IGNORE = ['*.bin', '*.pt']\nsave_file(t, 'model.safetensors')\nnp.save(f, a, allow_pickle=False)\n"
    ) == []


def test_package_sources_use_no_pickle_and_never_force_remote_code():
    root = Path(hf_dpruner.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 20
    repo = root.parent  # the benchmarks and examples write files too
    sources += sorted(p for folder in ("benchmarks", "examples") for p in (repo / folder).rglob("*.py"))
    found = {str(p.relative_to(repo)): unsafe_calls(p.read_text()) for p in sources}
    assert {path: calls for path, calls in found.items() if calls} == {}


# ---------------------------------------------------------------- fuzzers

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
TYPE_CONFUSIONS = st.sampled_from([True, False, None, "0.5", [0.5]])
PLAUSIBLE = {
    "sparsity": st.floats(-0.5, 1.5) | st.sampled_from([0, 0.5, 1]) | TYPE_CONFUSIONS,
    "sparsity_type": st.sampled_from(["unstructured", "row", "2:4", "4:8", "4:2", "0:4", "x:y", "1:1"]),
    "layer_sparsity": st.dictionaries(st.sampled_from(["down_proj", "(", "q_proj$", ""]), st.floats(-1, 2), max_size=2)
    | st.sampled_from(['{"down_proj": 0.3}', "{bad", "[1]"]),
    "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", ""]), max_size=3),
    "num_samples": st.integers(-2, 64) | TYPE_CONFUSIONS,
    "seq_len": st.integers(-2, 64) | TYPE_CONFUSIONS,
    "damping": st.floats(-1, 1) | TYPE_CONFUSIONS,
    "regularization_lambda": st.floats(-1, 1) | TYPE_CONFUSIONS,
    "general_estimator": st.sampled_from(["obs", "fisher", "wanda"]),
    "domain_pass": st.sampled_from(["finetune", "score", "train"]),
    "apply_masks_to": st.sampled_from(["original", "tuned", "both"]),
    "masks_sha256": st.sampled_from(["a" * 64, "A" * 64, "abc"]),
    "achieved_sparsity": st.dictionaries(st.text(max_size=4), JSON_SCALARS, max_size=2),
}
FIELD_NAMES = [*DPrunerConfig().to_dict(), *RECORD_KEYS]


def _values_for(data: dict) -> st.SearchStrategy:
    """Each drawn key keeps its random JSON value or gets a plausible (valid or nearly valid) one."""
    return st.fixed_dictionaries({k: PLAUSIBLE.get(k, JSON_VALUES) | st.just(v) for k, v in data.items()})


CONFIG_DICTS = st.builds(
    lambda fields, other: {**fields, **other},
    st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=5).flatmap(_values_for),
    st.just({}) | st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=1),  # sometimes an unknown key
)


@FUZZ
@given(CONFIG_DICTS)
@example({"damping": True})
@example({"sparsity": False, "num_samples": True})
@example({"regularization_lambda": float("nan")})
@example({"layer_sparsity": {"": float("nan")}})
@example({"target_modules": ("q_proj",), "achieved_sparsity": None})
def test_fuzz_from_dict_gives_a_valid_config_or_a_value_or_type_error(data):
    try:
        config = DPrunerConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        assert str(err)
        return
    assert isinstance(config.sparsity, float) and 0 <= config.sparsity < 1
    assert config.sparsity_type in ("unstructured", "row") or config.n_m is not None
    assert 0 < config.damping < math.inf and 0 <= config.regularization_lambda < math.inf
    numbers = (config.damping, config.regularization_lambda, config.num_samples, config.seq_len)
    assert all(type(value) in (int, float) for value in numbers)  # never a bool or a string
    assert isinstance(config.clamp_general_importance, bool)
    assert config.target_modules is None or all(isinstance(m, str) and m for m in config.target_modules)
    assert all(0 <= config.sparsity_for(p) < 1 for p in ("model.layers.0.mlp.down_proj.weight", "q_proj.weight"))
    assert DPrunerConfig.from_dict(json.loads(json.dumps(config.to_dict(), allow_nan=False))) == config


@FUZZ
@given(st.binary(max_size=300) | st.sampled_from([b"", b"\x02" + b"\x00" * 7 + b"{}", b"\xff" * 8 + b"{}"]))
def test_fuzz_random_bytes_are_never_read_as_masks(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MASKS_NAME
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_masks(path)


SHAPES = st.lists(st.integers(0, 9), max_size=3)
ENTRIES = st.dictionaries(
    st.sampled_from(["a.weight", "b.weight", "c"]),
    st.tuples(st.sampled_from([torch.uint8, torch.uint8, torch.int32, torch.float32, torch.bool]), st.integers(0, 12)),
    max_size=3,
)
SHAPES_METADATA = st.one_of(
    st.none(),  # consistent with the tensors' byte counts where possible
    st.dictionaries(st.sampled_from(["a.weight", "b.weight", "c"]), SHAPES | JSON_VALUES, max_size=3).map(json.dumps),
    st.text(max_size=10),
)


def expected_masks(tensors: dict[str, torch.Tensor], shapes: object) -> dict[str, torch.Tensor] | None:
    """What a correct reader returns for this file, or None where it must refuse it."""
    if not isinstance(shapes, dict) or set(shapes) != set(tensors):
        return None
    result = {}
    for name, packed in tensors.items():
        shape = shapes[name]
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            return None
        numel = math.prod(shape)
        if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
            return None
        bits = np.unpackbits(packed.numpy())[:numel]
        result[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    return result


@FUZZ
@given(ENTRIES, SHAPES_METADATA, st.randoms(use_true_random=False))
def test_fuzz_random_tensor_dicts_load_exactly_or_fail_clearly(entries, metadata, rng):
    tensors = {
        name: torch.tensor([rng.randrange(256) for _ in range(size)], dtype=torch.int64).to(dtype)
        for name, (dtype, size) in entries.items()
    }
    if metadata is None:  # shapes that fit each byte count exactly (bit counts 8*n-7 .. 8*n, or 0 for no bytes)
        metadata = json.dumps({n: [max(0, 8 * t.numel() - rng.randrange(8))] for n, t in tensors.items()})
    try:
        shapes = json.loads(metadata)
    except json.JSONDecodeError:
        shapes = None
    expected = expected_masks(tensors, shapes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MASKS_NAME
        save_file(tensors, str(path), metadata={"shapes": metadata})
        if expected is None:
            with pytest.raises(ValueError, match=re.escape(str(path))):
                load_masks(path)
            return
        loaded = load_masks(path)
    assert set(loaded) == set(expected)
    for name, keep in expected.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], keep)


@pytest.fixture(scope="module")
def fuzz_checkpoint(checkpoint):
    """The saved checkpoint's mask bytes, record and masks, and its weights in a plain model."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    return (checkpoint / MASKS_NAME).read_bytes(), read_record(checkpoint), load_masks(checkpoint / MASKS_NAME), model



@FUZZ
@given(st.data())
def test_fuzz_damaged_mask_bytes_fail_the_checksum(fuzz_checkpoint, data):
    original, record, masks, model = fuzz_checkpoint
    damage = data.draw(st.sampled_from(["truncate", "flip", "append", "none"]))
    damaged = bytearray(original)
    if damage == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(original) - 1))]
    elif damage == "flip":
        damaged[data.draw(st.integers(0, len(original) - 1))] ^= data.draw(st.integers(1, 255))
    elif damage == "append":
        damaged += data.draw(st.binary(min_size=1, max_size=16))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / MASKS_NAME).write_bytes(bytes(damaged))
        if damage == "none":
            loaded = attach_checkpoint_masks(model, tmp, record, None).pruning_masks
            assert all(torch.equal(loaded[n], masks[n]) for n in masks) and set(loaded) == set(masks)
            return
        with pytest.raises(ValueError, match=re.escape(f"The mask file {Path(tmp) / MASKS_NAME} has sha256")):
            attach_checkpoint_masks(model, tmp, record, None)


@FUZZ
@given(st.data())
def test_fuzz_wrong_masks_without_a_checksum_fail_clearly(fuzz_checkpoint, data):
    _, record, masks, model = fuzz_checkpoint
    record = {k: v for k, v in record.items() if k != "masks_sha256"}  # an older checkpoint: no checksum
    names = sorted(masks)
    changed = dict(masks)
    for _ in range(data.draw(st.integers(1, 3))):
        change = data.draw(st.sampled_from(["drop", "add", "reshape", "flip"]))
        name = data.draw(st.sampled_from(names))
        if change == "drop":
            changed.pop(name, None)
        elif change == "add":
            extra = data.draw(st.sampled_from(["model.norm.weight", "model.layers.7.mlp.up_proj.weight", "lm_head"]))
            changed[extra] = torch.ones(64, dtype=torch.bool)
        elif change == "reshape" and name in changed:
            changed[name] = changed[name].reshape(-1)
        elif change == "flip" and name in changed:
            keep = changed[name].clone()
            keep.view(-1)[data.draw(st.integers(0, keep.numel() - 1))] ^= True
            changed[name] = keep
    if set(changed) == set(masks) and all(torch.equal(changed[n], masks[n]) for n in masks):
        return  # the changes cancelled out
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MASKS_NAME
        save_masks(changed, path)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            attach_checkpoint_masks(model, tmp, record, None)


# ---- references in a checkpoint's JSON cannot reach outside the checkpoint folder ----

def test_recorded_names_pass_and_local_paths_outside_the_checkpoint_are_refused(tmp_path, monkeypatch):
    from hf_dpruner.config import recorded_source

    folder = tmp_path / "ckpt"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "d.txt").write_text("x")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (folder / "data" / "link.txt").symlink_to(secret)
    monkeypatch.chdir(tmp_path)
    for name in ("medical", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct (embedded)"):
        assert recorded_source(name, folder, "base_model", "--baseline-model") == name
    assert recorded_source(None, folder, "base_model", "--baseline-model") is None
    inside = folder / "data" / "d.txt"
    assert recorded_source(str(inside), folder, "calibration.domain_data", "--domain-data") == str(inside.resolve())
    assert recorded_source("ckpt/data/d.txt", folder, "calibration.domain_data", "--domain-data") == str(inside)
    for outside in (str(secret), "secret.txt", "ckpt/../secret.txt", str(folder / "data" / "link.txt"), "/etc"):
        with pytest.raises(ValueError, match=rf"outside its folder.*pass --domain-data {re.escape(outside)} to use"):
            recorded_source(outside, folder, "calibration.domain_data", "--domain-data")
    with pytest.raises(TypeError, match="base_model in .* must be a non-empty string, got 3"):
        recorded_source(3, folder, "base_model", "--baseline-model")


# ---- an interrupted download or copy ----

def test_truncated_weights_are_a_value_error_naming_the_file(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"The weights of {re.escape(str(ckpt))} \(model.safetensors\) cannot be "
                                         r"read: .*corrupt or truncated \(an interrupted download or copy\?\)"):
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)


def test_a_checkpoint_that_lost_its_mask_file_is_called_incomplete(ckpt):
    (ckpt / MASKS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"has {PRUNING_CONFIG_NAME} but no {MASKS_NAME}: the checkpoint is "
                                                "incomplete"):
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
    (ckpt / PRUNING_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="it was not saved by hf_dpruner"):
        AutoPrunedModelForCausalLM.from_pretrained(ckpt)
