"""SOFT (Lu et al., NeurIPS 2021): softmax-free Gaussian-kernel attention, Nystrom landmarks.

Keys are tied to queries (the `k` argument is unused) and exp(q . k / sqrt d) is replaced by a
Gaussian kernel, with no row normalisation:

    G(x, y) = exp(-|x - y|^2 / (2 sqrt d)),     out = G(q, q~) pinv(G(q~, q~)) G(q~, q) v

with m landmarks q~ and pinv from Newton iterations V <- 2 V - V A V; O(n m d). Where the
published code differs: landmarks are Nystromformer's segment means over real tokens (it learns
them with a strided conv over a fixed maximum length); Newton starts from A^T / (|A|_1 |A|_inf),
which always converges, per slice, and runs `newton_iterations` steps with no early stop (no
host syncs). With num_landmarks >= n the output is the dense Gaussian-kernel attention once the
inverse has converged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.nystrom import identity_where_empty, segment_means, segments
from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


def newton_pinv(mat: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose inverse of each [m, m] matrix in `mat` by Newton iterations.

    V_0 = A^T / (|A|_1 |A|_inf) (so that alpha sigma_max^2 <= 1), then V <- 2 V - V A V, which
    converges quadratically to A^+.
    """
    norm_1 = mat.abs().sum(dim=-2).amax(dim=-1)
    norm_inf = mat.abs().sum(dim=-1).amax(dim=-1)
    v = mat.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    for _ in range(iterations):
        v = 2 * v - v @ mat @ v
    return v


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """exp(-|x_i - y_j|^2 / 2) for [..., n, d] and [..., m, d] -> [..., n, m]."""
    sq = x.square().sum(-1)[..., :, None] + y.square().sum(-1)[..., None, :]
    sq = sq - 2 * x @ y.transpose(-1, -2)
    return torch.exp(-sq.clamp(min=0) / 2)


@register("soft")
class SOFTAttention(nn.Module):
    def __init__(self, num_landmarks: int = 64, newton_iterations: int = 20):
        super().__init__()
        check_at_least(1, num_landmarks=num_landmarks, newton_iterations=newton_iterations)
        self.num_landmarks = num_landmarks
        self.newton_iterations = newton_iterations

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        keep_p, counts = segments(keep, self.num_landmarks)
        weight = keep_p[:, None, :, None].to(compute)
        pad = keep_p.shape[1] - n
        # With x = q / d^(1/4), exp(-|x - y|^2 / 2) is the kernel exp(-|q - k|^2 / (2 sqrt d)).
        x = F.pad(q.to(compute), (0, 0, 0, pad)) * weight * d**-0.25
        vp = F.pad(v.to(compute), (0, 0, 0, pad)) * weight  # zero: padded keys carry no weight
        landmarks = segment_means(x, counts)
        filled = counts > 0

        # The kernel's |x|^2 + |y|^2 - 2 x . y cancels and the Newton iterations amplify error,
        # both too much in half precision: no autocast here (as in nystrom.py; O(n m d) work).
        with torch.autocast(q.device.type, enabled=False):
            kernel_1 = gaussian_kernel(x, landmarks) * filled[:, None, None, :]
            kernel_2 = identity_where_empty(gaussian_kernel(landmarks, landmarks), filled)
            kernel_3_v = kernel_1.transpose(-1, -2) @ vp
            out = kernel_1 @ (newton_pinv(kernel_2, self.newton_iterations) @ kernel_3_v)
        return zero_padded_queries(out[:, :, :n], mask).to(in_dtype)
