"""Sparse Transformer (Child et al., 2019): the fixed pattern, as the LRA code merges it.

google-research/long-range-arena (models/sparse_transformer/sparse_attention.py) applies to every
head the union of the fixed scheme's two patterns (two different heads in the paper): query i
sees the keys of its own block (i // b == j // b) and every query sees the summary columns, the
first and the last c positions of every block (j mod b == 0 or j mod b >= b - c; the paper has
only the last c). LRA trains it with b = 50 and c = 10 (`get_model` in utils/train_utils.py). As
its `use_cls_token`, `prefix_tokens` (1 with `model.pooling=cls`) builds the pattern on the
tokens after the CLS token, which sees every key and is seen by every query.

The LRA code intersects every pattern with a causal mask, in its encoders too, so its published
numbers are causal: `causal=true` gives that; the default is bidirectional. A key is scored once
per query (own-block summary columns are not counted again); c = block_size - 1, or a block of n
tokens or more, is softmax. Computed in float32 with autocast off; no dropout on the
probabilities (LRA's has it). Scores are [B, H, n, b + p + S] with S ~ (c + 1) n / b summary
keys: the pattern's own size (O(n sqrt n) for b ~ sqrt n), nothing n x n.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


def summary_columns(length: int, block_size: int, summary_size: int) -> torch.Tensor:
    """Positions j < length with j mod b == 0 or j mod b >= b - c (LRA's Fixed2Pattern)."""
    j = torch.arange(length)
    r = j % block_size
    return j[(r == 0) | (r >= block_size - summary_size)]


@register("sparse_trans")
class SparseTransformerAttention(nn.Module):
    def __init__(
        self,
        block_size: int = 50,
        summary_size: int = 10,
        causal: bool = False,
        prefix_tokens: int = 0,
    ):
        super().__init__()
        check_at_least(1, block_size=block_size)
        check_at_least(0, prefix_tokens=prefix_tokens)
        if not 0 <= summary_size < block_size:
            raise ValueError(
                f"summary_size (the paper's c) must be in [0, block_size), got {summary_size} "
                f"with block_size={block_size}"
            )
        self.block_size = block_size
        self.summary_size = summary_size
        self.causal = causal
        self.prefix_tokens = prefix_tokens

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        p = min(self.prefix_tokens, n)  # global tokens ahead of the pattern (CLS)
        m = n - p  # tokens under the fixed pattern
        b = self.block_size
        nb = math.ceil(m / b)
        lowest = torch.finfo(compute).min
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = (t.to(compute) for t in (q, k, v))
            q = q / math.sqrt(d)
            parts = []
            if p > 0:  # prefix queries see every key
                logits = q[:, :, :p] @ k.transpose(-1, -2)
                logits = logits.masked_fill(~keep[:, None, None, :], lowest)
                parts.append(torch.softmax(logits, dim=-1) @ v)
            if m > 0:
                parts.append(self._pattern(q, k, v, keep, p, nb, lowest))
            out = torch.cat(parts, dim=2)
        return zero_padded_queries(out, mask).to(in_dtype)

    def _pattern(self, q, k, v, keep, p, nb, lowest):
        """Rows p.. : own block plus summary columns plus the prefix keys, one softmax."""
        B, H, n, d = q.shape
        m, b = n - p, self.block_size
        pad = nb * b - m
        q_s, k_s, v_s = (F.pad(t[:, :, p:], (0, 0, 0, pad)) for t in (q, k, v))
        keep_s = F.pad(keep[:, p:], (0, pad))
        device = q.device

        # Block part: the b keys of the query's own block.
        q_b = q_s.view(B, H, nb, b, d)
        logits_block = q_b @ k_s.view(B, H, nb, b, d).transpose(-1, -2)  # [B, H, nb, b, b]
        allowed_block = keep_s.view(B, nb, 1, b)
        if self.causal:
            allowed_block = allowed_block & torch.ones(b, b, dtype=torch.bool, device=device).tril()
        logits_block = torch.where(allowed_block[:, None], logits_block, lowest)

        # Extra part: the prefix keys, then the summary columns outside the query's own block.
        cols = summary_columns(m, b, self.summary_size).to(device)
        k_x = torch.cat([k[:, :, :p], k_s[:, :, cols]], dim=2)  # [B, H, p + S, d]
        v_x = torch.cat([v[:, :, :p], v_s[:, :, cols]], dim=2)
        keep_x = torch.cat([keep[:, :p], keep_s[:, cols]], dim=1)  # [B, p + S]
        query_block = torch.arange(nb, device=device)[:, None]
        col_block = (cols // b)[None, :]
        outside = col_block < query_block if self.causal else col_block != query_block
        pattern_x = torch.cat([outside.new_ones(nb, p), outside], dim=1)  # [nb, p + S]
        allowed_x = pattern_x[None, :, None, :] & keep_x[:, None, None, :]  # [B, nb, 1, p + S]
        # One [nb b, p + S] matmul (a broadcast over the blocks would copy k_x per block).
        logits_x = (q_s @ k_x.transpose(-1, -2)).view(B, H, nb, b, -1)  # [B, H, nb, b, p + S]
        logits_x = torch.where(allowed_x[:, None], logits_x, lowest)

        # One softmax over both parts, without concatenating them: a shared max (the result does
        # not depend on it, hence detached), exponentials in place, and one normaliser.
        top = torch.maximum(logits_block.amax(-1, keepdim=True), logits_x.amax(-1, keepdim=True))
        top = top.detach()
        e_block, e_x = logits_block.sub_(top).exp_(), logits_x.sub_(top).exp_()
        den = e_block.sum(-1, keepdim=True) + e_x.sum(-1, keepdim=True)  # [B, H, nb, b, 1]
        out = (e_block @ v_s.view(B, H, nb, b, d)).view(B, H, nb * b, d)
        out = (out + e_x.view(B, H, nb * b, -1) @ v_x) / den.view(B, H, nb * b, 1)
        return out[:, :, :m]
