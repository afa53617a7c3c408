"""Sparse Sinkhorn attention (Tay et al., ICML 2020), with the LRA code's settings.

The sequence is cut into blocks of `block_size` tokens, K_l and V_l being the keys and values of
block l. A sorting network scores, from the sum of each block's keys, which blocks to bring next
to it, and each block gets a "sorted" block that is a soft mix of all blocks:

    s_n = sum of the real keys of block n                          [d]
    P[n, :] = softmax_l(s_n . W[:, l] / temperature)  over the blocks l holding a real token
    K~_n = sum_l P[n, l] K_l,   V~_n = sum_l P[n, l] V_l

A query i of block n attends to the keys of its own block and to those of the sorted block, in
two separate softmaxes whose outputs are added (the LRA code's `x + sorted_x`):

    out_i = softmax(q_i K_n^T / sqrt(d)) V_n + softmax(q_i K~_n^T / sqrt(d)) V~_n

Cost O(n b d) for the two block attentions and O(n nb d) for the mix (nb = n / b blocks).

Settings, from google-research/long-range-arena (lra_benchmarks/models/sinkhorn_transformer/):
- block_size 50: the default of SinkhornTransformerEncoder, which ListOps, Text and Retrieval
  use; the CIFAR-10 and Pathfinder configs set `model.block_size = 64`.
- sort_activation softmax: `SinkhornAttention` defaults to `sort_activation='softmax'` and the
  encoder never passes another, so the LRA runs sort with a softmax over each row, with no
  Sinkhorn iterations. `sinkhorn` runs `sinkhorn_iterations` rounds of log-space normalisation of
  the scores / temperature, rows (over l) then columns (over n), as LRA's `sinkhorn_operator`
  (whose defaults are 1 iteration, temperature 1).
- Soft sorting in training and evaluation alike: the LRA code has no hard permutation at
  evaluation and no Gumbel noise.
- W is [head_dim, number of blocks], shared by the heads, without bias, Xavier-uniform (LRA:
  `nn.DenseGeneral` with `bias=False` and the block's `xavier_uniform` kernel init).

Departures from the LRA code (each also a departure from what it computes):
- LRA's mix `einsum('bskhd,bnhl->bsnhd', block_key, permutation)` names the key-block index k
  and the permutation's column l differently, so it sums the keys over all blocks and each
  permutation row over its columns (1 for a softmax): every query block attends to the sum of all
  key blocks, and the sorting network gets no gradient. We mix the blocks by P, as the paper
  describes (its sorted mask, the same kind of einsum, is replaced by the rule below).
- LRA reshapes [n] into [block_size, num_blocks], so its blocks are strided (block k holds tokens
  k, k + nb, k + 2 nb, ...), while it cuts the padding mask into contiguous blocks. Our blocks
  are contiguous, the paper's layout and the one LRA's mask assumes.
- W has one column per block of max_length (ceil(max_length / block_size)); LRA's sort network
  has a fixed 25 (`max_num_blocks`), fewer than the 40 blocks of ListOps at 50, which its code
  only survives because of the einsum above. For n < max_length the first columns are used;
  n > max_length is an error.
- Without LRA's final clip of the log-values to [-1, 1] in `sinkhorn_operator` (it leaves every
  entry between 1/e and e, no longer a normalised matrix); `temperature` also divides the
  scores of the softmax sort (LRA: only Sinkhorn's; the default 1 makes them agree).
- No attention dropout (LRA: 0.1 on both softmaxes); our other attentions take none either.
- Padding: padded keys and values are zeroed before the block sums and the mix; blocks with no
  real token take no part in the sort (their rows and columns of P are 0); slot s of sorted
  block n is masked when no real token enters it (sum_l P[n, l] [slot s of block l is real] is
  0), so with a hard P the sorted block has exactly the real keys of the block P picks. n is
  padded up to whole blocks inside (LRA needs n to be a multiple of the block size). Padded
  queries output zero.
- Computed in at least float32 under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
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
        if head_dim is None or max_length is None or head_dim < 1 or max_length < 1:
            raise ValueError(
                f"sinkhorn needs head_dim >= 1 and max_length >= 1 (the encoder passes them in "
                f"`context`), got head_dim={head_dim}, max_length={max_length}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if sort_activation not in SORT_ACTIVATIONS:
            raise ValueError(
                f"sort_activation must be one of {SORT_ACTIVATIONS}, got {sort_activation!r}"
            )
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
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
        if n > self.max_length:
            raise ValueError(
                f"sinkhorn got sequence length {n} > max_length {self.max_length} "
                "(its sorting network has one output per block of max_length)"
            )
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

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, sort_activation={self.sort_activation}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, temperature={self.temperature}, "
            f"max_blocks={self.sort_net.shape[1]}"
        )
