"""Local attention, the Long Range Arena baseline (Tay et al., ICLR 2021): attention inside blocks.

The sequence is cut into non-overlapping blocks of `block_size` tokens and each query sees the
keys of its own block only: no neighbouring block, no overlap, no global token. This is the
pattern the LRA code sets out to compute (google-research/long-range-arena, lra_benchmarks/
models/local/local_attention.py: pad the length to whole blocks, attend within each block, cut the
padding off again; "Grouping" below says what its reshape computes instead). A block of n tokens
or more is softmax attention.

Conventions:
- `block_size` 50: the LRA code's LocalTransformerEncoder default (local.py), which its ListOps,
  Text and Retrieval runs use, since their configs do not set it (LocalAttention's own default of
  20 is always overridden). Its CIFAR-10 and Pathfinder configs set 64 (`attn.block_size=64`).
- Grouping. The LRA code reshapes the [n_pad, heads, d] projections to [block_size, G,
  heads, d] and attends along the first axis, so the tokens that attend together are not a
  contiguous block but t, t + G, t + 2G, ... with G = n_pad / block_size, the number of blocks
  (strided across the whole sequence); its padding mask, meanwhile, is cut into contiguous
  blocks, so each group is masked with the flags of other tokens. `strided=true` reproduces that
  grouping, with n padded to (n // block_size + 1) blocks as the LRA code pads it (a whole block
  even when n divides), under a correct padding mask. The default is the contiguous blocks that
  local attention means, and that the LRA code's padding mask assumes.
- Padded keys get no weight; padded queries output zero. A real query always sees itself, and a
  fully padded row outputs zero, not NaN.
- Computed in float32 (or float64) with autocast off, also under bf16-mixed training.
- No dropout on the attention probabilities (the spec gives attention dropout to softmax only;
  the LRA code drops them at the model's attention dropout rate).

Cost O(n block_size d); the scores are [B, H, n, block_size], nothing n x n.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries


@register("local")
class LocalAttention(nn.Module):
    def __init__(self, block_size: int = 50, strided: bool = False):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.strided = strided

    def num_blocks(self, n: int) -> int:
        """Blocks the length is padded to: ceil(n / b), or n // b + 1 as the LRA code pads."""
        return n // self.block_size + 1 if self.strided else math.ceil(n / self.block_size)

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        b, nb = self.block_size, self.num_blocks(n)
        pad = nb * b - n
        keep = F.pad(keep, (0, pad))
        if self.strided:  # group j holds tokens j, j + nb, j + 2 nb, ...

            def blocks(t):
                return t.reshape(B, H, b, nb, d).transpose(2, 3)

            keep_blocks = keep.view(B, b, nb).transpose(1, 2)
        else:

            def blocks(t):
                return t.reshape(B, H, nb, b, d)

            keep_blocks = keep.view(B, nb, b)
        lowest = torch.finfo(compute).min
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = (F.pad(t.to(compute), (0, 0, 0, pad)) for t in (q, k, v))
            q_b, k_b, v_b = blocks(q / math.sqrt(d)), blocks(k), blocks(v)  # [B, H, nb, b, d]
            logits = q_b @ k_b.transpose(-1, -2)  # [B, H, nb, b, b]
            logits = logits.masked_fill(~keep_blocks[:, None, :, None, :], lowest)
            out = torch.softmax(logits, dim=-1) @ v_b
            if self.strided:
                out = out.transpose(2, 3)
            out = out.reshape(B, H, nb * b, d)[:, :, :n]
        return zero_padded_queries(out, mask).to(in_dtype)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, strided={self.strided}"
