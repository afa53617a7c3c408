"""Performer (Choromanski et al., ICLR 2021): FAVOR+ with positive orthogonal random features.

With x' = x / d^(1/4) (so q'.k' = q.k / sqrt d) and m random rows w_r of W [m, d]:

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),      E[phi(q) . phi(k)] = exp(q'.k')
    out_i  = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))

Cost O(n m d); nothing n x n is formed. Conventions:
- W: blocks of d orthonormal rows (QR of a Gaussian matrix, signs fixed so the rows are Haar
  distributed), each row rescaled to the length of a d-dim Gaussian vector.
- Redraw policy: W is drawn once, at construction, from torch's global RNG (so a seeded run
  reproduces it and every layer gets its own) and kept as a buffer saved with the checkpoint.
  The paper's code can redraw it during training; this one never does.
- Each feature map is stabilised by subtracting a max before exp (per query row; over all real keys
  and features of a slice for the keys): a constant that cancels in the ratio. A small 1e-4 is then
  added to every feature, as in the published code (lucidrains' softmax_kernel eps=1e-4, Google's
  eps=0.0001), so no denominator is zero.
- Padded keys are dropped from both sums: the key stabiliser looks at real keys only, and a padded
  key's exponent is set to -inf before the exp, so whatever a padded key holds it can neither
  overflow (inf * 0 = NaN) nor reach a real row.
- Temperature: this module estimates exp(q.k / sqrt d), the paper's softmax. The MRA authors' LRA
  wrapper (mlpen/mra-attention LRA/encoders/performer.py) divides q and k by d^(1/4) before
  lucidrains' FastAttention, whose softmax_kernel (normalize_data=True) scales by d^(-1/4) again,
  so the runs behind the MRA paper's Performer numbers effectively used exp(q.k / d). That wrapper
  also zeroes padded keys instead of dropping them, so their phi(0) still enters its normaliser.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries

FEATURE_EPS = 1e-4  # as lucidrains' and Google's FAVOR+ code


def orthogonal_gaussian(num_features: int, dim: int) -> torch.Tensor:
    """[num_features, dim]: stacked blocks of orthogonal rows, each with a chi(dim) length."""
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        qmat, rmat = torch.linalg.qr(torch.randn(dim, dim))
        blocks.append((qmat * torch.sign(torch.diagonal(rmat))).T)
    directions = torch.cat(blocks)[:num_features]
    return directions * torch.randn(num_features, dim).norm(dim=1, keepdim=True)


def positive_features(
    x: torch.Tensor, features: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """phi(x) for x [B, H, n, d] (already scaled by d^-1/4) -> [B, H, n, m].

    keep=None: queries, stabilised per row. keep [B, n] bool: keys, stabilised over the real keys
    and all features of each slice, padded keys set to zero.
    """
    projected = (x @ features.transpose(0, 1)).to(x.dtype)  # exp in x's dtype, even under autocast
    logits = projected - x.square().sum(dim=-1, keepdim=True) / 2
    if keep is not None:
        # Masked before the exp, not after: a padded key's exponent can exceed the real keys' max
        # by enough to overflow, and inf * 0 (or its gradient through torch.where) is NaN.
        logits = logits.masked_fill(~keep[:, None, :, None], float("-inf"))
    with torch.no_grad():
        if keep is None:
            stab = logits.amax(dim=-1, keepdim=True)
        else:  # over the real keys (padded ones are -inf); 0 for a slice without any
            stab = logits.amax(dim=(-1, -2), keepdim=True).nan_to_num(neginf=0.0)
    phi = (torch.exp(logits - stab) + FEATURE_EPS) / math.sqrt(features.shape[0])
    if keep is not None:
        phi = phi * keep[:, None, :, None]
    return phi


@register("performer")
class PerformerAttention(nn.Module):
    def __init__(self, head_dim: int | None = None, num_features: int = 256):
        super().__init__()
        if head_dim is None or head_dim < 1:
            raise ValueError(
                f"performer needs head_dim >= 1 (the encoder passes it in `context`), "
                f"got {head_dim}"
            )
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.register_buffer("features", orthogonal_gaussian(num_features, head_dim))

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        if d != self.features.shape[1]:
            raise ValueError(f"performer was built for head_dim {self.features.shape[1]}, got {d}")
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        w = self.features.to(compute)
        scale = d**-0.25
        phi_q = positive_features(q.to(compute) * scale, w, None)
        phi_k = positive_features(k.to(compute) * scale, w, keep)
        kv = phi_k.transpose(-1, -2) @ v.to(compute)  # [B, H, m, d]
        normaliser = phi_q @ phi_k.sum(dim=2)[..., None]  # [B, H, n, 1]
        # The clamp only acts where a slice has no real key (kv = 0 there): 0 instead of 0 / 0.
        out = (phi_q @ kv) / normaliser.clamp_min(torch.finfo(compute).tiny)
        return zero_padded_queries(out, mask).to(in_dtype)

    def extra_repr(self) -> str:
        m, d = self.features.shape
        return f"num_features={m}, head_dim={d}"
