"""H-Transformer-1D (Zhu & Soricut, ACL 2021): hierarchical attention in O(n b d).

The sequence is cut into nb = 2^L blocks of b tokens (n padded up to b * 2^L inside). For a query
i in block I and a key j in block J (s = 1 / sqrt(d)):

    I == J or J == I xor 1   (diagonal and sibling block, the finest level):  L_ij = s q_i . k_j
    otherwise, at the level l = highest set bit of (I xor J):                  L_ij = s qbar . kbar

where qbar (kbar) is the mean of q (k) over the 2^l tokens of the level-l coarse token that holds
i (j). Then out_i = sum_j exp(L_ij) v_j / sum_j exp(L_ij) over the real keys j. Level l sees the
sequence coarsened 2^l times (q and k averaged over pairs, v summed over pairs) and attends, for
each coarse block of b coarse tokens, to its sibling block only; the finest level also attends to
the block itself. The levels tile the n x n matrix exactly once, so the normaliser needs no
correction, and each level costs O(n_l b d) with n_l = n / 2^l: O(n b d) in all.

Conventions (where they differ from the paper or the public re-implementation, this is said):
- The block pattern is the sibling (binary-tree) partition of lucidrains' h-transformer-1d, which
  the paper's LRA numbers are usually reproduced with; the paper's Figure 2 draws a tridiagonal
  pattern at every level instead (neighbours that are not siblings are also refined).
- A coarse key stands for its c real tokens: it gets weight c exp(L) and carries their mean value
  (the re-implementation counts a coarse key once in the normaliser while summing its values).
- Means are over real tokens only, so padding never leaks into a coarse token, and all levels share
  one per-query stabiliser (their row maxima are merged as in a log-sum-exp), where the
  re-implementation adds levels that were each shifted by their own maximum.
With block_size >= n there is one block and the output is exact softmax attention.

Top level (`top_level`, conf/attn/h_transformer.yaml default true): the hierarchy above runs up to
the level with two coarse blocks, whose sibling pair joins the first half of the sequence to the
second, so every block pair (I, J) is covered, as in the paper's hierarchy. With top_level false
that coarsest level is left out, as in the MRA authors' code base (mlpen/mra-attention
ImageNet/encoders/htransformer1d.py: log2(nb) - 2 coarsening steps, so its coarsest level has
four blocks): pairs with I xor J >= nb / 2 get no weight and no query in the first half sees a key
in the second (nor across layers). When the finest level is the top one (nb = 2) only the diagonal
blocks remain; the MRA copy refuses such short inputs (n <= 2 b). (Upstream lucidrains'
h-transformer-1d, commit 4e94794, keeps the top level but leaves out the finest level's sibling
blocks instead; neither option reproduces that.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries


def _siblings(x: torch.Tensor) -> torch.Tensor:
    """Swap blocks 2c and 2c + 1 along axis 2 (blocks are the axis-2 entries)."""
    shape = x.shape
    return x.reshape(shape[0], shape[1], shape[2] // 2, 2, *shape[3:]).flip(3).reshape(shape)


def _attend_level(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    block_size: int,
    finest: bool,
    siblings: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level: each block of `block_size` (coarse) tokens attends to its sibling block (unless
    `siblings` is false), and at the finest level also to itself.

    q, k, v: [B, H, m, d] (k already scaled, v the mean over the tokens a coarse token holds);
    counts: [B, m] real tokens per coarse token. Returns the unnormalised output [B, H, m, d], the
    normaliser [B, H, m] and the row maxima [B, H, m] they are shifted by.
    """
    B, H, m, d = q.shape
    nb = m // block_size
    qb = q.view(B, H, nb, block_size, d)
    kb = k.view(B, H, nb, block_size, d)
    vb = v.view(B, H, nb, block_size, d)
    log_c = counts.log().view(B, 1, nb, block_size).expand(B, H, nb, block_size)
    keys, values, log_w = [], [], []
    if finest:
        keys, values, log_w = [kb], [vb], [log_c]
    if siblings and nb > 1:
        keys.append(_siblings(kb))
        values.append(_siblings(vb))
        log_w.append(_siblings(log_c))
    keys, values, log_w = (torch.cat(t, dim=3) for t in (keys, values, log_w))
    # log(count) makes a coarse key count once per real token (and a padded one not at all).
    logits = torch.matmul(qb, keys.transpose(-1, -2)) + log_w[:, :, :, None, :]
    row_max = logits.detach().amax(dim=-1)
    row_max = row_max.masked_fill(row_max == float("-inf"), torch.finfo(row_max.dtype).min)
    weights = torch.exp(logits - row_max[..., None])
    num = torch.matmul(weights, values)
    return num.view(B, H, m, d), weights.sum(dim=-1).view(B, H, m), row_max.view(B, H, m)


def _pair_sum(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum neighbouring pairs along `axis` (halving it)."""
    shape = list(x.shape)
    shape[axis : axis + 1] = [shape[axis] // 2, 2]
    return x.reshape(shape).sum(dim=axis + 1)


def h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    block_size: int,
    top_level: bool = True,
) -> torch.Tensor:
    """Hierarchical attention; q, k, v: [B, H, n, d], mask: [B, n] or None -> [B, H, n, d].

    top_level=False leaves out the sibling attention of the level with two blocks (the one that
    joins the two halves of the sequence)."""
    B, H, n, d = q.shape
    nb = 2 ** math.ceil(math.log2(math.ceil(n / block_size)))
    extra = nb * block_size - n
    keep = q.new_ones(B, n) if mask is None else mask.to(q.dtype)
    keep = F.pad(keep, (0, extra))
    w = keep[:, None, :, None]
    q, k, v = (F.pad(t, (0, 0, 0, extra)) * w for t in (q, k, v))
    k = k / math.sqrt(d)

    # Level l works on coarse tokens of 2^l fine tokens; keep sums and real-token counts so that
    # every coarse q, k, v is a mean over real tokens only.
    sums, counts = (q, k, v), keep
    levels = []
    span = 1
    while True:
        top = counts.shape[-1] // block_size <= 2  # 2 blocks (1 only if the whole is one block)
        siblings = top_level or not top
        if siblings or span == 1:  # the finest level keeps its diagonal blocks either way
            denom = counts.clamp(min=1)[:, None, :, None]
            qm, km, vm = (s / denom for s in sums)
            level = _attend_level(qm, km, vm, counts, block_size, span == 1, siblings)
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
    num = torch.zeros_like(v)
    den = torch.zeros_like(top)
    for s, num_l, den_l, row_max in levels:
        scale = torch.exp(fine(row_max, s) - top)
        num = num + fine(num_l, s) * scale[..., None]
        den = den + fine(den_l, s) * scale
    out = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return out[:, :, :n]


@register("h_transformer")
class HTransformer1DAttention(nn.Module):
    def __init__(self, block_size: int = 16, top_level: bool = True):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not isinstance(top_level, bool):
            raise ValueError(f"top_level must be true or false, got {top_level!r}")
        self.block_size = block_size
        self.top_level = top_level

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        out = h_attention(
            q.to(compute), k.to(compute), v.to(compute), mask, self.block_size, self.top_level
        )
        return zero_padded_queries(out, mask).to(in_dtype)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, top_level={self.top_level}"
