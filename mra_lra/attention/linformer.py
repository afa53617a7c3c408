"""Linformer (Wang et al., 2020): keys and values projected along the sequence to k rows.

    out = softmax(q (E k)^T / sqrt(d)) (E v),   E: [k, max_length], learned

Cost O(n k d). Conventions:
- One projection E per layer, shared by all heads and by keys and values (the paper's headwise
  and key-value sharing, as the spec asks; the LRA code bases share it between keys and values
  too). Those code bases keep one E per head ([heads, k, max_length]) and share that one tensor
  across all layers: mlpen/mra-attention LRA/encoders/linformer.py through its config dict,
  mlpen/Nystromformer LRA/code/attention_linformer.py through a class attribute. Here every
  layer has its own E.
- E is drawn from N(0, 1 / max_length), so a projected key has the scale of one token. The MRA
  authors' reference draws randn / sqrt(k) (std 1 / 16 at k = 256); the Nystromformer LRA code
  uses std 0.02.
- For n < max_length the first n columns of E are used; n > max_length is an error.
- Padded tokens are zeroed before the projection. A projected row that mixes no real token (all
  its weights on real tokens are 0, e.g. an identity E over padding) is masked out, so with
  k = n and E = I the output is exactly masked softmax attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries


@register("linformer")
class LinformerAttention(nn.Module):
    def __init__(self, max_length: int | None = None, projected_length: int = 256):
        super().__init__()
        if max_length is None or max_length < 1:
            raise ValueError(
                f"linformer needs max_length >= 1 (the model's longest sequence, which the "
                f"encoder passes in `context`), got {max_length}"
            )
        if projected_length < 1:
            raise ValueError(f"projected_length must be >= 1, got {projected_length}")
        self.max_length = max_length
        self.projection = nn.Parameter(
            torch.randn(projected_length, max_length) / math.sqrt(max_length)
        )

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        if n > self.max_length:
            raise ValueError(
                f"linformer got sequence length {n} > max_length {self.max_length} "
                "(its projection has max_length columns)"
            )
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        keep = torch.ones(B, n, dtype=compute, device=q.device) if mask is None else mask
        keep = keep.to(compute)
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
