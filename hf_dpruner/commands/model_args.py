"""The model flags every subcommand that loads a base model shares (``--model``, ``--dtype``...), and the one
function that loads it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..modeling import load_causal_lm
from ..resources import DEFAULT_MODEL_NAME, default_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelArguments:
    """Which base model to load, and how."""

    model: str | None = field(
        default=None, metadata={"help": "Hub id or local folder. Default: the embedded SmolLM2-135M-Instruct."}
    )
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "Model dtype."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the Hub."})
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Allow loading weights stored only as pytorch_model.bin (a pickle; only from sources you "
                  "trust). Default: safetensors only."},
    )

    @property
    def name(self) -> str:
        """The model's name as checkpoints record it (the embedded model's Hub name by default)."""
        return self.model or DEFAULT_MODEL_NAME


def load_model(args: ModelArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model and its tokenizer, as `args` says (the embedded model is prepared on first use)."""
    path = args.model or str(default_model_path())
    print(f"model: {args.name}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    model = load_causal_lm(path, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code,
                           allow_pickle=args.allow_pickle_weights)
    return model, tokenizer
