"""Skyformer (Chen et al., NeurIPS 2021): Gaussian-kernel attention through a Nystrom
approximation of the joint query-key kernel matrix.

The softmax weight exp(q . k / sqrt d) is replaced by the Gaussian kernel, with no row
normalisation (as in the paper and SOFT):

    kappa(q_i, k_j) = exp(-|q_i - k_j|^2 / (2 sqrt d)),     out_i = sum_j kappa(q_i, k_j) v_j

kappa(Q, K) is not symmetric, but it is one block of the positive semi-definite kernel matrix of
all 2n points [Q; K], so Nystrom applies there: with m landmarks S drawn from [Q; K],

    out = kappa(Q, S) (kappa(S, S) + ridge I)^+ kappa(S, K) v

The middle matrix C = kappa(S, S) + ridge I is balanced as D C D with D = diag(rowsum C)^(-1/2)
(its eigenvalues then lie in (0, 1]), inverted by the iterative pseudo-inverse of nystrom.py
(`pinv_iterations` steps), and D is put back on both sides. Cost O(n m d + m^3); nothing n x n.

Conventions (as the published code, where not said otherwise):
- Landmarks are drawn afresh at every call from torch's global RNG, in training and evaluation:
  m // 2 uniformly among the real queries and the rest among the real keys, with replacement,
  the same positions for every head of an example. The published code draws positions below each
  example's count of real tokens, which assumes that padding is at the end; we draw among the
  tokens the mask marks real, wherever they are.
- With num_landmarks >= 2n every point of [Q; K] is a landmark (no draw; padded ones are
  dropped), and with ridge 0 and a converged inverse the output is exactly the dense
  Gaussian-kernel attention (tests/attention/test_skyformer.py).
- The kernel's scale is 1 / sqrt(d) of the head dim (the published code fixes d = 32, the LRA
  head dim).
- Padded keys carry no weight; padded queries output zero. Computed in at least float32 under
  autocast: the kernel's |x|^2 + |y|^2 - 2 x . y cancels and the iterations amplify error.
"""

from __future__ import annotations

import torch
from torch import nn

from mra_lra.attention.nystrom import iterative_pinv
from mra_lra.attention.registry import register
from mra_lra.attention.soft import gaussian_kernel
from mra_lra.attention.softmax import zero_padded_queries


def draw_landmarks(keep: torch.Tensor, num_landmarks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in [Q; K] (0..2n-1) for each example: num_landmarks // 2 among its real queries,
    the rest among its real keys, uniformly with replacement.

    keep [B, n] bool -> (index [B, m] long, filled [B, m] bool); filled is False only for an
    example without any real token (its draws are placeholders, dropped by the caller).
    """
    n = keep.shape[1]
    real = keep.any(dim=1, keepdim=True)
    weights = (keep | ~real).float()  # an all-padded example draws anywhere; it is dropped
    from_q = torch.multinomial(weights, num_landmarks // 2, replacement=True)
    from_k = torch.multinomial(weights, num_landmarks - num_landmarks // 2, replacement=True)
    index = torch.cat([from_q, from_k + n], dim=1)
    return index, real.expand_as(index)


@register("skyformer")
class SkyformerAttention(nn.Module):
    def __init__(self, num_landmarks: int = 128, pinv_iterations: int = 6, ridge: float = 0.1):
        super().__init__()
        if num_landmarks < 2:
            raise ValueError(f"num_landmarks must be >= 2 (queries and keys), got {num_landmarks}")
        if pinv_iterations < 1:
            raise ValueError(f"pinv_iterations must be >= 1, got {pinv_iterations}")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.ridge = ridge

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        weight = keep[:, None, :, None].to(compute)
        with torch.autocast(q.device.type, enabled=False):
            # With x = q / d^(1/4), exp(-|x - y|^2 / 2) is the kernel exp(-|q - k|^2 / (2 sqrt d)).
            xq = q.to(compute) * weight * d**-0.25
            xk = k.to(compute) * weight * d**-0.25
            vm = v.to(compute) * weight  # zero at padded keys: they carry no weight
            points = torch.cat([xq, xk], dim=2)
            if self.num_landmarks >= 2 * n:
                landmarks, filled = points, torch.cat([keep, keep], dim=1)
            else:
                index, filled = draw_landmarks(keep, self.num_landmarks)
                landmarks = points.gather(2, index[:, None, :, None].expand(B, H, -1, d))
            m = landmarks.shape[2]
            eye = torch.eye(m, dtype=compute, device=q.device)
            pair = (filled[:, :, None] & filled[:, None, :])[:, None]
            middle = torch.where(pair, gaussian_kernel(landmarks, landmarks), eye)
            middle = middle + self.ridge * eye
            balance = middle.sum(dim=-1).rsqrt()  # D, [B, H, m]
            inverse = iterative_pinv(
                balance[..., :, None] * middle * balance[..., None, :], self.pinv_iterations
            )
            # Dropped landmarks get zero columns in the outer kernels, which D then keeps zero.
            columns = (filled[:, None, None, :] * balance[..., None, :]).to(compute)
            left = gaussian_kernel(xq, landmarks) * columns
            right_v = (gaussian_kernel(xk, landmarks) * columns).transpose(-1, -2) @ vm
            out = left @ (inverse @ right_v)
        return zero_padded_queries(out, mask).to(in_dtype)

    def extra_repr(self) -> str:
        return (
            f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}, "
            f"ridge={self.ridge}"
        )
