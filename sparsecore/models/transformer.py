"""A small decoder-only Transformer for character-level language modelling (GPT style:
pre-LayerNorm blocks of causal multi-head self-attention and a 4x MLP, learned positions,
tied nothing). Every projection is an `nn.Linear`, so pruning and `sparsify` reach them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sparsecore.models import register, scaled


class CausalSelfAttention(nn.Module):
    """(B, T, d) -> (B, T, d); position t attends to positions <= t."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, heads, T, d / heads)
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)). (B, T, d) -> (B, T, d)."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class Transformer(nn.Module):
    """Token ids (B, T) with T <= block_size -> next-token logits (B, T, vocab_size)."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int = 128, depth: int = 4,
                 heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads, dropout) for _ in range(depth)))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.feature_layers = [f"blocks.{i}" for i in range(depth)] + ["head"]
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))


@register("transformer")
def transformer(num_classes: int, in_channels: int, input_size: int, width: float,
                d_model: int = 128, depth: int = 4, heads: int = 4,
                dropout: float = 0.0) -> Transformer:
    """Decoder-only char LM: num_classes = vocabulary size, input_size = context length;
    width scales d_model (rounded to a multiple of heads)."""
    del in_channels
    d = max(heads, scaled(d_model, width) // heads * heads)
    return Transformer(num_classes, input_size, d, depth, heads, dropout)
