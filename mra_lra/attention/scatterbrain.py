"""Scatterbrain (Chen et al., NeurIPS 2021): sparse + low-rank estimate of the softmax matrix.

With q' = q / d^(1/4), k' = k / d^(1/4) (so q'.k' = q.k / sqrt d), the Performer (FAVOR+) features
phi of mra_lra.attention.performer give a low-rank estimate L_ij = phi(q_i) . phi(k_j) of
exp(q'_i . k'_j). Scatterbrain adds a sparse correction S supported on a local window W, where it
replaces the estimate by the exact value:

    S_ij = exp(q'_i . k'_j) - L_ij   for j in W(i),   0 elsewhere
    A = L + S:  exact inside the window, the low-rank estimate outside (and never negative)
    out_i = sum_j A_ij v_j / sum_j A_ij

Cost O(n m d + n w (m + d)) for m features and window w; nothing n x n is formed.

Conventions:
- The window is blocked, as in lucidrains' local-attention and BigBird: the sequence is cut into
  chunks of `window_size` tokens and each query sees the keys of its own chunk and of the chunks
  on either side (2 w to 3 w keys). With window_size >= n every key is in the window and the
  output is exact softmax attention. (The published code slides a window centred on each query.)
- Features: W [m, d] of positive orthogonal random features, drawn once at construction from
  torch's global RNG (performer.orthogonal_gaussian) and kept as a buffer; never redrawn.
- Stabilisers: phi(k) is shifted by c, the max of its exponent over the real keys and features of
  the slice; phi(q_i) by a_i, the larger of its own feature max and of max over W(i) of
  q'_i.k'_j - c. The exact entries are shifted by the same a_i + c, so L and S share one scale
  (and a_i cancels in the ratio).
  (No feature epsilon: the exact diagonal keeps every real row's normaliser positive.)
- Padded keys are dropped from L and S (their feature exponents are set to -inf before the exp, so
  no content of a padded key can overflow or reach a real row); padded queries output zero.
- Feature map: the plain positive features exp(w.x - |x|^2 / 2) with m independent projections.
  The Scatterbrain code the MRA authors' LRA copy imports (scatterbrain_src/feature_maps_sb.py,
  SBPerformerFeatures, as in HazyResearch's version; MRA's own copy is not in our reference index)
  defaults to cosh=True: features exp(+-w.x - |x|^2 / 2) from m / 2 projections, the Performer
  paper's symmetrised (hyperbolic) variant, which lowers the estimator's variance. Both estimate
  the same exp(q'.k'), so only the noise differs. That code also draws its projections once
  (it never redraws), as here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.performer import orthogonal_gaussian
from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries


def _chunk_neighbourhood(x: torch.Tensor) -> torch.Tensor:
    """[B, H, nc, w, ...] -> [B, H, nc, 3w, ...]: each chunk with its left and right neighbour
    (zeros beyond the ends)."""
    pad = [0, 0] * (x.dim() - 3) + [1, 1]
    xp = F.pad(x, pad)
    return torch.cat([xp[:, :, :-2], xp[:, :, 1:-1], xp[:, :, 2:]], dim=3)


def scatterbrain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    features: torch.Tensor,
    window_size: int,
) -> torch.Tensor:
    """q, k, v: [B, H, n, d]; keep: [B, n] bool; features: W [m, d] -> [B, H, n, d]."""
    B, H, n, d = q.shape
    m = features.shape[0]
    w = window_size
    nc = math.ceil(n / w)
    extra = nc * w - n
    keep = F.pad(keep, (0, extra))
    q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
    scale = d**-0.25
    q, k = q * scale, k * scale

    # Exponents of the random features: phi(x)_r = exp(w_r . x - |x|^2 / 2 - shift) / sqrt(m).
    log_fq = q @ features.T - q.square().sum(-1, keepdim=True) / 2  # [B, H, n, m]
    log_fk = k @ features.T - k.square().sum(-1, keepdim=True) / 2
    # Padded keys' exponents are -inf before the exp (not zeroed after it): theirs can exceed the
    # real keys' max c by enough to overflow, and inf * 0 is NaN.
    log_fk = log_fk.masked_fill(~keep[:, None, :, None], float("-inf"))
    with torch.no_grad():
        c = log_fk.amax(dim=(-1, -2), keepdim=True)
        c = c.nan_to_num(neginf=0.0)  # a slice without any real key
    phi_k = torch.exp(log_fk - c) / math.sqrt(m)

    # Window scores, chunk by chunk: queries [B, H, nc, w, .], keys [B, H, nc, 3w, .].
    keys_keep = _chunk_neighbourhood(keep.view(B, 1, nc, w))  # [B, 1, nc, 3w]
    k_win = _chunk_neighbourhood(k.view(B, H, nc, w, d))
    v_win = _chunk_neighbourhood(v.view(B, H, nc, w, d))
    phi_k_win = _chunk_neighbourhood(phi_k.view(B, H, nc, w, m))
    scores = q.view(B, H, nc, w, d) @ k_win.transpose(-1, -2)  # [B, H, nc, w, 3w]
    scores = scores.masked_fill(~keys_keep[:, :, :, None, :], float("-inf"))
    with torch.no_grad():
        a = torch.maximum(
            log_fq.amax(dim=-1).view(B, H, nc, w),
            scores.amax(dim=-1) - c.view(B, H, 1, 1),
        )
    phi_q = torch.exp(log_fq - a.view(B, H, nc * w, 1)) / math.sqrt(m)

    # Sparse correction inside the window: exact entry minus the low-rank estimate of it.
    exact = torch.exp(scores - a[..., None] - c.view(B, H, 1, 1, 1))
    low_rank = phi_q.view(B, H, nc, w, m) @ phi_k_win.transpose(-1, -2)
    correction = exact - low_rank
    num = phi_q @ (phi_k.transpose(-1, -2) @ v)
    num = num + (correction @ v_win).view(B, H, nc * w, d)
    den = phi_q @ phi_k.sum(dim=2)[..., None]
    den = den + correction.sum(dim=-1).view(B, H, nc * w, 1)
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return out[:, :, :n]


@register("scatterbrain")
class ScatterbrainAttention(nn.Module):
    def __init__(self, head_dim: int | None = None, window_size: int = 64, num_features: int = 256):
        super().__init__()
        if head_dim is None or head_dim < 1:
            raise ValueError(
                f"scatterbrain needs head_dim >= 1 (the encoder passes it in `context`), "
                f"got {head_dim}"
            )
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.window_size = window_size
        self.register_buffer("features", orthogonal_gaussian(num_features, head_dim))

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        if d != self.features.shape[1]:
            raise ValueError(
                f"scatterbrain was built for head_dim {self.features.shape[1]}, got {d}"
            )
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        out = scatterbrain_attention(
            q.to(compute),
            k.to(compute),
            v.to(compute),
            keep,
            self.features.to(compute),
            self.window_size,
        )
        return zero_padded_queries(out, mask).to(in_dtype)

    def extra_repr(self) -> str:
        m, d = self.features.shape
        return f"window_size={self.window_size}, num_features={m}, head_dim={d}"
