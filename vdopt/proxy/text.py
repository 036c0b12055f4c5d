"""Word-level tokenizer over the caption grammar and a tiny transformer text encoder, trained with the DiT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD, UNK, BOS = "<pad>", "<unk>", "<s>"


class WordTokenizer:
    """Splits on whitespace and maps words to ids; every sequence starts with ``<s>`` and is padded to length.

    The leading ``<s>`` gives the empty (unconditional) prompt one real token, so attention never sees a row
    that is all padding.
    """

    def __init__(self, words: list[str], max_length: int = 40) -> None:
        self.vocab = [PAD, UNK, BOS, *words]
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.max_length = max_length
        self.pad_id, self.unk_id, self.bos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, max_length]`` (long) and a mask of real tokens ``[B, max_length]`` (bool)."""
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.bos_id] + [self.index.get(word, self.unk_id) for word in text.lower().split()]
            if len(tokens) > self.max_length:
                raise ValueError(
                    f"Prompt {text!r} has {len(tokens) - 1} words but the tokenizer holds {self.max_length - 1}; "
                    "shorten the prompt (the proxy grammar never exceeds the limit)."
                )
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad_id

    def to_dict(self) -> dict:
        return {"words": self.vocab[3:], "max_length": self.max_length}

    @classmethod
    def from_dict(cls, data: dict) -> WordTokenizer:
        return cls(list(data["words"]), int(data["max_length"]))


class _EncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP over text tokens, with padding keys masked out."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask.view(b, 1, 1, n))
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` -> ``encoder_hidden_states [B, L, dim]``; padding positions are exactly zero.

    Zeroed padding mirrors how WanPipeline pads T5 outputs, so the DiT's cross-attention sees the same kind
    of input a real Wan model does.
    """

    def __init__(self, vocab_size: int, dim: int = 128, num_layers: int = 2, num_heads: int = 4,
                 ffn_dim: int = 384, max_length: int = 40) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "dim": dim, "num_layers": num_layers, "num_heads": num_heads,
                       "ffn_dim": ffn_dim, "max_length": max_length}
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.layers = nn.ModuleList(_EncoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x) * mask.unsqueeze(-1).to(x.dtype)
