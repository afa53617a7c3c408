"""cosFormer (Qin et al., ICLR 2022): ReLU features with a cos re-weighting of distance.

    w_ij = relu(q_i) . relu(k_j) cos(pi/2 (i - j) / M)
    out_i = sum_j w_ij v_j / max(sum_j w_ij, eps)

cos(a - b) = cos a cos b + sin a sin b splits w into two linear-attention terms, so the cost is
O(n d^2) (the paper's non-causal form). As the published code: positions run 1..n and M = n, the
padded length (LRA inputs are padded to `data.max_length`); no 1 / sqrt(d) (it cancels); eps =
1e-6 keeps a row without weight at zero instead of NaN.
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
