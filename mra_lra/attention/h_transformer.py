"""H-Transformer-1D (Zhu & Soricut, ACL 2021): hierarchical attention in O(n b d).

n is padded to nb = 2^L blocks of b tokens. For query i in block I and key j in block J:

    I == J or J == I xor 1 (diagonal and sibling blocks):   L_ij = q_i . k_j / sqrt(d)
    otherwise, at level l = highest set bit of (I xor J):    L_ij = qbar . kbar / sqrt(d)

with qbar (kbar) the mean of q (k) over the 2^l tokens of i's (j's) level-l coarse token, and
out_i = sum_j exp(L_ij) v_j / sum_j exp(L_ij) over real keys. The levels tile the n x n matrix
once; block_size >= n gives exact softmax. The sibling (binary-tree) pattern is lucidrains'
h-transformer-1d, which the paper's LRA numbers are usually reproduced with (the paper's Figure
2 is tridiagonal). Departures from it: a coarse key counts once per real token it holds (weight
c exp(L), mean value), means are over real tokens only, and all levels share one stabiliser.

`top_level` false leaves out the coarsest level (the two halves of the sequence then never see
each other), as the MRA authors' copy (mlpen/mra-attention ImageNet/encoders/htransformer1d.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import zero_padded_queries


def _siblings(x: torch.Tensor) -> torch.Tensor:
    """Swap blocks 2c and 2c + 1 along axis 2."""
    return x.unflatten(2, (-1, 2)).flip(3).flatten(2, 3)


def _pair_sum(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum neighbouring pairs along `axis` (halving it)."""
    return x.unflatten(axis, (-1, 2)).sum(dim=axis + 1)


def _attend_level(q, k, v, counts, block_size: int, finest: bool, siblings: bool):
    """One level: each block of `block_size` (coarse) tokens attends to its sibling block (unless
    `siblings` is false), and at the finest level also to itself.

    q, k, v: [B, H, m, d] (k already scaled, v the mean over the tokens a coarse token holds);
    counts: [B, m] real tokens per coarse token. Returns the unnormalised output [B, H, m, d], the
    normaliser [B, H, m] and the row maxima [B, H, m] they are shifted by.
    """
    B, H, m, d = q.shape
    nb = m // block_size
    qb, kb, vb = (t.view(B, H, nb, block_size, d) for t in (q, k, v))
    log_c = counts.log().view(B, 1, nb, block_size).expand(B, H, nb, block_size)
    keys, values, log_w = ([kb], [vb], [log_c]) if finest else ([], [], [])
    if siblings and nb > 1:
        keys.append(_siblings(kb))
        values.append(_siblings(vb))
        log_w.append(_siblings(log_c))
    keys, values, log_w = (torch.cat(t, dim=3) for t in (keys, values, log_w))
    # log(count) makes a coarse key count once per real token (and a padded one not at all).
    logits = qb @ keys.transpose(-1, -2) + log_w[:, :, :, None, :]
    row_max = logits.detach().amax(dim=-1)
    row_max = row_max.masked_fill(row_max == float("-inf"), torch.finfo(row_max.dtype).min)
    weights = torch.exp(logits - row_max[..., None])
    num = weights @ values
    return num.view(B, H, m, d), weights.sum(dim=-1).view(B, H, m), row_max.view(B, H, m)


@register("h_transformer")
class HTransformer1DAttention(nn.Module):
    def __init__(self, block_size: int = 16, top_level: bool = True):
        super().__init__()
        check_at_least(1, block_size=block_size)
        if not isinstance(top_level, bool):
            raise ValueError(f"top_level must be true or false, got {top_level!r}")
        self.block_size = block_size
        self.top_level = top_level

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        b = self.block_size
        pad = 2 ** math.ceil(math.log2(math.ceil(n / b))) * b - n  # up to 2^L blocks
        keep = q.new_ones(B, n, dtype=compute) if mask is None else mask.to(compute)
        keep = F.pad(keep, (0, pad))
        q, k, v = (F.pad(t.to(compute), (0, 0, 0, pad)) * keep[:, None, :, None] for t in (q, k, v))
        k = k / math.sqrt(d)

        # Level l works on coarse tokens of 2^l fine tokens; keep sums and real-token counts so that
        # every coarse q, k, v is a mean over real tokens only.
        sums, counts = (q, k, v), keep
        levels = []
        span = 1
        while True:
            top = counts.shape[-1] // b <= 2  # 2 blocks (1 only if the whole is one block)
            siblings = self.top_level or not top
            if siblings or span == 1:  # the finest level keeps its diagonal blocks either way
                denom = counts.clamp(min=1)[:, None, :, None]
                qm, km, vm = (s / denom for s in sums)
                level = _attend_level(qm, km, vm, counts, b, span == 1, siblings)
                levels.append((span, *level))
            if top:
                break
            sums = tuple(_pair_sum(s, axis=2) for s in sums)
            counts = _pair_sum(counts, axis=1)
            span *= 2

        # Merge the levels on one stabiliser per fine query: the largest of their row maxima.
        def fine(x: torch.Tensor, span: int) -> torch.Tensor:
            return x.repeat_interleave(span, dim=2) if span > 1 else x

        top = torch.stack([fine(row_max, s) for s, _, _, row_max in levels]).amax(dim=0)
        num, den = torch.zeros_like(v), torch.zeros_like(top)
        for s, num_l, den_l, row_max in levels:
            scale = torch.exp(fine(row_max, s) - top)
            num = num + fine(num_l, s) * scale[..., None]
            den = den + fine(den_l, s) * scale
        out = num / torch.where(den > 0, den, 1.0)[..., None]
        return zero_padded_queries(out[:, :, :n], mask).to(in_dtype)
