"""Nystromformer (Xiong et al., AAAI 2021): softmax attention through a Nystrom approximation.

With m landmarks q~, k~ (segment means of the queries and keys) and s = 1 / sqrt(d):

    out = softmax(s q k~^T) pinv(softmax(s q~ k~^T)) softmax(s q~ k^T) v  (+ depthwise conv of v)

pinv is the iterative Moore-Penrose inverse of Razavi et al. (2014) that the paper uses. Cost is
O(n m d); nothing n x n is formed.

Conventions (where the published code differs, this is said):
- Segments are runs of seg = ceil(n / num_landmarks) tokens, giving m = ceil(n / seg) landmarks,
  so any n works (the published code needs n divisible by num_landmarks).
- A landmark is the mean over the real tokens of its segment (the published code averages the
  zeroed padding in). A landmark whose segment is all padding is dropped: its column of the first
  two kernels gets no weight and its row and column of the middle kernel are the identity.
- The pinv starting point uses each slice's own largest column sum (the published default takes it
  over the whole batch, which couples the examples of a batch).
- The optional conv (`conv_kernel_size`, None = off) is the published one: a learned depthwise
  conv over the sequence, one kernel per head shared by the head's channels, on the masked v.

With num_landmarks >= n every landmark is one token, the first two kernels coincide, and the
output is softmax attention up to the convergence of the pseudo-inverse.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries


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
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if pinv_iterations < 1:
            raise ValueError(f"pinv_iterations must be >= 1, got {pinv_iterations}")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.conv = None
        if conv_kernel_size is not None:
            if conv_kernel_size < 1 or conv_kernel_size % 2 == 0:
                raise ValueError(
                    f"conv_kernel_size must be a positive odd number (or null for no conv), "
                    f"got {conv_kernel_size}"
                )
            if num_heads is None:
                raise ValueError(
                    "nystrom with conv_kernel_size needs num_heads (the encoder passes it in "
                    "`context`; pass num_heads=... when building it by hand)"
                )
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
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        seg = math.ceil(n / self.num_landmarks)
        m = math.ceil(n / seg)
        extra = m * seg - n
        keep_p = nn.functional.pad(keep, (0, extra))
        weight = keep_p[:, None, :, None].to(compute)
        scale = d**-0.25  # on both q and k: scores carry 1 / sqrt(d)
        qp, kp, vp = (
            nn.functional.pad(t.to(compute), (0, 0, 0, extra)) * weight for t in (q, k, v)
        )
        qp, kp = qp * scale, kp * scale

        counts = keep_p.view(B, m, seg).sum(dim=-1)  # real tokens per segment
        denom = counts.clamp(min=1)[:, None, :, None].to(compute)
        q_land = qp.view(B, H, m, seg, d).sum(dim=3) / denom
        k_land = kp.view(B, H, m, seg, d).sum(dim=3) / denom
        filled = counts > 0  # [B, m]: landmarks with at least one real token

        # The pseudo-inverse and the products around it lose too much in half precision: no
        # autocast here (the O(n m d) matmuls are cheap next to the projections around them).
        with torch.autocast(q.device.type, enabled=False):
            landmark_keep = filled[:, None, None, :]
            kernel_1 = _masked_softmax(qp @ k_land.transpose(-1, -2), landmark_keep)
            kernel_2 = _masked_softmax(q_land @ k_land.transpose(-1, -2), landmark_keep)
            # Dropped landmarks: identity rows and columns, leaving the rest of the inverse alone.
            eye = torch.eye(m, dtype=compute, device=q.device)
            both = (filled[:, :, None] & filled[:, None, :])[:, None]
            kernel_2 = torch.where(both, kernel_2, eye)
            kernel_3 = _masked_softmax(q_land @ kp.transpose(-1, -2), keep_p[:, None, None, :])
            out = kernel_1 @ (iterative_pinv(kernel_2, self.pinv_iterations) @ (kernel_3 @ vp))
        if self.conv is not None:
            out = out + self.conv(vp.to(self.conv.weight.dtype)).to(compute)
        return zero_padded_queries(out[:, :, :n], mask).to(in_dtype)

    def extra_repr(self) -> str:
        return f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}"
