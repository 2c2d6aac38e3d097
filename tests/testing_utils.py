"""Helpers the tests share: tiny random causal LMs, token windows, a word-level tokenizer and text, D-Pruner trainers
and pruned models built in the test. Fixtures that wrap them live in conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub.utils import filter_repo_objects
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
)

from hf_dpruner import DPrunerConfig, DPrunerTrainer, make_pruned
from hf_dpruner.masks import compute_masks
from hf_dpruner.pat import PATConfig, PATTrainer
from hf_dpruner.targets import find_prunable_weights

VOCAB = 128

_DECODER_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def build_tiny(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny randomly initialised causal LM (`arch` in llama, mistral, qwen2, gpt2), deterministic per seed."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**_DECODER_KWARGS, **overrides}))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**_DECODER_KWARGS, **overrides}))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**_DECODER_KWARGS, **overrides}))
    elif arch == "gpt2":
        kwargs = dict(
            n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, n_inner=128,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
        )
        model = GPT2LMHeadModel(GPT2Config(**{**kwargs, **overrides}))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    return model.eval()


def make_windows(n: int, length: int = 16, seed: int = 0, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    """`n` random token windows of `length` tokens, shape (n, length), int64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, length), generator=generator)


def make_batches(n_batches: int = 2, batch_size: int = 2, length: int = 16, seed: int = 0) -> list[dict]:
    """Calibration batches ``[{"input_ids": (batch_size, length)}]``."""
    ids = make_windows(n_batches * batch_size, length, seed)
    return [{"input_ids": ids[i * batch_size : (i + 1) * batch_size]} for i in range(n_batches)]


ARCHS = ("llama", "mistral", "qwen2", "gpt2")


WORDS = [f"w{i}" for i in range(120)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(WORDS)} | {"[UNK]": 120, "</s>": 121}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]", pad_token="</s>")


def text(seed: int, n: int = 60) -> str:
    generator = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, 120, (n,), generator=generator).tolist())


def save_tiny_model_folder(folder) -> None:
    """A tiny Llama with the word-level tokenizer saved as a model folder (what `--model` takes)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return build_tiny("llama", seed)


def windows(n: int, length: int = 16, low: int = 0, high: int = 128, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(low, high, (n, length), generator=generator).tolist()})


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def make_trainer(tmp_path, config=None, model=None, args=None, **kwargs) -> DPrunerTrainer:
    return DPrunerTrainer(
        model=model or tiny_llama(),
        args=args or training_args(tmp_path),
        dpruner_config=config or DPrunerConfig(sparsity=0.5),
        train_dataset=kwargs.pop("train_dataset", windows(8, low=0, high=64, seed=1)),
        general_dataset=kwargs.pop("general_dataset", windows(8, low=64, high=128, seed=2)),
        **kwargs,
    )


def small_word_tokenizer(with_pad: bool) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100)} | {"[UNK]": 100, "</s>": 101}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "</s>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]", **kwargs)


CALIBRATION = {"general_samples": 4, "domain_samples": 4, "seq_len": 64, "domain_steps": 2,
               "general_data": "general", "domain_data": "medical"}


def pruned_tiny(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", sparsity=0.5, **config):
    model = build_tiny("llama")
    weights = find_prunable_weights(model, None)
    cfg = DPrunerConfig(sparsity=sparsity, **config)
    masks = compute_masks({n: w.weight.detach().abs() for n, w in weights.items()}, weights, cfg)
    record = {"method": "dpruner", "base_model": base_model, "calibration": dict(CALIBRATION)}
    return make_pruned(model, masks, cfg, record, apply=True)


class FakeHfApi:
    """Records what would be sent to the Hub; `upload_folder` captures the files it would upload."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, exist_ok=False):
        FakeHfApi.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        uploaded = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        FakeHfApi.calls.append(("upload_folder", repo_id, uploaded, commit_message, revision, self.token,
                                (folder / "README.md").read_text()))
        return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


# PAT with a learned mask on the hidden channels (the paper); PATConfig's default is the one-shot neuron recipe
PAT_LEARNED = {"axis": "hidden", "strategy": "learned"}
NEURONS_LEARNED = {"axis": "neurons", "strategy": "learned"}  # PAT's learned mask on the MLP neurons


def pat_trainer(model, tmp_path, config: PATConfig, steps: int = 12, train: bool = True, **args) -> PATTrainer:
    """A `PATTrainer` on 32 random windows of 16 tokens (``make_windows(32, 16)``) with the tests' settings (AdamW
    1e-2, batches of 4, `steps` steps, `args` over them), trained unless ``train=False``."""
    dataset = Dataset.from_dict({"input_ids": make_windows(32, 16).tolist()})
    settings = dict(max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                    save_strategy="no", disable_tqdm=True, logging_steps=steps)
    training_args = TrainingArguments(str(tmp_path / "run"), **{**settings, **args})
    trainer = PATTrainer(model=model, args=training_args, pat_config=config, train_dataset=dataset)
    if train:
        trainer.train()
    return trainer


def export_with_masked_logits(trainer: PATTrainer, out: Path) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Export `trainer`'s model to `out` and check that the export and its plain ``from_pretrained`` reload compute
    the masked model's logits (2e-5 absolute + 1e-4 relative); returns ``(export, reload)``."""
    x = make_windows(3, 12, seed=7)
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=x).logits
    small = trainer.export(out)
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=x).logits, expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(plain(input_ids=x).logits, expected, atol=2e-5, rtol=1e-4)
    return small, plain
