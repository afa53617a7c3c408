"""Nystromformer (Xiong et al., AAAI 2021): softmax attention through a Nystrom approximation.

With m landmarks q~, k~ (segment means of the queries and keys) and s = 1 / sqrt(d):

    out = softmax(s q k~^T) pinv(softmax(s q~ k~^T)) softmax(s q~ k^T) v  (+ depthwise conv of v)

pinv is the iterative Moore-Penrose inverse (Razavi et al. 2014) of the paper. O(n m d). Where the
published code differs: segments of ceil(n / num_landmarks) tokens make any n work (it needs n
divisible by num_landmarks); a landmark is the mean over real tokens only, and one whose segment
is all padding is dropped; pinv's starting scale is per slice, not over the whole batch. The
optional conv (`conv_kernel_size`, null = off) is the published depthwise conv over the masked v,
one kernel per head. With num_landmarks >= n the output is softmax up to pinv's convergence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


def iterative_pinv(mat: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximate Moore-Penrose inverse of each [m, m] matrix in `mat` (Razavi et al. 2014).

    Z_0 = A^T / (max column sum of A) (A is row-stochastic, so this is A^T / (|A|_1 |A|_inf)),
    then Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4, converging to A^+ at order 3.
    """
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    z = mat.transpose(-1, -2) / mat.sum(dim=-2).amax(dim=-1)[..., None, None]
    for _ in range(iterations):
        az = mat @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segments(keep: torch.Tensor, num_landmarks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmark segments: runs of seg = ceil(n / num_landmarks) tokens, m = ceil(n / seg) of them.
    keep [B, n] bool -> keep padded to [B, m seg] and the real tokens per segment [B, m]."""
    B, n = keep.shape
    seg = math.ceil(n / num_landmarks)
    keep = F.pad(keep, (0, math.ceil(n / seg) * seg - n))
    return keep, keep.view(B, -1, seg).sum(dim=-1)


def segment_means(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [B, H, m seg, d] zero at padding, counts [B, m] -> segment means [B, H, m, d]."""
    B, H, length, d = x.shape
    m = counts.shape[1]
    return x.view(B, H, m, length // m, d).sum(dim=3) / counts.clamp(min=1)[:, None, :, None]


def identity_where_empty(kernel: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """The rows and columns of empty landmarks (filled [B, m] False) of kernel [B, H, m, m] set to
    the identity, which leaves the inverse of the rest alone."""
    eye = torch.eye(kernel.shape[-1], dtype=kernel.dtype, device=kernel.device)
    return torch.where((filled[:, :, None] & filled[:, None, :])[:, None], kernel, eye)


def _masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with `keep` False entries at zero weight (no NaN if none kept)."""
    return torch.softmax(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), dim=-1)


@register("nystrom")
class NystromAttention(nn.Module):
    def __init__(
        self,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel_size: int | None = 33,
        num_heads: int | None = None,
    ):
        super().__init__()
        check_at_least(1, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations)
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.conv = None
        if conv_kernel_size is not None:
            if conv_kernel_size < 1 or conv_kernel_size % 2 == 0:
                raise ValueError(
                    f"conv_kernel_size must be a positive odd number (or null for no conv), "
                    f"got {conv_kernel_size}"
                )
            check_at_least(1, num_heads=num_heads)
            self.conv = nn.Conv2d(
                num_heads,
                num_heads,
                kernel_size=(conv_kernel_size, 1),
                padding=(conv_kernel_size // 2, 0),
                groups=num_heads,
                bias=False,
            )

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        keep_p, counts = segments(keep, self.num_landmarks)
        weight = keep_p[:, None, :, None].to(compute)
        pad = keep_p.shape[1] - n
        qp, kp, vp = (F.pad(t.to(compute), (0, 0, 0, pad)) * weight for t in (q, k, v))
        qp, kp = qp * d**-0.25, kp * d**-0.25  # on both q and k: scores carry 1 / sqrt(d)
        q_land, k_land = segment_means(qp, counts), segment_means(kp, counts)
        filled = counts > 0  # [B, m]: landmarks with a real token

        # The pseudo-inverse and the products around it lose too much in half precision: no
        # autocast here (the O(n m d) matmuls are cheap next to the projections around them).
        with torch.autocast(q.device.type, enabled=False):
            kernel_1 = _masked_softmax(qp @ k_land.transpose(-1, -2), filled[:, None, None, :])
            kernel_2 = _masked_softmax(q_land @ k_land.transpose(-1, -2), filled[:, None, None, :])
            kernel_2 = identity_where_empty(kernel_2, filled)
            kernel_3 = _masked_softmax(q_land @ kp.transpose(-1, -2), keep_p[:, None, None, :])
            out = kernel_1 @ (iterative_pinv(kernel_2, self.pinv_iterations) @ (kernel_3 @ vp))
        if self.conv is not None:
            out = out + self.conv(vp.to(self.conv.weight.dtype)).to(compute)
        return zero_padded_queries(out[:, :, :n], mask).to(in_dtype)
