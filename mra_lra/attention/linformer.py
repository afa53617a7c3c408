"""Linformer (Wang et al., 2020): keys and values projected along the sequence to k rows.

    out = softmax(q (E k)^T / sqrt(d)) (E v),   E: [k, max_length], learned;  O(n k d)

One E per layer, shared by the heads and by keys and values (the paper's headwise and key-value
sharing; the MRA and Nystromformer LRA code keep one E per head, shared across layers). E ~ N(0,
1 / max_length), so a projected key has one token's scale (MRA's code: randn / sqrt(k)). For n <
max_length the first n columns are used. Padded tokens are zeroed before the projection, and a
projected row that mixes no real token is masked out, so k = n with E = I is masked softmax.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mra_lra.attention.registry import check_at_least, check_length, register
from mra_lra.attention.softmax import zero_padded_queries


@register("linformer")
class LinformerAttention(nn.Module):
    def __init__(self, max_length: int | None = None, projected_length: int = 256):
        super().__init__()
        check_at_least(1, max_length=max_length, projected_length=projected_length)
        self.max_length = max_length
        self.projection = nn.Parameter(
            torch.randn(projected_length, max_length) / math.sqrt(max_length)
        )

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        check_length(n, self.max_length)
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        keep = q.new_ones(B, n, dtype=compute) if mask is None else mask.to(compute)
        proj = self.projection[:, :n].to(compute)
        weight = keep[:, None, :, None]
        k_proj = torch.einsum("rn,bhnd->bhrd", proj, k.to(compute) * weight)
        v_proj = torch.einsum("rn,bhnd->bhrd", proj, v.to(compute) * weight)
        filled = ((proj != 0).to(compute) @ keep.transpose(0, 1)).transpose(0, 1) > 0  # [B, k]

        # Under autocast the matmul returns half precision: mask and normalise in `compute`.
        logits = (q.to(compute) @ k_proj.transpose(-1, -2)).to(compute) / math.sqrt(d)
        logits = logits.masked_fill(~filled[:, None, None, :], torch.finfo(compute).min)
        out = torch.softmax(logits, dim=-1) @ v_proj
        return zero_padded_queries(out, mask).to(in_dtype)

    def extra_repr(self) -> str:
        k, max_length = self.projection.shape
        return f"projected_length={k}, max_length={max_length}"
