"""A small decoder-only transformer in the nanoGPT style, for byte-level language models.

Causal self-attention (`F.scaled_dot_product_attention`), pre-norm blocks, a GELU MLP of 4x the width,
learned positions, and the output layer tied to the token embedding. Submodules by name, for taps:
`embed`, `blocks.0` .. `blocks.{depth-1}` (each (B, T, width)), `norm`, `head`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distil.errors import ModelError

KeyValues = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values, (B, H, positions, C/H) each


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dropout={self.dropout}"  # in repr: the teacher cache's key reads it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)[0]

    def step(self, x: torch.Tensor, past: KeyValues | None = None) -> tuple[torch.Tensor, KeyValues]:
        """Attention of `x` (B, T, C) over the past keys and values (generation's cache) and its own, causally;
        returns the output and the keys and values so far, (B, H, past + T, C/H) each."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # with a cache, one new position attends to every key (a causal mask would align it with the first)
        causal = past is None or T > 1
        if past is not None and T > 1:
            raise ValueError("a cached attention step takes one new position at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)  # (B, H, T, C/H) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def step(self, x: torch.Tensor, past: KeyValues | None = None) -> tuple[torch.Tensor, KeyValues]:
        attended, cache = self.attn.step(self.norm1(x), past)
        x = x + attended
        return x + self.mlp(self.norm2(x)), cache


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab). `block` is the longest context it takes."""

    def __init__(self, vocab: int, block: int, width: int = 128, depth: int = 4, heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ModelError(f"gpt: width ({width}) must be a multiple of heads ({heads})")
        self.block = block
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, block, width))
        self.blocks = nn.Sequential(*[Block(width, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: one matrix reads tokens in and writes them out
        self.apply(_init)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.block:
            raise ModelError(f"gpt: a sequence of {T} tokens is longer than the model's context ({self.block}); "
                             "crop it, or build the model with a larger block")
        x = self.embed(tokens) + self.position[:, :T]  # (B, T, width)
        return self.head(self.norm(self.blocks(x)))  # (B, T, vocab)


    def step(self, tokens: torch.Tensor, cache: list[KeyValues] | None = None) -> tuple[torch.Tensor, list[KeyValues]]:
        """Generation with a key-value cache: the next-token logits (B, V) after `tokens` (B, T), which follow
        the `cache` of earlier positions (None: the start), and the cache that now includes them."""
        past = cache[0][0].shape[2] if cache else 0
        T = tokens.shape[1]
        if past + T > self.block:
            raise ModelError(f"gpt: {past + T} positions exceed the model's context ({self.block})")
        x = self.embed(tokens) + self.position[:, past:past + T]  # (B, T, width)
        caches = []
        for i, block in enumerate(self.blocks):
            x, kv = block.step(x, cache[i] if cache else None)
            caches.append(kv)
        return self.head(self.norm(x[:, -1])), caches  # (B, V)


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def gpt(input_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 4, heads: int = 4,
        dropout: float = 0.0) -> GPT:
    """Zoo factory: `input_shape` is (block,), the context length; `num_classes` the vocabulary."""
    if len(input_shape) != 1:
        raise ModelError(f"gpt takes token sequences, input shape (T,), got {list(input_shape)}: use it with a text "
                         "source (pycorpus, textfolder)")
    return GPT(num_classes, input_shape[0], width, depth, heads, dropout)


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample `new_tokens` continuations of `prompt` (B, P) -> (B, P + new_tokens), feeding back at most the
    model's context (`model.block`, when it has one). temperature 0 is greedy. Our `GPT` keeps a key-value
    cache while the sequence fits its context: each new token then costs one position's forward pass."""
    was_training = model.training
    model.eval()
    block = getattr(model, "block", None)
    # a key-value cache while the sequence fits the context (the last new token is never fed back)
    cached = isinstance(model, GPT) and prompt.shape[1] + new_tokens - 1 <= model.block
    tokens, cache = prompt, None
    for _ in range(new_tokens):
        if cached:
            logits, cache = model.step(tokens if cache is None else tokens[:, -1:], cache)
            logits = logits.float()  # (B, V): the next token's
        else:
            context = tokens if block is None else tokens[:, -block:]
            logits = model(context)[:, -1].float()  # (B, V): the next token's
        if temperature == 0:
            following = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            following = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        tokens = torch.cat([tokens, following], dim=1)
    model.train(was_training)
    return tokens
