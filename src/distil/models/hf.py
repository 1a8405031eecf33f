"""Hugging Face causal language models (`hf:/path/to/model`) as teacher or student: the optional `hf` extra.

A local `AutoModelForCausalLM` folder (as written by `save_pretrained`) is loaded without any download and
wrapped so that, like our own `gpt`, it maps token ids (B, T) int64 -> next-token logits (B, T, V). The wrapped
model keeps Hugging Face's submodule names under `model.`, so feature taps read e.g. `model.transformer.h.0`.

Teacher and student must share the data's vocabulary (bytes, 256, for our text sources): distil compares
logits token by token, so cross-tokenizer distillation is not supported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distil.errors import ModelError

INSTALL = "pip install 'distil[hf]'"


class HFCausalLM(nn.Module):
    """Token ids (B, T) -> logits (B, T, V) from a Hugging Face causal LM (which returns a ModelOutput).

    `block` is the longest context the model takes (its position table), read by `generate`.
    """

    def __init__(self, model: nn.Module, block: int | None) -> None:
        super().__init__()
        self.model = model
        self.block = block

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if self.block is not None and T > self.block:
            raise ModelError(f"hf: a sequence of {T} tokens is longer than the model's context ({self.block}); "
                             "use a smaller data.args.block")
        # an explicit all-ones mask (no padding: every block is full) spares transformers its packed-sequence
        # detection (torch.diff on positions), which the ONNX exporter cannot trace
        mask = torch.ones_like(tokens)
        return self.model(input_ids=tokens, attention_mask=mask, use_cache=False).logits  # (B, T, V)


def hf_factory(path: str) -> Callable[..., nn.Module]:
    """`hf:PATH` -> a factory `(input_shape, num_classes, **from_pretrained_kwargs)` that loads PATH."""

    def factory(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
        return load_causal_lm(path, input_shape, num_classes, **kwargs)

    return factory


def load_causal_lm(path: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> HFCausalLM:
    """Load the local folder `path` with `AutoModelForCausalLM.from_pretrained` (no download), in float32.

    `input_shape` is (T,), the context length; `num_classes` the data's vocabulary, which must be the model's.
    Extra `kwargs` go to `from_pretrained` (e.g. `attn_implementation`).
    """
    name = f"hf:{path}"
    if len(input_shape) != 1:
        raise ModelError(f"{name} takes token sequences, input shape (T,), got {list(input_shape)}: use it with a "
                         "text source (pycorpus, textfolder)")
    transformers = _import_transformers(name)
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(f"model '{name}': {folder} is not a Hugging Face model folder (no config.json there). "
                         "Check the path: it must be a local folder written by save_pretrained; nothing is "
                         "downloaded.")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load '{name}' with AutoModelForCausalLM: {type(err).__name__}: {err}") from err
    vocab = model.config.vocab_size
    if vocab != num_classes:
        raise ModelError(f"model '{name}' has a vocabulary of {vocab} tokens, but the data's is {num_classes}: "
                         "teacher, student and data must share one vocabulary (cross-tokenizer distillation is "
                         "not supported). Use a model built for the data's tokens.")
    block = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if block is not None and input_shape[0] > block:
        raise ModelError(f"model '{name}' takes at most {block} tokens, but the data's blocks have "
                         f"{input_shape[0]}: use a smaller data.args.block")
    return HFCausalLM(model.float(), block)  # float32 weights: the loop's `precision` chooses autocast


def _import_transformers(name: str):
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ModelError(f"model '{name}' needs the optional package 'transformers': {INSTALL}") from err
