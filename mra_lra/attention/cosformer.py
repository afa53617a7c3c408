"""cosFormer (Qin et al., ICLR 2022): ReLU features with a cos re-weighting of distance.

Queries and keys go through ReLU (non-negative, so the weights are an average) and each pair is
re-weighted by how far apart the two tokens are, with M the sequence length:

    w_ij = relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M)
    out_i = sum_j w_ij v_j / max(sum_j w_ij, eps)

cos(a - b) = cos a cos b + sin a sin b splits the weight into two linear-attention terms, on
features relu(x_i) cos(theta_i) and relu(x_i) sin(theta_i) with theta_i = pi/2 i / M, so the cost
is O(n d^2) and nothing n x n is formed (the paper's non-causal form; nearby tokens weigh more).

Conventions (as the published code, where not said otherwise):
- Positions i run 1..n and M = n, the input's length with padding: the published code takes M
  from the padded batch too. Our LRA inputs are always padded to `data.max_length`, so M is that.
- No 1 / sqrt(d) scale: a scale on q cancels between numerator and denominator.
- Padded keys have zero features, so they carry no weight; padded queries output zero. A row
  whose features are all zero (every relu(q_i) . relu(k_j) = 0) outputs zero (eps = 1e-6 as
  published) instead of NaN.
- Computed in at least float32 under autocast (the sums over n run in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries

EPS = 1e-6


def cos_features(x: torch.Tensor) -> torch.Tensor:
    """[B, H, n, d] -> [B, H, n, 2d]: relu(x_i) cos(theta_i) and relu(x_i) sin(theta_i), with
    theta_i = pi/2 i / n for i = 1..n, so that feature dot products give the cos re-weighting."""
    n = x.shape[-2]
    theta = torch.arange(1, n + 1, device=x.device, dtype=x.dtype) * (math.pi / 2 / n)
    x = F.relu(x)
    return torch.cat([x * theta.cos()[:, None], x * theta.sin()[:, None]], dim=-1)


@register("cosformer")
class CosFormerAttention(nn.Module):
    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            phi_q = cos_features(q.to(compute))
            phi_k = cos_features(k.to(compute))
            if mask is not None:
                phi_k = phi_k * mask[:, None, :, None].to(compute)
            kv = torch.einsum("bhjf,bhje->bhfe", phi_k, v.to(compute))
            den = torch.einsum("bhif,bhf->bhi", phi_q, phi_k.sum(dim=2))
            out = torch.einsum("bhif,bhfe->bhie", phi_q, kv) / den.clamp(min=EPS)[..., None]
        return zero_padded_queries(out, mask).to(in_dtype)
