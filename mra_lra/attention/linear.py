"""Linear attention (Katharopoulos et al., ICML 2020): a kernel feature map in place of exp.

With phi(x) = elu(x) + 1 (positive, so the weights are a proper average):

    out_i = phi(q_i) . sum_j phi(k_j) v_j^T  /  phi(q_i) . sum_j phi(k_j)

Both sums over keys are computed once ([d, d] and [d]), so the cost is O(n d^2) and nothing
n x n is formed. Padded keys have phi(k_j) set to zero, so they carry no weight; padded queries
output zero. There is no 1 / sqrt(d) scale: the feature map replaces exp(q . k / sqrt(d)) as a whole
(as in the paper). EPS keeps a query whose sequence has no real key at zero output instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries

EPS = 1e-6


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


@register("linear")
class LinearAttention(nn.Module):
    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        phi_q = elu_feature_map(q.to(compute))
        phi_k = elu_feature_map(k.to(compute))
        v = v.to(compute)
        if mask is not None:
            phi_k = phi_k * mask[:, None, :, None].to(compute)
        kv = torch.einsum("bhjd,bhje->bhde", phi_k, v)  # sum_j phi(k_j) v_j^T
        k_sum = phi_k.sum(dim=2)  # sum_j phi(k_j)
        num = torch.einsum("bhid,bhde->bhie", phi_q, kv)
        den = torch.einsum("bhid,bhd->bhi", phi_q, k_sum)
        out = num / (den[..., None] + EPS)
        return zero_padded_queries(out, mask).to(in_dtype)
