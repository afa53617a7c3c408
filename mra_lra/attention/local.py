"""Local attention, the LRA baseline (Tay et al., ICLR 2021): attention inside blocks.

Each query sees the keys of its own block of `block_size` tokens only (no neighbour, no global
token), the pattern google-research/long-range-arena's models/local/local_attention.py sets out
to compute. block_size 50 is its LocalTransformerEncoder default (ListOps, Text, Retrieval);
its CIFAR-10 and Pathfinder configs set 64.

`strided=true` reproduces what that code's reshape computes instead: [n_pad] is cut as
[block_size, G], so the tokens t, t + G, t + 2G, ... (G = n_pad / block_size) attend together,
with n padded to n // block_size + 1 blocks as it pads (but under a correct padding mask: its
mask is cut into contiguous blocks). Computed in float32 with autocast off. No dropout on the
probabilities (the LRA code drops them at the model's rate). Cost O(n block_size d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


@register("local")
class LocalAttention(nn.Module):
    def __init__(self, block_size: int = 50, strided: bool = False):
        super().__init__()
        check_at_least(1, block_size=block_size)
        self.block_size = block_size
        self.strided = strided

    def num_blocks(self, n: int) -> int:
        """Blocks the length is padded to: ceil(n / b), or n // b + 1 as the LRA code pads."""
        return n // self.block_size + 1 if self.strided else math.ceil(n / self.block_size)

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        b, nb = self.block_size, self.num_blocks(n)
        pad = nb * b - n
        keep = F.pad(keep, (0, pad))[:, None]  # [B, 1, nb b]

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, H, nb b, ...] -> [B, H, nb, b, ...]
            if self.strided:  # group j holds tokens j, j + nb, j + 2 nb, ...
                return t.unflatten(2, (b, nb)).transpose(2, 3)
            return t.unflatten(2, (nb, b))

        lowest = torch.finfo(compute).min
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = (F.pad(t.to(compute), (0, 0, 0, pad)) for t in (q, k, v))
            q_b, k_b, v_b = blocks(q / math.sqrt(d)), blocks(k), blocks(v)
            logits = q_b @ k_b.transpose(-1, -2)  # [B, H, nb, b, b]
            logits = logits.masked_fill(~blocks(keep)[..., None, :], lowest)
            out = torch.softmax(logits, dim=-1) @ v_b
            if self.strided:
                out = out.transpose(2, 3)
            out = out.reshape(B, H, nb * b, d)[:, :, :n]
        return zero_padded_queries(out, mask).to(in_dtype)
