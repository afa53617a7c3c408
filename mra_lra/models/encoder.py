"""The LRA backbone: the same Transformer for every attention.

Pre-LN blocks (LayerNorm -> attention -> residual, LayerNorm -> GELU FFN -> residual), absolute
positions (learned, or fixed sinusoids), a final LayerNorm, pooling, and a two-layer head.
Retrieval runs both documents through one shared encoder and classifies [u, v, u*v, u-v]. The
options are documented in conf/model/lra.yaml (the MRA paper's recipe) and docs/lra_jax.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mra_lra.attention import build

# mean_padded divides the sum over real tokens by the padded length, as the MRA authors' LRA code
# (`norm(x) * mask`, then a mean over every position).
POOLINGS = ("mean", "mean_padded", "cls")
POSITIONS = ("learned", "sinusoidal")
INPUT_ENCODINGS = ("tokens", "continuous")  # continuous: Linear(1, d_model) of id / 255 (pixels)
PIXEL_MAX = 255.0


class MultiHeadAttention(nn.Module):
    """Projections around any registered attention: [B, n, D] -> [B, n, D]."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_length: int,
        attn: dict,
        qkv_dim: int | None = None,
        prefix_tokens: int = 0,
        attention_float32: bool = False,
    ):
        super().__init__()
        if qkv_dim is not None and qkv_dim < 1:
            raise ValueError(f"model.qkv_dim must be a positive width or null, got {qkv_dim}")
        qkv_dim = qkv_dim or d_model
        if qkv_dim % n_heads:
            raise ValueError(
                f"the attention width ({qkv_dim}: model.qkv_dim, or model.d_model when qkv_dim is "
                f"null) must be divisible by model.n_heads={n_heads}"
            )
        self.n_heads = n_heads
        self.qkv_dim = qkv_dim
        self.attention_float32 = attention_float32
        self.head_dim = qkv_dim // n_heads
        self.qkv = nn.Linear(d_model, 3 * qkv_dim)
        self.out = nn.Linear(qkv_dim, d_model)
        options = dict(attn)
        name = options.pop("name")
        # What the encoder tells its attention; kept so that tools can build others alike.
        self.context = {
            "head_dim": self.head_dim,
            "num_heads": n_heads,
            "max_length": max_length,
            "prefix_tokens": prefix_tokens,
        }
        self.attention = build(name, context=self.context, **options)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.attention_float32:
            # As the MRA authors' LRA code: attention outside autocast, on float32 q, k, v.
            with torch.autocast(x.device.type, enabled=False):
                y = self.attention(q.float(), k.float(), v.float(), mask)
        else:
            y = self.attention(q, k, v, mask)
        return self.out(y.transpose(1, 2).reshape(B, n, self.qkv_dim))


class Block(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, attn: MultiHeadAttention):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = attn
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, d_ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ffn, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.drop(self.ffn(self.norm2(x)))


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """Fixed positions [length, dim]: sin in even, cos in odd channels, wavelengths 2pi..1e4 2pi."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1e4) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class LRAEncoder(nn.Module):
    """Token ids [B, n] and mask [B, n] -> pooled features [B, d_model]. `pooling`,
    `input_encoding` and `positions` are one of POOLINGS, INPUT_ENCODINGS and POSITIONS."""

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
        qkv_dim: int | None = None,
        positions: str = "learned",
        gradient_checkpointing: bool = False,
        attention_float32: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"model.n_layers must be >= 1, got {n_layers}")
        for key, value, allowed in [
            ("pooling", pooling, POOLINGS),
            ("input_encoding", input_encoding, INPUT_ENCODINGS),
            ("positions", positions, POSITIONS),
        ]:
            if value not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {value!r}")
        for key, value in [
            ("gradient_checkpointing", gradient_checkpointing),
            ("attention_float32", attention_float32),
        ]:
            if not isinstance(value, bool):
                raise ValueError(f"model.{key} must be true or false, got {value!r}")
        self.max_length = max_length
        self.gradient_checkpointing = gradient_checkpointing
        self.pooling = pooling
        self.positions = positions
        self.input_encoding = input_encoding
        if input_encoding == "tokens":
            self.embed = nn.Embedding(vocab_size, d_model)
        else:
            self.embed = nn.Linear(1, d_model)
        # The CLS token takes position 0 and one more slot of every attention's length.
        prefix = int(pooling == "cls")
        length = max_length + prefix
        if prefix:
            self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        if positions == "learned":
            self.pos = nn.Embedding(length, d_model)
            nn.init.normal_(self.pos.weight, std=0.02)
        else:  # not saved in checkpoints: rebuilt from the config
            self.register_buffer("pos_table", sinusoids(length, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList()
        for _ in range(n_layers):
            mha = MultiHeadAttention(
                d_model, n_heads, length, attn, qkv_dim, prefix, attention_float32
            )
            self.blocks.append(Block(d_model, d_ffn, dropout, mha))
        self.norm = nn.LayerNorm(d_model)
        if input_encoding == "tokens":
            nn.init.normal_(self.embed.weight, std=0.02)

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
        if self.pooling == "cls":
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
            mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        table = self.pos.weight if self.positions == "learned" else self.pos_table
        x = x + table[: x.shape[1]].to(x.dtype)
        x = self.drop(x)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                # Keep only each block's input; its activations are recomputed in the backward,
                # with the RNG state of the forward (same dropout, same random features).
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        x = self.norm(x)
        if self.pooling == "cls":
            return x[:, 0]
        m = mask[..., None]
        if self.pooling == "mean_padded":
            return (x * m).sum(dim=1) / x.shape[1]
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class LRAClassifier(nn.Module):
    """Encoder + head. Single input, or two towers sharing the encoder (`two_tower=True`);
    `encoder` holds LRAEncoder's arguments."""

    def __init__(
        self, num_classes: int, two_tower: bool = False, head_hidden: int = 128, **encoder
    ):
        super().__init__()
        self.two_tower = two_tower
        self.encoder = LRAEncoder(**encoder)
        features = 4 * encoder["d_model"] if two_tower else encoder["d_model"]
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
