"""SOFT (Lu et al., NeurIPS 2021): softmax-free Gaussian-kernel attention, Nystrom landmarks.

SOFT ties keys to queries (k = q) and replaces exp(q . k / sqrt d) by a Gaussian kernel, with no
row normalisation:

    G(x, y) = exp(-|x - y|^2 / (2 sqrt d)),     out_i = sum_j G(q_i, q_j) v_j   (real j)

G is symmetric positive semi-definite, so it is approximated through m landmarks q~ (Nystrom):

    out = G(q, q~) pinv(G(q~, q~)) G(q~, q) v

with pinv from Newton iterations V <- 2 V - V A V. Cost O(n m d); nothing n x n is formed.

Conventions (where they differ from the published code, this is said):
- The `k` argument is not used: SOFT's shared query-key is the `q` projection (gradients reach q
  and v only).
- Landmarks are segment means over the real tokens of runs of ceil(n / num_landmarks) tokens
  (Nystromformer's choice, parameter-free and any n). The published code learns them with a
  strided conv + LayerNorm + GELU over a fixed maximum length. A landmark whose segment is all
  padding is dropped (identity row and column in the middle kernel, no weight elsewhere).
- Newton starts from V_0 = A^T / (|A|_1 |A|_inf), which always converges, and runs
  `newton_iterations` steps with no early stop; the published code starts at 2 / |A|_1^2, halves
  it until |I - A V_0|_1 <= 1.01 and stops early when an entry passes 1e4 (host syncs). The scale
  is taken per slice, not over the whole batch.
- Padded keys carry no weight (G(., q_j) v_j dropped); padded queries output zero.
With num_landmarks >= n every token is its own landmark and, once the inverse has converged, the
output is the dense Gaussian-kernel attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries


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
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if newton_iterations < 1:
            raise ValueError(f"newton_iterations must be >= 1, got {newton_iterations}")
        self.num_landmarks = num_landmarks
        self.newton_iterations = newton_iterations

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype = q.dtype
        compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        seg = math.ceil(n / self.num_landmarks)
        m = math.ceil(n / seg)
        extra = m * seg - n
        keep_p = F.pad(keep, (0, extra))
        weight = keep_p[:, None, :, None].to(compute)
        # With x = q / d^(1/4), exp(-|x - y|^2 / 2) is the kernel exp(-|q - k|^2 / (2 sqrt d)).
        x = F.pad(q.to(compute), (0, 0, 0, extra)) * weight * d**-0.25
        vp = F.pad(v.to(compute), (0, 0, 0, extra)) * weight

        counts = keep_p.view(B, m, seg).sum(dim=-1)
        landmarks = x.view(B, H, m, seg, d).sum(dim=3) / counts.clamp(min=1)[:, None, :, None]
        filled = counts > 0  # [B, m]: landmarks with at least one real token

        # The kernel's |x|^2 + |y|^2 - 2 x . y cancels and the Newton iterations amplify error,
        # both too much in half precision: no autocast here (as in nystrom.py; O(n m d) work).
        with torch.autocast(q.device.type, enabled=False):
            kernel_1 = gaussian_kernel(x, landmarks) * filled[:, None, None, :]
            eye = torch.eye(m, dtype=compute, device=q.device)
            both = (filled[:, :, None] & filled[:, None, :])[:, None]
            kernel_2 = torch.where(both, gaussian_kernel(landmarks, landmarks), eye)
            # G(q~, q) v: vp is zero at padded keys, so they carry no weight.
            kernel_3_v = kernel_1.transpose(-1, -2) @ vp
            out = kernel_1 @ (newton_pinv(kernel_2, self.newton_iterations) @ kernel_3_v)
        return zero_padded_queries(out[:, :, :n], mask).to(in_dtype)

    def extra_repr(self) -> str:
        return f"num_landmarks={self.num_landmarks}, newton_iterations={self.newton_iterations}"
