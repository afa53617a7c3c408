"""Scatterbrain (Chen et al., NeurIPS 2021): sparse + low-rank estimate of the softmax matrix.

With q' = q / d^(1/4), k' = k / d^(1/4), the Performer features phi (performer.py) give a
low-rank estimate L_ij = phi(q_i) . phi(k_j) of exp(q'_i . k'_j); a sparse correction S on a
local window W replaces it by the exact value there:

    S_ij = exp(q'_i . k'_j) - L_ij  for j in W(i), else 0
    out_i = sum_j (L + S)_ij v_j / sum_j (L + S)_ij

O(n m d + n w (m + d)). The window is blocked (as lucidrains' local-attention and BigBird): chunks
of `window_size` tokens see their own and both neighbouring chunks, so window_size >= n is exact
softmax (the published code slides a window centred on each query). phi(k) is shifted by c, its
max over the real keys; phi(q_i) by a_i, the larger of its own max and of max_W(i) q'_i.k'_j - c;
the exact entries by a_i + c, so L and S share one scale (no feature epsilon: the exact diagonal
keeps every real row's normaliser positive). The published features default to cosh=True
(exp(+-w.x - |x|^2 / 2) from m / 2 projections, lower variance); we use the plain positive ones,
which estimate the same exp(q'.k'). Both draw W once and never redraw it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.performer import feature_exponents, key_max, orthogonal_gaussian
from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


def _chunk_neighbourhood(x: torch.Tensor) -> torch.Tensor:
    """[B, H, nc, w, ...] -> [B, H, nc, 3w, ...]: each chunk with its left and right neighbour
    (zeros beyond the ends)."""
    xp = F.pad(x, [0, 0] * (x.dim() - 3) + [1, 1])
    return torch.cat([xp[:, :, :-2], xp[:, :, 1:-1], xp[:, :, 2:]], dim=3)


@register("scatterbrain")
class ScatterbrainAttention(nn.Module):
    def __init__(self, head_dim: int | None = None, window_size: int = 64, num_features: int = 256):
        super().__init__()
        check_at_least(1, head_dim=head_dim, window_size=window_size, num_features=num_features)
        self.window_size = window_size
        self.register_buffer("features", orthogonal_gaussian(num_features, head_dim))

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        m, w = self.features.shape[0], self.window_size
        if d != self.features.shape[1]:
            raise ValueError(
                f"scatterbrain was built for head_dim {self.features.shape[1]}, got {d}"
            )
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        nc = math.ceil(n / w)
        keep = F.pad(keep, (0, nc * w - n))
        q, k, v = (F.pad(t.to(compute), (0, 0, 0, nc * w - n)) for t in (q, k, v))
        q, k = q * d**-0.25, k * d**-0.25
        features = self.features.to(compute)
        log_fq = feature_exponents(q, features)  # [B, H, n, m]
        log_fk = feature_exponents(k, features, keep)
        c = key_max(log_fk)
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
                log_fq.amax(dim=-1).view(B, H, nc, w), scores.amax(dim=-1) - c.view(B, H, 1, 1)
            )
        phi_q = torch.exp(log_fq - a.view(B, H, nc * w, 1)) / math.sqrt(m)

        # Sparse correction inside the window: exact entry minus the low-rank estimate of it.
        exact = torch.exp(scores - a[..., None] - c.view(B, H, 1, 1, 1))
        correction = exact - phi_q.view(B, H, nc, w, m) @ phi_k_win.transpose(-1, -2)
        num = phi_q @ (phi_k.transpose(-1, -2) @ v)
        num = num + (correction @ v_win).view(B, H, nc * w, d)
        den = phi_q @ phi_k.sum(dim=2)[..., None]
        den = den + correction.sum(dim=-1).view(B, H, nc * w, 1)
        out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
        return zero_padded_queries(out[:, :, :n], mask).to(in_dtype)

    def extra_repr(self) -> str:
        m, d = self.features.shape
        return f"window_size={self.window_size}, num_features={m}, head_dim={d}"
