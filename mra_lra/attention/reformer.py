"""Reformer LSH attention (Kitaev et al., ICLR 2020): shared query-key, hashed into buckets.

Keys are the queries normalised to unit length (the `k` argument is unused) and the score
q_i . k_j is unscaled, as in the paper's code. Per hash round: angular LSH, bucket(x) =
argmax([x R, -x R]) with R Gaussian, drawn anew at every call from torch's global RNG; sort by
(bucket, position); chunks of chunk_size attend to themselves and to the chunk before (wrapping
around), keys of other buckets unmasked, as the Hugging Face port. A token sees itself only when
no other real key is there (-1e5; padding -1e9, sorted after every real token of its bucket).
Rounds are merged by their softmax normalisers (no de-duplication). O(num_hashes n chunk_size d).

chunk_size 64 is Hugging Face's default (transformers 3.3.1), which the MRA and Nystromformer
wrappers run. num_buckets null means 2 ceil(n / chunk_size) (the paper's: chunk_size / 2 tokens
per bucket on average). Hugging Face's rule (a power of two fixed at the first call, factored
once large) agrees when n is a power-of-two multiple of chunk_size and differs otherwise (n =
2000: 64 here, 32 there); set num_buckets to pin a count. With num_buckets = 1 and chunk_size >=
n it is softmax over the shared-QK scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries

SELF_SCORE = -1e5  # a token's score for itself: it wins only over padding
PAD_SCORE = -1e9  # padded keys


def _look_back(x: torch.Tensor) -> torch.Tensor:
    """[..., nc, c, *rest] -> [..., nc, 2c, *rest]: each chunk followed by the chunk before it."""
    return torch.cat([x, x.roll(1, dims=3)], dim=4)


@register("reformer")
class ReformerAttention(nn.Module):
    def __init__(self, num_hashes: int = 2, chunk_size: int = 64, num_buckets: int | None = None):
        super().__init__()
        check_at_least(1, num_hashes=num_hashes, chunk_size=chunk_size)
        if num_buckets is not None and (num_buckets < 1 or (num_buckets > 1 and num_buckets % 2)):
            raise ValueError(
                f"num_buckets must be 1, an even number (angular LSH uses +-rotations) or null "
                f"(2 n / chunk_size), got {num_buckets}"
            )
        self.num_hashes = num_hashes
        self.chunk_size = chunk_size
        self.num_buckets = num_buckets

    def buckets_for(self, n: int) -> int:
        return self.num_buckets or 2 * math.ceil(n / self.chunk_size)

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
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
