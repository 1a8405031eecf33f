"""Sequence-level distillation for language models (Kim & Rush 2016, "Sequence-Level Knowledge Distillation").

The student learns from the teacher's own text instead of the corpus's: each training block keeps its first
`prompt` tokens (learned as the corpus's text: a language model is also scored on short contexts), and the
teacher writes the rest, sampled at `temperature` (1: the teacher's own distribution;
0: greedy, its most likely next token at each position, which a small model turns into loops). The
student is then trained on those sequences with the recipe's terms: CE alone on them is sequence-level KD proper
(the teacher's outputs, learned as hard targets); a per-token term beside it (`kd`, `jsd`) also matches the
teacher's distributions along the teacher's own text. Validation and test stay on the corpus.

    text = teacher_text(teacher, splits.train, prompt=64)      # recipe: distill.sequence_kd: true

With a `TeacherCache` the text is kept on disk, keyed by the teacher, the blocks, the prompt length, the
temperature, the seed, the batch size and the device type (a GPU's sampler draws other numbers than the CPU's),
so a rerun, a second student or another term reads it back instead of generating it again.
"""

from __future__ import annotations

import torch
from torch import nn

from distil.cache import TeacherCache, cache_key
from distil.data import Split
from distil.errors import ConfigError
from distil.evaluate import model_device
from distil.models.gpt import generate


@torch.no_grad()
def teacher_text(teacher: nn.Module, split: Split, prompt: int, temperature: float = 1.0, seed: int = 0,
                 batch_size: int = 256, cache: TeacherCache | None = None) -> Split:
    """`split`'s token blocks (N, T) with every token after the first `prompt` written by `teacher` (sampled at
    `temperature` from a generator seeded by `seed`, so every process writes the same text; 0: greedy), and their
    next-token targets: inside the prompt the corpus's next tokens, from its last position on the teacher's.
    Generated on the teacher's device (or read from `cache`: `cache.last_event` says which), returned on `split`'s.
    """
    if split.x.dim() != 2:
        raise ConfigError(f"distill.sequence_kd: the teacher writes text, which needs token blocks (N, T); got "
                          f"inputs of shape {list(split.x.shape)}")
    length = split.x.shape[1]
    if not 1 <= prompt < length:
        raise ConfigError(f"distill.prompt_tokens ({prompt}) must be between 1 and the block length ({length}) - 1: "
                          "the teacher continues each block's prompt to the end")
    if not temperature >= 0:
        raise ConfigError(f"distill.sequence_temperature must be >= 0 (0: greedy), got {temperature}")
    where = model_device(teacher, split.x.device)

    def write() -> torch.Tensor:
        generator = torch.Generator(device=where).manual_seed(seed)
        return torch.cat([generate(teacher, split.x[i:i + batch_size, :prompt].to(where), length + 1 - prompt,
                                   temperature, generator=generator).cpu() for i in range(0, len(split), batch_size)])

    if cache is None:
        tokens = write()
    else:
        # the batch size too: one generator draws for every batch in turn, so the batches' size shapes the text
        what = (f"sequence_kd:prompt={prompt}:temperature={float(temperature)}:seed={seed}:batch={batch_size}:"
                f"{where.type}")
        tokens = cache.get(cache_key(teacher, split.x, what), write)
    tokens = tokens.to(split.x.device)  # (N, T + 1): the prompt, then the teacher's tokens
    return Split(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
