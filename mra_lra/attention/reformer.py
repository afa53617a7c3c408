"""Reformer LSH attention (Kitaev et al., ICLR 2020): shared query-key, hashed into buckets.

Shared QK: the keys are the queries, normalised to unit length (k_j = q_j / |q_j|), and the score
is s_ij = q_i . k_j, unscaled, as in the paper's code; the `k` argument is not used (its
projection in the encoder gets no gradient). Per hash round:

1. angular LSH: bucket(x) = argmax([x R, -x R]) with R [d, num_buckets / 2] Gaussian, drawn anew
   on every call from torch's global RNG (as Reformer does; seed it for reproducible outputs);
2. sort the tokens by (bucket, position) and cut the sorted order into chunks of chunk_size;
3. each chunk attends to itself and to the chunk before it (wrapping around), which is where the
   rest of a bucket that straddles a chunk boundary lies. Keys of other buckets in those two
   chunks are not masked (as in the Hugging Face port).

A token does not attend to itself unless it sees no other real key (score -1e5 instead of s_ii;
padded keys get -1e9). The rounds are merged by their softmax normalisers:
out_i = sum_r exp(lse_r(i) - logsumexp_r lse_r(i)) out_r(i), so a pair met in several rounds
counts several times (no de-duplication, as in the Hugging Face port).

Padding (and the tokens added to reach a multiple of chunk_size) sorts after every real token in
its own bucket, so it never moves a real token between chunks. Cost O(num_hashes n chunk_size d).
With num_buckets = 1 and chunk_size >= n it is softmax over the shared-QK scores.

Defaults (conf/attn/reformer.yaml): chunk_size 64, the Hugging Face ReformerConfig default
(lsh_attn_chunk_length 64, one chunk before, none after; transformers 3.3.1, the version the
Nystromformer LRA code names) that the MRA and Nystromformer Reformer wrappers run, since they
set only heads, sizes and num_hashes: each query scores 2 * 64 keys. num_buckets null means
2 * ceil(n / chunk_size) (the paper's choice: buckets of chunk_size / 2 tokens on average).
Hugging Face's rule (num_buckets None) differs: the largest power of two <= 2 * floor(n /
chunk_size), split into two factors hashed separately (same product) once it exceeds
2 * max(floor(sqrt(max_length / chunk_size)), chunk_size) (128 at chunk 64), and fixed at the
first call's n. The counts agree when n is a power-of-two multiple of chunk_size (n = 1024,
2048, 4096, 16384 -> 32, 64, 128, 512 buckets at chunk 64; Hugging Face factors 512 as 16 x 32)
and differ otherwise: n = 2000 gives 64 here and 32 there, n = 1025 (a CLS token on 1024) 34 and
32. Set num_buckets to pin a count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries

SELF_SCORE = -1e5  # a token's score for itself: it wins only over padding
PAD_SCORE = -1e9  # padded keys


def _look_back(x: torch.Tensor) -> torch.Tensor:
    """[..., nc, c, *rest] -> [..., nc, 2c, *rest]: each chunk followed by the chunk before it."""
    return torch.cat([x, x.roll(1, dims=3)], dim=4)


@register("reformer")
class ReformerAttention(nn.Module):
    def __init__(self, num_hashes: int = 2, chunk_size: int = 64, num_buckets: int | None = None):
        super().__init__()
        if num_hashes < 1:
            raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if num_buckets is not None and (num_buckets < 1 or (num_buckets > 1 and num_buckets % 2)):
            raise ValueError(
                f"num_buckets must be 1, an even number (angular LSH uses +-rotations) or null "
                f"(2 n / chunk_size), got {num_buckets}"
            )
        self.num_hashes = num_hashes
        self.chunk_size = chunk_size
        self.num_buckets = num_buckets

    def buckets_for(self, n: int) -> int:
        if self.num_buckets is not None:
            return self.num_buckets
        return 2 * math.ceil(n / self.chunk_size)

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        R, c = self.num_hashes, self.chunk_size
        nc = math.ceil(n / c)
        extra = nc * c - n
        keep = F.pad(keep, (0, extra))
        q = F.pad(q.to(compute), (0, 0, 0, extra))
        v = F.pad(v.to(compute), (0, 0, 0, extra))
        keys = F.normalize(q, dim=-1, eps=1e-6)

        num_buckets = self.buckets_for(n)
        # Hash in `compute` even under autocast: half precision would move tokens across buckets.
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            if num_buckets == 1:
                buckets = torch.zeros(B, H, R, nc * c, dtype=torch.long, device=q.device)
            else:
                rotations = torch.randn(H, d, R, num_buckets // 2, device=q.device, dtype=compute)
                rotated = torch.einsum("bhnd,hdrk->bhrnk", keys, rotations)
                buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
            buckets = buckets.masked_fill(~keep[:, None, None, :], num_buckets)
            positions = torch.arange(nc * c, device=q.device)
            order = (buckets * (nc * c) + positions).argsort(dim=-1)  # [B, H, R, n_pad]
            undo = order.argsort(dim=-1)

        def sort(x: torch.Tensor) -> torch.Tensor:  # [B, H, n_pad, d] -> [B, H, R, nc, c, d]
            return torch.take_along_dim(x[:, :, None], order[..., None], dim=3).view(
                B, H, R, nc, c, -1
            )

        q_s, k_s, v_s = sort(q), sort(keys), sort(v)
        pos_s = order.view(B, H, R, nc, c)
        keep_s = torch.take_along_dim(keep[:, None, None, :], order, dim=3).view(B, H, R, nc, c)
        if nc > 1:  # with one chunk the chunk before is itself
            k_s, v_s, pos_k, keep_k = (_look_back(t) for t in (k_s, v_s, pos_s, keep_s))
        else:
            pos_k, keep_k = pos_s, keep_s

        # Under autocast the matmul returns half precision, too narrow for the -1e9 of padding.
        scores = (q_s @ k_s.transpose(-1, -2)).to(compute)  # [B, H, R, nc, c, c or 2c]
        scores = scores.masked_fill(pos_s[..., :, None] == pos_k[..., None, :], SELF_SCORE)
        scores = scores.masked_fill(~keep_k[..., None, :], PAD_SCORE)
        lse = scores.logsumexp(dim=-1)
        out = torch.exp(scores - lse[..., None]) @ v_s

        out = torch.take_along_dim(out.view(B, H, R, nc * c, d), undo[..., None], dim=3)
        lse = torch.take_along_dim(lse.view(B, H, R, nc * c), undo, dim=3)
        out = (torch.softmax(lse, dim=2)[..., None] * out).sum(dim=2)
        return zero_padded_queries(out[:, :, :n], mask).to(in_dtype)

    def extra_repr(self) -> str:
        return (
            f"num_hashes={self.num_hashes}, chunk_size={self.chunk_size}, "
            f"num_buckets={self.num_buckets or '2n/chunk_size'}"
        )
