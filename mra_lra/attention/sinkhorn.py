"""Sparse Sinkhorn attention (Tay et al., ICML 2020), with the LRA code's settings.

n is cut into blocks of `block_size` (K_l, V_l: block l's keys and values). A sorting network
scores from each block's key sum which blocks to bring next to it, and mixes them softly:

    P[n, :] = softmax_l(s_n . W[:, l] / temperature)   (s_n: sum of block n's real keys)
    K~_n = sum_l P[n, l] K_l,   V~_n = sum_l P[n, l] V_l
    out_i = softmax(q_i K_n^T / sqrt(d)) V_n + softmax(q_i K~_n^T / sqrt(d)) V~_n   (x + sorted_x)

O(n b d + n nb d). Settings from google-research/long-range-arena (models/sinkhorn_transformer/):
block_size 50 (ListOps, Text, Retrieval; CIFAR-10 and Pathfinder set 64); sort_activation softmax,
which every LRA run uses (`sinkhorn` runs `sinkhorn_iterations` log-space row-then-column
normalisations, as its sinkhorn_operator); soft sorting also in evaluation, no Gumbel noise; W
[head_dim, blocks] shared by the heads, no bias, Xavier-uniform.

Departures: LRA's mix einsum names the block index and P's column differently, so every block
attends to the sum of all key blocks and the sorting network gets no gradient; we mix by P, as the
paper. LRA's blocks are strided (its reshape) under a contiguous padding mask; ours are
contiguous. W has one column per block of max_length (LRA: a fixed 25); n > max_length is an
error. No clip of the Sinkhorn log-values to [-1, 1]; temperature also divides the softmax
sort's scores. No attention dropout (LRA: 0.1). Blocks without a real token take no part in the
sort, and slot s of a sorted block is masked when no real token enters it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, check_length, register
from mra_lra.attention.softmax import zero_padded_queries

SORT_ACTIVATIONS = ("softmax", "sinkhorn")


@register("sinkhorn")
class SinkhornAttention(nn.Module):
    def __init__(
        self,
        head_dim: int | None = None,
        max_length: int | None = None,
        block_size: int = 50,
        sort_activation: str = "softmax",
        sinkhorn_iterations: int = 1,
        temperature: float = 1.0,
    ):
        super().__init__()
        check_at_least(1, max_length=max_length, head_dim=head_dim, block_size=block_size)
        if sort_activation not in SORT_ACTIVATIONS:
            raise ValueError(
                f"sort_activation must be one of {SORT_ACTIVATIONS}, got {sort_activation!r}"
            )
        check_at_least(1, sinkhorn_iterations=sinkhorn_iterations)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.max_length = max_length
        self.block_size = block_size
        self.sort_activation = sort_activation
        self.sinkhorn_iterations = sinkhorn_iterations
        self.temperature = float(temperature)
        self.sort_net = nn.Parameter(torch.empty(head_dim, math.ceil(max_length / block_size)))
        nn.init.xavier_uniform_(self.sort_net)

    def permutation(self, scores: torch.Tensor, real_blocks: torch.Tensor) -> torch.Tensor:
        """Scores [B, H, nb, nb] (row n: block n's score for each block l) and real_blocks
        [B, nb] (True where a block holds a real token) -> the soft permutation P [B, H, nb, nb],
        zero in the rows and columns of blocks without real tokens."""
        valid = (real_blocks[:, :, None] & real_blocks[:, None, :])[:, None]
        lowest = torch.finfo(scores.dtype).min
        x = (scores / self.temperature).masked_fill(~valid, lowest)
        if self.sort_activation == "softmax":
            p = torch.softmax(x, dim=-1)
        else:
            # Masked entries stay at `lowest` (exp gives 0); a slice with no valid entry gives
            # finite garbage that the next masked_fill resets, so nothing is NaN.
            for _ in range(self.sinkhorn_iterations):
                x = (x - x.logsumexp(dim=-1, keepdim=True)).masked_fill(~valid, lowest)
                x = (x - x.logsumexp(dim=-2, keepdim=True)).masked_fill(~valid, lowest)
            p = x.exp()
        return p * valid

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        check_length(n, self.max_length)
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        b = self.block_size
        nb = math.ceil(n / b)
        pad = nb * b - n
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        keep = F.pad(keep, (0, pad))
        lowest = torch.finfo(compute).min
        with torch.autocast(q.device.type, enabled=False):
            weight = keep[:, None, :, None].to(compute)
            q, k, v = (F.pad(t.to(compute), (0, 0, 0, pad)) for t in (q, k, v))
            q_blocks = (q / math.sqrt(d)).view(B, H, nb, b, d)
            k_blocks = (k * weight).view(B, H, nb, b, d)
            v_blocks = (v * weight).view(B, H, nb, b, d)
            keep_blocks = keep.view(B, nb, b)

            scores = k_blocks.sum(dim=3) @ self.sort_net[:, :nb].to(compute)  # [B, H, nb, nb]
            p = self.permutation(scores, keep_blocks.any(dim=-1))
            k_sorted = torch.einsum("bhnl,bhlsd->bhnsd", p, k_blocks)
            v_sorted = torch.einsum("bhnl,bhlsd->bhnsd", p, v_blocks)
            # Slot s of sorted block n is real when a real token enters it with weight > 0.
            slot_is_real = torch.einsum("bhnl,bls->bhns", p, keep_blocks.to(compute)) > 0

            local = q_blocks @ k_blocks.transpose(-1, -2)  # [B, H, nb, b, b]
            local = local.masked_fill(~keep_blocks[:, None, :, None, :], lowest)
            mixed = q_blocks @ k_sorted.transpose(-1, -2)
            mixed = mixed.masked_fill(~slot_is_real[:, :, :, None, :], lowest)
            out = torch.softmax(local, dim=-1) @ v_blocks + torch.softmax(mixed, dim=-1) @ v_sorted
            out = out.reshape(B, H, nb * b, d)[:, :, :n]
        return zero_padded_queries(out, mask).to(in_dtype)
