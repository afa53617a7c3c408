"""YOSO (Zeng et al., ICML 2021): Bernoulli sampling attention through LSH, in plain torch.

On the unit sphere, a hash of tau random hyperplanes (tau = hash_code_len) puts q_i and k_j in
one bucket with probability E[B_ij] = (1 - arccos(q_i . k_j) / pi)^tau, the softmax weight's
stand-in. With m = num_hashes hashes h:

    Y_i = 1/m sum_h sum_j [h(q_i) = h(k_j)] v_j     (sampled, O(m n d); expectation: E[B] v)
    out_i = Y_i / |Y_i|                              (no softmax normaliser, as YOSO's LRA code)

Per hash, values are summed into buckets by key code and read back by query code; where 2^tau >
2n the codes are first renumbered to [0, 2n). Hyperplanes are drawn afresh at every call from
torch's global RNG, as in the published code. Backward (YOSO's): q and k get the gradient of the
expectation form with the paper's lower-variance (tau / 2) E[B] k for d/dq E[B] (the exact one
blows up at q . k = +-1):

    dq_i = tau/2 sum_j E[B_ij] (g_i . v_j) k_j,   dk_j = tau/2 sum_i E[B_ij] (g_i . v_j) q_i

which the sampled form estimates with the forward's own collisions (per-bucket outer products,
O(m n d^2)); dv is the exact gradient of the forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import zero_padded_queries

# Elements of the outer products v_j k_j^T per pass of the sampled backward (bucket tables
# [G, buckets, <= OUTER_CHUNK]): on an H200, 512 was 1.8x faster than 128 for 2.7 GB peak.
OUTER_CHUNK = 512


def hash_codes(x: torch.Tensor, planes: torch.Tensor, hash_code_len: int) -> torch.Tensor:
    """[G, n, d] x [G, d, m * tau] -> bucket codes [G, n, m] in [0, 2^tau).

    The projections are signed in at least float32, even under autocast: half precision flips the
    sign of near-zero projections and so moves tokens across buckets (as in reformer.py).
    """
    G, n, _ = x.shape
    compute = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        projections = x.to(compute) @ planes.to(compute)
    bits = (projections > 0).view(G, n, -1, hash_code_len).long()
    return (bits << torch.arange(hash_code_len, device=x.device)).sum(dim=-1)


def compact_codes(
    codes_q: torch.Tensor, codes_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Renumber the codes of each hash to [0, n_q + n_k), keeping which ones are equal.

    codes_q [G, n_q, m], codes_k [G, n_k, m] -> the same, and the number of buckets. Used when
    2^tau is larger than n_q + n_k, so that the bucket tables scale with n and not with 2^tau.
    """
    n_q = codes_q.shape[1]
    both = torch.cat([codes_q, codes_k], dim=1)
    ordered, order = both.sort(dim=1)
    starts = F.pad((ordered.diff(dim=1) != 0).long(), (0, 0, 1, 0))  # 1 where a new code begins
    ids = torch.empty_like(ordered).scatter_(1, order, starts.cumsum(dim=1))
    return ids[:, :n_q], ids[:, n_q:], both.shape[1]


def _collisions(codes_out, codes_in, values, num_buckets: int) -> torch.Tensor:
    """r_i = sum_j [codes_out(i) = codes_in(j)] values_j for one hash: [G, n] codes, values
    [G, n, c] -> [G, n, c]. The values are summed into a flat [G * num_buckets, c] table by
    codes_in and read back by codes_out (faster than batched scatter / gather)."""
    G, _, c = values.shape
    offsets = torch.arange(G, device=values.device)[:, None] * num_buckets
    table = values.new_zeros(G * num_buckets, c)
    table.index_add_(0, (codes_in + offsets).reshape(-1), values.reshape(-1, c))
    return table.index_select(0, (codes_out + offsets).reshape(-1)).view(G, -1, c)


def _weighted_collisions(codes_out, g, codes_in, a, b, num_buckets: int) -> torch.Tensor:
    """r_i = sum_j [codes_out(i) = codes_in(j)] (g_i . a_j) b_j for one hash, without forming the
    collision matrix: bucket sums of the outer products a_j b_j^T, a few channels of a at a time.

    codes_out [G, n], g [G, n, c]; codes_in [G, n], a [G, n, c], b [G, n, d] -> [G, n, d].
    """
    G, _, d = b.shape
    out = b.new_zeros(G, codes_out.shape[1], d)
    step = max(1, OUTER_CHUNK // d)
    for lo in range(0, a.shape[-1], step):
        a_part, g_part = a[..., lo : lo + step], g[..., lo : lo + step]
        outer = (a_part[..., :, None] * b[..., None, :]).flatten(2)  # [G, n, c * d]
        table = _collisions(codes_out, codes_in, outer, num_buckets)
        out = out + torch.einsum("gic,gicd->gid", g_part, table.view(G, -1, a_part.shape[-1], d))
    return out


class LSHCumulation(torch.autograd.Function):
    """Y = 1/m sum_h B_h v (keys and queries masked) with YOSO's sampled backward: unit q, k and
    v [G, n, d], keep [G, n] float -> [G, n, d]."""

    @staticmethod
    def forward(ctx, q, k, v, keep, num_hashes: int, hash_code_len: int):
        G, n, d = q.shape
        num_buckets = 2**hash_code_len
        planes = torch.randn(G, d, num_hashes * hash_code_len, device=q.device, dtype=q.dtype)
        codes_q = hash_codes(q, planes, hash_code_len)
        codes_k = hash_codes(k, planes, hash_code_len)
        if num_buckets > 2 * n:
            codes_q, codes_k, num_buckets = compact_codes(codes_q, codes_k)
        v_kept = v * keep[..., None]
        out = torch.zeros_like(v)
        for h in range(num_hashes):
            out = out + _collisions(codes_q[..., h], codes_k[..., h], v_kept, num_buckets)
        ctx.save_for_backward(q, k, v, keep, codes_q, codes_k)
        ctx.hash_code_len = hash_code_len
        ctx.num_buckets = num_buckets
        return out * keep[..., None] / num_hashes

    @staticmethod
    def backward(ctx, grad):
        q, k, v, keep, codes_q, codes_k = ctx.saved_tensors
        tau, num_buckets = ctx.hash_code_len, ctx.num_buckets
        num_hashes = codes_q.shape[-1]
        g = grad * keep[..., None]
        qk, kk = q * keep[..., None], k * keep[..., None]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for h in range(num_hashes):
            cq, ck = codes_q[..., h], codes_k[..., h]
            dv = dv + _collisions(ck, cq, g, num_buckets)
            dq = dq + _weighted_collisions(cq, g, ck, v, kk, num_buckets)
            dk = dk + _weighted_collisions(ck, v, cq, g, qk, num_buckets)
        scale = tau / 2 / num_hashes
        dv = dv * keep[..., None] / num_hashes
        return dq * scale, dk * scale * keep[..., None], dv, None, None, None


def collision_probability(q: torch.Tensor, k: torch.Tensor, hash_code_len: int) -> torch.Tensor:
    """E[B] = (1 - arccos(q . k) / pi)^tau for unit q [G, n, d], k [G, n, d] -> [G, n, n]."""
    cos = (q @ k.transpose(-1, -2)).clamp(-1.0, 1.0)
    return (1 - torch.arccos(cos) / math.pi) ** hash_code_len


class ExpectationCumulation(torch.autograd.Function):
    """Y = E[B] v (keys and queries masked), with the backward the sampled form estimates: unit
    q, k and v [G, n, d], keep [G, n] float -> [G, n, d]."""

    @staticmethod
    def forward(ctx, q, k, v, keep, hash_code_len: int):
        weights = collision_probability(q, k, hash_code_len)
        weights = weights * keep[:, :, None] * keep[:, None, :]
        ctx.save_for_backward(q, k, v, weights)
        ctx.hash_code_len = hash_code_len
        return weights @ v

    @staticmethod
    def backward(ctx, grad):
        q, k, v, weights = ctx.saved_tensors
        weighted = (grad @ v.transpose(-1, -2)) * weights  # E[B_ij] (g_i . v_j)
        half_tau = ctx.hash_code_len / 2
        dq = half_tau * weighted @ k
        dk = half_tau * weighted.transpose(-1, -2) @ q
        dv = weights.transpose(-1, -2) @ grad
        return dq, dk, dv, None, None


lsh_cumulation = LSHCumulation.apply
expectation_cumulation = ExpectationCumulation.apply


@register("yoso")
class YOSOAttention(nn.Module):
    def __init__(self, num_hashes: int = 16, hash_code_len: int = 10, expectation: bool = False):
        super().__init__()
        check_at_least(1, num_hashes=num_hashes)
        if not 1 <= hash_code_len <= 20:
            raise ValueError(
                f"hash_code_len must be in [1, 20] (2^hash_code_len buckets), got {hash_code_len}"
            )
        self.num_hashes = num_hashes
        self.hash_code_len = hash_code_len
        self.expectation = expectation

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        keep = q.new_ones(B, n, dtype=compute) if mask is None else mask.to(compute)
        keep = keep[:, None].expand(B, H, n).reshape(B * H, n)
        q, k, v = (t.to(compute).reshape(B * H, n, d) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.expectation:
            y = expectation_cumulation(q, k, v, keep, self.hash_code_len)
        else:
            y = lsh_cumulation(q, k, v, keep, self.num_hashes, self.hash_code_len)
        out = F.normalize(y, dim=-1).view(B, H, n, d)
        return zero_padded_queries(out, mask).to(in_dtype)
