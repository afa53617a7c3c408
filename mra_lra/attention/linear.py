"""Linear attention (Katharopoulos et al., ICML 2020): a kernel feature map in place of exp.

    out_i = phi(q_i) . sum_j phi(k_j) v_j^T  /  phi(q_i) . sum_j phi(k_j),    phi(x) = elu(x) + 1

O(n d^2). No 1 / sqrt(d): phi replaces exp(q . k / sqrt(d)) as a whole, as in the paper. EPS keeps
a query whose sequence has no real key at zero output instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries

EPS = 1e-6


@register("linear")
class LinearAttention(nn.Module):
    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        phi_q = F.elu(q.to(compute)) + 1
        phi_k = F.elu(k.to(compute)) + 1
        if mask is not None:
            phi_k = phi_k * mask[:, None, :, None].to(compute)
        kv = torch.einsum("bhjd,bhje->bhde", phi_k, v.to(compute))
        num = torch.einsum("bhid,bhde->bhie", phi_q, kv)
        den = torch.einsum("bhid,bhd->bhi", phi_q, phi_k.sum(dim=2))
        out = num / (den[..., None] + EPS)
        return zero_padded_queries(out, mask).to(in_dtype)
