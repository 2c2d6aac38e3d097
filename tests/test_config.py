"""DPrunerConfig: validation, per-parameter sparsity, JSON round trip, CLI parsing."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser

from hf_dpruner import DPrunerConfig
from hf_dpruner.config import PRUNING_CONFIG_NAME, RECORD_KEYS, read_pruning_record


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\), got 1\.0"),
        (dict(sparsity=-0.1), r"sparsity must be a number in \[0, 1\), got -0\.1"),
        (dict(sparsity="0.5"), r"sparsity must be a number in \[0, 1\), got '0\.5'"),
        (dict(sparsity_type="2:1"), r"sparsity_type '2:1' needs 0 < N < M"),
        (dict(sparsity_type="0:4"), r"sparsity_type '0:4' needs 0 < N < M"),
        (dict(sparsity_type="4:4"), r"sparsity_type '4:4' needs 0 < N < M"),
        (dict(sparsity_type="foo"), r"sparsity_type must be one of unstructured, row, N:M .*got 'foo'"),
        (dict(general_estimator="wanda"), r"general_estimator must be one of \('obs', 'fisher'\), got 'wanda'"),
        (dict(domain_pass="train"), r"domain_pass must be one of .*got 'train'"),
        (dict(domain_score="taylor3"), r"domain_score must be one of .*got 'taylor3'"),
        (dict(apply_masks_to="both"), r"apply_masks_to must be one of .*got 'both'"),
        (dict(regularization_lambda=-1.0), r"regularization_lambda must be >= 0, got -1\.0"),
        (dict(damping=0.0), r"damping must be > 0, got 0\.0"),
        (dict(layer_sparsity={"(": 0.3}), r"layer_sparsity key '\(' is not a valid regex"),
        (dict(layer_sparsity={"down_proj": 1.5}), r"layer_sparsity\['down_proj'\] must be in \[0, 1\), got 1\.5"),
        (dict(layer_sparsity={"down_proj": -0.2}), r"layer_sparsity\['down_proj'\] must be in \[0, 1\)"),
        (dict(layer_sparsity="{not json"), r"layer_sparsity must be a JSON object"),
        (dict(target_modules=[]), r"target_modules is empty"),
        (dict(num_samples=0), r"num_samples must be a positive integer, got 0"),
        (dict(seq_len=-3), r"seq_len must be a positive integer, got -3"),
    ],
)
def test_invalid_values_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPrunerConfig(**kwargs)


def test_layer_sparsity_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="layer_sparsity must be a dict"):
        DPrunerConfig(layer_sparsity='["down_proj", 0.3]')  # valid JSON, but a list


def test_valid_edge_values_are_accepted():
    assert DPrunerConfig(sparsity=0).sparsity == 0.0
    assert isinstance(DPrunerConfig(sparsity=0).sparsity, float)
    assert DPrunerConfig(sparsity=0.999).sparsity == 0.999
    assert DPrunerConfig(sparsity_type="1:2").n_m == (1, 2)
    assert DPrunerConfig(sparsity_type="row").n_m is None
    assert DPrunerConfig(regularization_lambda=0.0).regularization_lambda == 0.0
    assert DPrunerConfig(target_modules="q_proj").target_modules == ["q_proj"]


def test_layer_sparsity_json_string_is_parsed():
    config = DPrunerConfig(layer_sparsity='{"down_proj": 0.3, "layers\\\\.0\\\\.": 0.1}')
    assert config.layer_sparsity == {"down_proj": 0.3, "layers\\.0\\.": 0.1}


def test_sparsity_for_uses_first_matching_pattern_then_default():
    config = DPrunerConfig(sparsity=0.5, layer_sparsity={r"layers\.0\..*down_proj": 0.2, "down_proj": 0.3})
    assert config.sparsity_for("model.layers.0.mlp.down_proj.weight") == 0.2
    assert config.sparsity_for("model.layers.1.mlp.down_proj.weight") == 0.3
    assert config.sparsity_for("model.layers.10.mlp.down_proj.weight") == 0.3  # "layers\.0\." is not "layers.10."
    assert config.sparsity_for("model.layers.0.self_attn.q_proj.weight") == 0.5


@pytest.mark.parametrize("sparsity_type, expected", [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), ("3:4", 0.25)])
def test_sparsity_for_n_m_ignores_sparsity_and_overrides(sparsity_type, expected):
    config = DPrunerConfig(sparsity=0.1, sparsity_type=sparsity_type, layer_sparsity={"q_proj": 0.9})
    assert config.sparsity_for("model.layers.0.self_attn.q_proj.weight") == expected
    assert config.sparsity_for("model.layers.0.mlp.up_proj.weight") == expected


def _custom_config() -> DPrunerConfig:
    return DPrunerConfig(
        sparsity=0.3,
        sparsity_type="row",
        layer_sparsity={"down_proj": 0.2},
        target_modules=["q_proj", "v_proj"],
        num_samples=7,
        seq_len=33,
        general_estimator="fisher",
        damping=0.05,
        regularization_lambda=0.25,
        domain_pass="score",
        domain_score="taylor_plus",
        apply_masks_to="tuned",
    )


def test_to_dict_holds_every_field():
    data = _custom_config().to_dict()
    assert data["sparsity"] == 0.3
    assert data["layer_sparsity"] == {"down_proj": 0.2}
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads(_custom_config().to_json_string()) == data
    assert DPrunerConfig.from_dict(data) == _custom_config()


def test_save_and_load_round_trip_keeps_record_keys(tmp_path):
    config = _custom_config()
    record = {
        "method": "d-pruner",
        "hf_dpruner_version": "0.1.0",
        "base_model": "tiny",
        "calibration": {"general": "c4", "domain": "pubmed"},
        "achieved_sparsity": {"overall": 0.3},
        "recovery": {"method": "lora", "r": 8},
        "masks_sha256": "0" * 64,
    }
    path = config.save_pretrained(tmp_path / "ckpt", **record)
    assert path == tmp_path / "ckpt" / PRUNING_CONFIG_NAME
    on_disk = json.loads(path.read_text())
    for key, value in record.items():
        assert on_disk[key] == value
    assert DPrunerConfig.from_pretrained(tmp_path / "ckpt") == config
    assert DPrunerConfig.from_pretrained(path) == config  # the file itself works too
    assert read_pruning_record(tmp_path / "ckpt") == on_disk
    assert set(RECORD_KEYS) == set(record)


def test_default_config_round_trip(tmp_path):
    DPrunerConfig().save_pretrained(tmp_path)
    assert DPrunerConfig.from_pretrained(tmp_path) == DPrunerConfig()


def test_unknown_record_key_is_rejected_on_save(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown record keys \['colour'\]"):
        DPrunerConfig().save_pretrained(tmp_path, colour="blue")
    assert not (tmp_path / PRUNING_CONFIG_NAME).exists()


def test_unknown_key_in_file_is_rejected(tmp_path):
    data = {**DPrunerConfig().to_dict(), "sparsityy": 0.4}
    (tmp_path / PRUNING_CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"Unknown DPrunerConfig keys \['sparsityy'\]"):
        DPrunerConfig.from_pretrained(tmp_path)


def test_invalid_value_in_file_is_rejected(tmp_path):
    data = {**DPrunerConfig().to_dict(), "sparsity": 1.5}
    (tmp_path / PRUNING_CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sparsity must be"):
        DPrunerConfig.from_pretrained(tmp_path)


def test_corrupt_json_is_a_value_error(tmp_path):
    DPrunerConfig().save_pretrained(tmp_path)
    file = tmp_path / PRUNING_CONFIG_NAME
    file.write_text(file.read_text()[:40])
    with pytest.raises(ValueError, match="not valid JSON"):
        DPrunerConfig.from_pretrained(tmp_path)


def test_json_that_is_not_an_object_is_a_value_error(tmp_path):
    (tmp_path / PRUNING_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        DPrunerConfig.from_pretrained(tmp_path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=PRUNING_CONFIG_NAME):
        DPrunerConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        DPrunerConfig.from_pretrained(tmp_path / "nowhere" / PRUNING_CONFIG_NAME)


def test_hf_argument_parser_parses_cli_flags():
    parser = HfArgumentParser(DPrunerConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--sparsity", "0.3", "--sparsity-type", "2:4", "--target-modules", "q_proj", "v_proj"]
    )
    assert isinstance(config, DPrunerConfig)
    assert config.sparsity == 0.3
    assert config.sparsity_type == "2:4"
    assert config.n_m == (2, 4)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.general_estimator == "obs"  # defaults untouched


def test_hf_argument_parser_parses_layer_sparsity_json():
    parser = HfArgumentParser(DPrunerConfig)
    (config,) = parser.parse_args_into_dataclasses(["--layer_sparsity", '{"down_proj": 0.3}', "--sparsity", "0.4"])
    assert config.layer_sparsity == {"down_proj": 0.3}
    assert config.sparsity_for("model.layers.1.mlp.down_proj.weight") == 0.3
    assert config.sparsity_for("model.layers.1.mlp.up_proj.weight") == 0.4


def test_hf_argument_parser_rejects_invalid_value():
    parser = HfArgumentParser(DPrunerConfig)
    with pytest.raises(ValueError, match="needs 0 < N < M"):
        parser.parse_args_into_dataclasses(["--sparsity-type", "4:2"])
