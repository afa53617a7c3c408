"""MRA-2 / MRA-2-s in plain torch: the reference path, and what CPU users train with.

For a query i in block I (full mode), with the chosen block set from `selection.prepare`:

    A(i, j) ~ exp(q_i . k_j / sqrt d)          for j in a chosen block (I, J)       (fine part)
    A(i, j) ~ exp(qbar_I . kbar_J / sqrt d)    for j in an unrefined block J        (coarse part)
    out_i = sum_j A(i, j) v_j / sum_j A(i, j)

The fine part runs as one batched matmul over the k_sel chosen 32 x 32 blocks of all slices,
gathered with index_select and summed back with index_add (both have cheap autograd rules).
Sparse mode keeps only the fine part.
"""

from __future__ import annotations

import math

import torch

from mra_lra.attention.mra.selection import EMPTY_ROW_MAX, EPS, PAD_PENALTY, Selection


def coarse_part(
    sel: Selection, vbar: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 8: Ol [B, H, nb, d] and Nl [B, H, nb], on the stabiliser r_I (row max of S)."""
    A = sel.counts[:, None, None, :] * torch.exp(sel.coarse - sel.row_max[..., None])
    A = A.masked_fill(sel.excluded, 0.0)
    return torch.matmul(A, vbar), A.sum(dim=-1)


def fine_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sel: Selection,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 5-7 over the chosen blocks. Returns Oh [G*nb, b, d], Nh [G*nb, b], mu [G*nb, b].

    mu is the per-query max of the masked fine scores (EMPTY_ROW_MAX where a row has none).
    """
    B, H, n, d = q.shape
    b, nb, G = block_size, n // block_size, B * H
    k_sel = sel.block_idx.shape[-1]
    offset = (torch.arange(G, device=q.device) * nb)[:, None]
    flat = sel.block_idx.reshape(G, k_sel)
    rows = (flat // nb + offset).flatten()  # query block of each chosen block, over all slices
    cols = (flat % nb + offset).flatten()  # key block

    qs = q.reshape(G * nb, b, d).index_select(0, rows)
    ks = k.reshape(G * nb, b, d).index_select(0, cols)
    vs = v.reshape(G * nb, b, d).index_select(0, cols)
    key_bias = (-PAD_PENALTY * (1.0 - mask)).view(B, 1, nb, b).expand(B, H, nb, b)
    bias = key_bias.reshape(G * nb, 1, b).index_select(0, cols)

    s = torch.baddbmm(bias, qs, ks.transpose(1, 2), alpha=1.0 / math.sqrt(d))
    with torch.no_grad():
        mu = torch.full((G * nb, b), EMPTY_ROW_MAX, device=q.device, dtype=s.dtype)
        index = rows[:, None].expand(-1, b)
        mu.scatter_reduce_(0, index, s.amax(dim=-1), "amax", include_self=False)
    a = torch.exp(s - mu.index_select(0, rows)[:, :, None])
    Oh = torch.zeros(G * nb, b, d, device=q.device, dtype=s.dtype)
    Oh = Oh.index_add(0, rows, torch.bmm(a, vs))
    Nh = torch.zeros(G * nb, b, device=q.device, dtype=s.dtype).index_add(0, rows, a.sum(dim=-1))
    return Oh, Nh, mu


def mra2_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sel: Selection,
    vbar: torch.Tensor | None,
    *,
    approx_mode: str,
    block_size: int,
) -> torch.Tensor:
    """Steps 5-10 on padded, zeroed float inputs [B, H, n, d]; returns [B, H, n, d]."""
    B, H, n, d = q.shape
    b, nb = block_size, n // block_size
    Oh, Nh, mu = fine_part(q, k, v, mask, sel, block_size)
    Oh = Oh.view(B, H, nb, b, d)
    Nh = Nh.view(B, H, nb, b)
    if approx_mode == "sparse":
        out = Oh / (Nh[..., None] + EPS)
    else:
        Ol, Nl = coarse_part(sel, vbar, block_size)
        # Step 9: both parts on the common stabiliser max(r_I, mu_i).
        delta = (sel.row_max[..., None] - mu.view(B, H, nb, b)) * mask.view(B, 1, nb, b)
        scale_low = torch.exp(delta.clamp(max=0.0))
        scale_high = torch.exp(-delta.clamp(min=0.0))
        num = Oh * scale_high[..., None] + Ol[:, :, :, None, :] * scale_low[..., None]
        den = Nh * scale_high + Nl[..., None] * scale_low
        out = num / (den[..., None] + EPS)
    return out.reshape(B, H, n, d) * mask[:, None, :, None]
