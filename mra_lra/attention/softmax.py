"""Exact attention through torch's scaled_dot_product_attention (flash / memory-efficient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register


def zero_padded_queries(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Padded query positions output exactly zero (shared padding semantics)."""
    if mask is None:
        return out
    return out * mask[:, None, :, None].to(out.dtype)


def dtypes_and_keep(q: torch.Tensor, mask: torch.Tensor | None):
    """(q's dtype, the float32-or-wider dtype to compute in, real tokens [B, n] bool)."""
    B, _, n, _ = q.shape
    keep = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
    return q.dtype, torch.promote_types(q.dtype, torch.float32), keep


@register("softmax")
class SoftmaxAttention(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = None
        if mask is not None:
            # A row with no real key would be all -inf (NaN out): such rows (fully padded
            # sequences) see every key and are zeroed below as padded queries.
            keep = mask.bool()
            keep = keep | ~keep.any(dim=-1, keepdim=True)
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return zero_padded_queries(out, mask)


def exact_softmax(q, k, v, mask, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Masked softmax attention in float64, a chunk of query rows at a time (so 16k tokens fit):
    padded keys get no weight, padded queries output 0."""
    q, k, v = q.double(), k.double(), v.double()
    keep = None if mask is None else mask[:, None, None, :] != 0
    out = torch.cat(
        [
            F.scaled_dot_product_attention(q[:, :, lo : lo + rows_per_chunk], k, v, attn_mask=keep)
            for lo in range(0, q.shape[2], rows_per_chunk)
        ],
        dim=2,
    )
    return out if mask is None else out * mask[:, None, :, None].double()


def relative_error(out: torch.Tensor, ref: torch.Tensor, mask) -> float:
    """||out - ref|| / ||ref|| over the real query rows."""
    keep = 1.0 if mask is None else mask[:, None, :, None].double()
    diff = ((out.double() - ref) * keep).norm()
    return float(diff / (ref * keep).norm().clamp(min=1e-30))
