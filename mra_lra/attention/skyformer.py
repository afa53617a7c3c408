"""Skyformer (Chen et al., NeurIPS 2021): Gaussian-kernel attention through a Nystrom
approximation of the joint query-key kernel matrix.

    kappa(q_i, k_j) = exp(-|q_i - k_j|^2 / (2 sqrt d)),     out_i = sum_j kappa(q_i, k_j) v_j

(no row normalisation). kappa(Q, K) is one block of the PSD kernel matrix of the 2n points
[Q; K], so with m landmarks S drawn from [Q; K]:

    out = kappa(Q, S) (kappa(S, S) + ridge I)^+ kappa(S, K) v

The middle matrix C is balanced as D C D, D = diag(rowsum C)^(-1/2) (eigenvalues in (0, 1]),
inverted by nystrom.iterative_pinv, and D is put back on both sides. O(n m d + m^3).

As the published code, landmarks are drawn afresh at every call (training and evaluation) from
torch's global RNG: m // 2 among the real queries, the rest among the real keys, with
replacement, the same for every head. It draws below each example's count of real tokens
(padding at the end); we draw among the tokens the mask marks real. num_landmarks >= 2n takes
every point (no draw), so ridge 0 and a converged inverse give the dense kernel attention. The
scale is 1 / sqrt of the head dim (the published code fixes d = 32). Computed in at least float32.
"""

from __future__ import annotations

import torch
from torch import nn

from mra_lra.attention.nystrom import identity_where_empty, iterative_pinv
from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.soft import gaussian_kernel
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


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
        check_at_least(2, num_landmarks=num_landmarks)  # queries and keys
        check_at_least(1, pinv_iterations=pinv_iterations)
        check_at_least(0, ridge=ridge)
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.ridge = ridge

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
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
            eye = torch.eye(landmarks.shape[2], dtype=compute, device=q.device)
            middle = identity_where_empty(gaussian_kernel(landmarks, landmarks), filled)
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
