"""Performer (Choromanski et al., ICLR 2021): FAVOR+ with positive orthogonal random features.

With x' = x / d^(1/4) (so q'.k' = q.k / sqrt d) and m random rows w_r of W [m, d]:

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),      E[phi(q) . phi(k)] = exp(q'.k')
    out_i  = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))

O(n m d). W: blocks of d orthonormal rows (Haar), each rescaled to a d-dim Gaussian's length,
drawn once at construction from torch's global RNG and saved with the checkpoint (the paper's
code can redraw it; this one never does). Each feature map is shifted by a max before the exp (a
constant that cancels in the ratio) and gets + 1e-4, as the published code, so no denominator is
zero. The MRA authors' LRA wrapper scales q and k by d^(-1/4) twice (its runs used exp(q.k / d))
and zeroes padded keys instead of dropping them; this module estimates exp(q.k / sqrt d).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries

FEATURE_EPS = 1e-4  # as lucidrains' and Google's FAVOR+ code


def orthogonal_gaussian(num_features: int, dim: int) -> torch.Tensor:
    """[num_features, dim]: stacked blocks of orthogonal rows, each with a chi(dim) length."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        qmat, rmat = torch.linalg.qr(torch.randn(dim, dim))
        blocks.append((qmat * torch.sign(torch.diagonal(rmat))).T)
    directions = torch.cat(blocks)[:num_features]
    return directions * torch.randn(num_features, dim).norm(dim=1, keepdim=True)


def feature_exponents(
    x: torch.Tensor, features: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """w_r . x - |x|^2 / 2 for x [B, H, n, d] (scaled by d^-1/4) -> [B, H, n, m], in x's dtype
    even under autocast. With keep [B, n] (keys), padded keys get -inf: masked before the exp,
    since a padded key's exponent can exceed the real keys' max enough to overflow (inf * 0 = NaN).
    """
    logits = (x @ features.T).to(x.dtype) - x.square().sum(dim=-1, keepdim=True) / 2
    return logits if keep is None else logits.masked_fill(~keep[:, None, :, None], float("-inf"))


def key_max(logits: torch.Tensor) -> torch.Tensor:
    """The keys' stabiliser: the max over the real keys and all features of each slice (0 for a
    slice without any), detached."""
    return logits.detach().amax(dim=(-1, -2), keepdim=True).nan_to_num(neginf=0.0)


@register("performer")
class PerformerAttention(nn.Module):
    def __init__(self, head_dim: int | None = None, num_features: int = 256):
        super().__init__()
        check_at_least(1, head_dim=head_dim, num_features=num_features)
        self.register_buffer("features", orthogonal_gaussian(num_features, head_dim))

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        if d != self.features.shape[1]:
            raise ValueError(f"performer was built for head_dim {self.features.shape[1]}, got {d}")
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        w = self.features.to(compute)
        scale = d**-0.25
        log_q = feature_exponents(q.to(compute) * scale, w)
        log_k = feature_exponents(k.to(compute) * scale, w, keep)
        norm = math.sqrt(w.shape[0])
        phi_q = (torch.exp(log_q - log_q.detach().amax(dim=-1, keepdim=True)) + FEATURE_EPS) / norm
        phi_k = (torch.exp(log_k - key_max(log_k)) + FEATURE_EPS) / norm * keep[:, None, :, None]
        kv = phi_k.transpose(-1, -2) @ v.to(compute)  # [B, H, m, d]
        normaliser = phi_q @ phi_k.sum(dim=2)[..., None]  # [B, H, n, 1]
        # The clamp only acts where a slice has no real key (kv = 0 there): 0 instead of 0 / 0.
        out = (phi_q @ kv) / normaliser.clamp_min(torch.finfo(compute).tiny)
        return zero_padded_queries(out, mask).to(in_dtype)

    def extra_repr(self) -> str:
        m, d = self.features.shape
        return f"num_features={m}, head_dim={d}"
