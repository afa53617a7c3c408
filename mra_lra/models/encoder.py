"""The MRA paper's LRA backbone: the same small Transformer for every attention.

Pre-LN blocks (LayerNorm -> attention -> residual, LayerNorm -> GELU FFN -> residual), learned
absolute positions, a final LayerNorm, pooling over real positions, and a two-layer head.
Retrieval runs both documents through one shared encoder and classifies [u, v, u*v, u-v].
"""

from __future__ import annotations

import torch
from torch import nn

from mra_lra.attention import build

POOLINGS = ("mean", "cls")
# How token ids enter the model: `tokens` looks each id up in an embedding table; `continuous`
# reads it as a pixel intensity, id / 255, through Linear(1, d_model) (pixel tasks only).
INPUT_ENCODINGS = ("tokens", "continuous")
PIXEL_MAX = 255.0


class MultiHeadAttention(nn.Module):
    """Projections around any registered attention: [B, n, D] -> [B, n, D]."""

    def __init__(self, d_model: int, n_heads: int, max_length: int, attn: dict):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(
                f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}"
            )
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        options = dict(attn)
        name = options.pop("name")
        context = {"head_dim": self.head_dim, "num_heads": n_heads, "max_length": max_length}
        self.attention = build(name, context=context, **options)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, n, D = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = self.attention(q, k, v, mask)
        return self.out(y.transpose(1, 2).reshape(B, n, D))


class Block(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, d_ffn: int, dropout: float, max_length: int, attn: dict
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, max_length, attn)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class LRAEncoder(nn.Module):
    """Token ids [B, n] and mask [B, n] -> pooled features [B, d_model]. `input_encoding` is one
    of INPUT_ENCODINGS."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ffn: int,
        dropout: float,
        pooling: str,
        attn: dict,
        input_encoding: str = "tokens",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be one of {POOLINGS}, got {pooling!r}")
        if input_encoding not in INPUT_ENCODINGS:
            raise ValueError(
                f"model.input_encoding must be one of {INPUT_ENCODINGS}, got {input_encoding!r}"
            )
        self.max_length = max_length
        self.pooling = pooling
        self.input_encoding = input_encoding
        if input_encoding == "tokens":
            self.embed = nn.Embedding(vocab_size, d_model)
        else:
            self.embed = nn.Linear(1, d_model)
        self.pos = nn.Embedding(max_length, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ffn, dropout, max_length, attn) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        if input_encoding == "tokens":
            nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        if n > self.max_length:
            raise ValueError(
                f"sequence length {n} exceeds the model's max_length {self.max_length}"
            )
        mask = mask.to(self.embed.weight.dtype)
        if self.input_encoding == "tokens":
            x = self.embed(input_ids)
        else:
            x = self.embed((input_ids.to(self.embed.weight.dtype) / PIXEL_MAX)[..., None])
        x = x + self.pos.weight[:n]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.pooling == "cls":
            return x[:, 0]
        m = mask[..., None]
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class LRAClassifier(nn.Module):
    """Encoder + head. Single input, or two towers sharing the encoder (`two_tower=True`)."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_length: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ffn: int,
        dropout: float,
        pooling: str,
        attn: dict,
        two_tower: bool = False,
        head_hidden: int = 128,
        input_encoding: str = "tokens",
    ):
        super().__init__()
        self.two_tower = two_tower
        self.encoder = LRAEncoder(
            vocab_size,
            max_length,
            d_model,
            n_layers,
            n_heads,
            d_ffn,
            dropout,
            pooling,
            attn,
            input_encoding,
        )
        features = 4 * d_model if two_tower else d_model
        self.head = nn.Sequential(
            nn.Linear(features, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes)
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.two_tower:
            return self.head(self.encoder(batch["input_ids"], batch["mask"]))
        # One batched pass of 2B sequences through the shared encoder.
        ids = torch.cat([batch["input_ids"], batch["input_ids_2"]])
        mask = torch.cat([batch["mask"], batch["mask_2"]])
        u, v = self.encoder(ids, mask).chunk(2)
        return self.head(torch.cat([u, v, u * v, u - v], dim=-1))
