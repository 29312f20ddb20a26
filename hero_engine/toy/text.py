"""Tiny text encoder for the toy model: a word tokenizer over the grammar's vocabulary + a small transformer.

The empty prompt "" encodes to ``<bos>`` followed by padding; it is the unconditional embedding (CFG).
"""
from __future__ import annotations

import re

import torch
from torch import nn

SPECIALS = ["<pad>", "<unk>", "<bos>"]
PAD, UNK, BOS = 0, 1, 2


class WordTokenizer:
    """Lower-case whitespace tokenizer with a fixed vocabulary; ids are padded/truncated to ``max_length``."""

    def __init__(self, words: list[str], max_length: int = 12):
        self.vocab = SPECIALS + [w for w in words if w not in SPECIALS]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> torch.LongTensor:
        out = torch.full((len(prompts), self.max_length), PAD, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = re.findall(r"[a-z0-9]+", p.lower())
            ids = [BOS] + [self.ids.get(w, UNK) for w in words]
            ids = ids[: self.max_length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class ToyTextEncoder(nn.Module):
    """Token + position embeddings, ``layers`` pre-norm transformer layers, final LayerNorm -> [B, L, D]."""

    def __init__(self, vocab_size: int, max_length: int = 12, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.LongTensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[:, : ids.shape[1]]
        return self.norm(self.blocks(h))
