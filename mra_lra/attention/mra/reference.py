"""MRA-2 / MRA-2-s in plain torch: the reference path, and what CPU users train with.

For a query i in block I (full mode), with the chosen block set from `selection.prepare`:

    A(i, j) ~ exp(q_i . k_j / sqrt d)          for j in a chosen block (I, J)       (fine part)
    A(i, j) ~ exp(qbar_I . kbar_J / sqrt d)    for j in an unrefined block J        (coarse part)
    out_i = sum_j A(i, j) v_j / sum_j A(i, j)

`mra2_torch` is one autograd Function with a FlashAttention-style backward, so that a step's
memory stays near that of q, k, v and their gradients. On a CPU the op count, not the arithmetic,
sets the time: every op works on a chunk of whole chosen block rows (`chunk_bounds`) and writes
into buffers allocated once per call.

- Forward, per chunk: score the blocks in one batched matmul, raise each query's stabiliser m_i
  to the max of its scores (from r_I in full mode, -1e5 in sparse mode), and add
  exp(s_ij - m_i) [v_j, 1] into the query's [fine_i, l_i]. Then the coarse part (step 8, on the
  nb x nb matrices) joins on the same stabiliser, which is the merge of step 9:

      out_i = (fine_i + exp(r_I - m_i) Ol_I) / (l_i + exp(r_I - m_i) Nl_I + eps)

- Backward, over the same chunks, recomputing P_ij = exp(s_ij - lse_i) (lse = +inf at padded
  queries, so they take no part):

      D_i = dO_i . out_i,   dS_ij = P_ij (dO_i . v_j - D_i)
      dq_i += sum_j dS_ij k_j / sqrt(d),   dk_j += sum_i dS_ij q_i / sqrt(d),
      dv_j += sum_i P_ij dO_i

  The coarse entries act as extra softmax entries with logit S_IJ + log c_J and value vbar_J;
  with A_IJ = c_J exp(S_IJ - r_I) (0 for J in M), u_I = sum_{i in I} exp(r_I - lse_i) dO_i and
  w_I = sum_{i in I} exp(r_I - lse_i) D_i:

      dS_IJ = A_IJ (u_I . vbar_J - w_I),   dvbar_J = sum_I A_IJ u_I   (`coarse_grads`)

  carried on through S = qbar kbar^T / sqrt(d) and the block means (d qbar_I / d q_i =
  1 / (c_I + eps)) straight into dq, dk, dv: an autograd graph through them would add
  [B, H, n, d]-sized gradient copies to the peak.

Every sum runs in a fixed order (index_add on CPU adds in index order): the backward is
deterministic.
"""

from __future__ import annotations

import bisect
import math

import torch

from mra_lra.attention.mra.selection import EMPTY_ROW_MAX, EPS, PAD_PENALTY, Selection

# Elements of one gathered [blocks, b, max(b, d)] tensor per chunk: 2 MiB in float32, which keeps
# a chunk's working set (six such tensors in the backward) inside a CPU's L2/L3 cache.
CHUNK_ELEMENTS = 2**19


def chunk_bounds(rows: torch.Tensor, num_rows: int, chunk_blocks: int) -> list[tuple[int, int]]:
    """Cut blocks sorted by query block (`rows`, of num_rows) into chunks (t0, t1) of whole block
    rows, each of at most `chunk_blocks` blocks unless one block row alone has more."""
    ends = torch.bincount(rows, minlength=num_rows).cumsum(0).tolist()  # each row's last block
    chunks, t0 = [], 0
    while t0 < ends[-1]:
        i = bisect.bisect_right(ends, t0 + chunk_blocks) - 1  # the last row that fits
        t1 = ends[i] if i >= 0 and ends[i] > t0 else ends[bisect.bisect_right(ends, t0)]
        chunks.append((t0, t1))
        t0 = t1
    return chunks


def coarse_weights(
    coarse: torch.Tensor, row_max: torch.Tensor, counts: torch.Tensor, excluded: torch.Tensor
) -> torch.Tensor:
    """Step 8's weights A_IJ = c_J exp(S_IJ - r_I) for J not in M, 0 for J in M: [B, H, nb, nb]."""
    A = (coarse - row_max[..., None]).exp_().mul_(counts[:, None, None, :])
    return A.masked_fill_(excluded, 0.0)


def coarse_grads(
    A: torch.Tensor,
    u: torch.Tensor,
    w: torch.Tensor,
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    vbar: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dS kbar, dS^T qbar, A^T u) with dS = A * (u vbar^T - w) on [G, nb, ...] matrices, to be
    scaled by 1/sqrt(d) (the first two) and 1 / (c + eps) on the way to the tokens."""
    dS = torch.baddbmm(w[..., None], u, vbar.transpose(1, 2), beta=-1.0).mul_(A)
    return torch.bmm(dS, kbar), torch.bmm(dS.transpose(1, 2), qbar), torch.bmm(A.transpose(1, 2), u)


class _Plan:
    """The chosen blocks of all G slices as flat block rows and columns g * nb + I (row-major
    order, [T] each), cut into chunks of whole block rows."""

    def __init__(self, block_idx: torch.Tensor, nb: int, b: int, d: int):
        G = block_idx.shape[0] * block_idx.shape[1]
        flat = block_idx.reshape(G, -1)
        offset = (torch.arange(G, device=flat.device) * nb)[:, None]
        self.rows = (flat // nb + offset).flatten()
        self.cols = (flat % nb + offset).flatten()
        chunk_blocks = max(1, CHUNK_ELEMENTS // (b * max(b, d)))
        self.chunks = chunk_bounds(self.rows, G * nb, chunk_blocks)
        self.max_chunk = max(t1 - t0 for t0, t1 in self.chunks)

    def buffer(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        """[largest chunk, *shape], allocated once per call and sliced to each chunk (`over`): no
        allocator traffic in the loops."""
        return like.new_empty(self.max_chunk, *shape)

    def over(self, *buffers: torch.Tensor):
        """Per chunk of c blocks from block t0 on: t0, its rows and cols, and each buffer[:c]."""
        for t0, t1 in self.chunks:
            yield t0, self.rows[t0:t1], self.cols[t0:t1], *(x[: t1 - t0] for x in buffers)


class _MRA2Torch(torch.autograd.Function):
    """Differentiable in q, k, v (padded, zeroed, [B, H, n, d]); see the module docstring."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        sel: Selection,
        qbar: torch.Tensor,
        kbar: torch.Tensor,
        vbar: torch.Tensor | None,
    ) -> torch.Tensor:
        B, H, n, d = q.shape
        nb = sel.num_block_rows
        b, R = n // nb, B * H * nb  # R block rows over all slices
        full = vbar is not None
        plan = _Plan(sel.block_idx, nb, b, d)
        qf, kf, vf = (t.view(R, b, d) for t in (q, k, v))
        key_bias = _key_bias(mask, H, b)
        r = sel.row_max.reshape(R, 1)
        m = r.expand(R, b).clone() if full else q.new_full((R, b), EMPTY_ROW_MAX)
        # Per query, the fine part's sum of a_ij v_j and, in column d, of a_ij: the values carry
        # a column of ones, so one matmul and one index_add give both.
        acc = q.new_zeros(R, b, d + 1)
        pv, ks, vs1 = plan.buffer(q, b, d + 1), plan.buffer(q, b, d), plan.buffer(q, b, d + 1)
        s, m_blocks = plan.buffer(q, b, b), plan.buffer(q, b)
        vs1[..., d] = 1.0
        # Each chosen block's b queries as flat positions g * n + i (where its row maxima go).
        queries = torch.arange(b, device=q.device).add(plan.rows[:, None], alpha=b).view(-1)
        m_flat = m.view(-1)
        chunks = plan.over(pv[..., :d], pv, ks, vs1[..., :d], vs1, s, m_blocks)
        for t0, rows, cols, qs, pv_c, ks_c, vs, vs1_c, s_c, m_c in chunks:
            queries_c = queries[t0 * b : (t0 * b + m_c.numel())]
            bias = None if key_bias is None else key_bias[cols]
            s_c = _scores(qf, kf, rows, cols, qs, ks_c, bias, s_c)
            m_flat.scatter_reduce_(0, queries_c, s_c.amax(dim=-1).view(-1), "amax")
            torch.index_select(m_flat, 0, queries_c, out=m_c.view(-1))
            a = s_c.sub_(m_c[..., None]).exp_()
            torch.index_select(vf, 0, cols, out=vs)
            acc.index_add_(0, rows, torch.bmm(a, vs1_c, out=pv_c))  # qs is free
        del pv, ks, vs1, s, m_blocks, queries, chunks
        fine, l_sum = acc[..., :d], acc[..., d]
        A = None
        if full:
            A = coarse_weights(sel.coarse, sel.row_max, sel.counts, sel.excluded)
            scale = (r - m).exp_()  # the coarse part's rescale onto m
            fine.addcmul_(torch.matmul(A, vbar).view(R, 1, d), scale[..., None])
            l_sum.addcmul_(A.sum(dim=-1).view(R, 1), scale)
        l_sum.add_(EPS)
        out = fine.div_(l_sum[..., None]).view(B, H, n, d)  # a view: column d is not copied out
        lse = m.add_(l_sum.log_())
        if key_bias is not None:
            out.mul_(mask[:, None, :, None])
        ctx.save_for_backward(q, k, v, mask, out, lse, sel.row_max, sel.counts, A, qbar, kbar, vbar)
        ctx.plan, ctx.padded = plan, key_bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        with torch.autocast(device_type=dout.device.type, enabled=False):
            return _backward(ctx, dout)


def _backward(ctx, dout: torch.Tensor) -> tuple:
    """dq, dk, dv: the fine part over the chunks, then the coarse part (full mode)."""
    q, k, v, mask, out, lse, row_max, counts, A, qbar, kbar, vbar = ctx.saved_tensors
    plan = ctx.plan
    B, H, n, d = q.shape
    nb = counts.shape[-1]
    b, R, G = n // nb, B * H * nb, B * H
    scale = 1.0 / math.sqrt(d)
    do = dout.reshape(R, b, d)
    qf, kf, vf = (t.view(R, b, d) for t in (q, k, v))
    # Per query -lse_i and -D_i (D_i = dO_i . out_i), gathered together per chunk, where the
    # score matmuls take them as their bias. Padded queries output constant zeros: lse = +inf
    # there gives them P = 0, so no gradient flows back from them.
    neg_stats = torch.stack([lse, torch.einsum("rbd,rbd->rb", do, out.view(R, b, d))], dim=1)
    neg_stats = neg_stats.neg_().unsqueeze_(-1)  # [R, 2, b, 1]
    key_bias = _key_bias(mask, H, b) if ctx.padded else None
    if key_bias is not None:
        padded_query = (mask == 0).repeat_interleave(H, dim=0).view(R, b, 1)
        neg_stats[:, 0].masked_fill_(padded_query, float("-inf"))
    dq, dk, dv = (torch.zeros_like(qf) for _ in range(3))
    # Contiguous buffers: a matmul writing into a strided view takes a slow path on CPU.
    qs, ks, vs, dos = (plan.buffer(q, b, d) for _ in range(4))
    s, ds, st = plan.buffer(q, b, b), plan.buffer(q, b, b), plan.buffer(q, 2, b, 1)
    for _, rows, cols, qs_c, ks_c, vs_c, dos_c, s_c, ds_c, st_c in plan.over(
        qs, ks, vs, dos, s, ds, st
    ):
        torch.index_select(neg_stats, 0, rows, out=st_c)
        neg_lse, neg_delta = st_c[:, 0], st_c[:, 1]
        bias = neg_lse if key_bias is None else torch.add(key_bias[cols], neg_lse, out=s_c)
        p = _scores(qf, kf, rows, cols, qs_c, ks_c, bias, s_c).exp_()  # exp(s_ij - lse_i)
        torch.index_select(vf, 0, cols, out=vs_c)
        torch.index_select(do, 0, rows, out=dos_c)
        ds_c = torch.baddbmm(neg_delta, dos_c, vs_c.transpose(1, 2), out=ds_c).mul_(p)
        # Each block's part of dv, dq, dk, written over gathered values no longer needed.
        dv.index_add_(0, cols, torch.bmm(p.transpose(1, 2), dos_c, out=vs_c))
        dq.index_add_(0, rows, torch.baddbmm(dos_c, ds_c, ks_c, beta=0.0, alpha=scale, out=dos_c))
        dk_c = torch.baddbmm(ks_c, ds_c.transpose(1, 2), qs_c, beta=0.0, alpha=scale, out=ks_c)
        dk.index_add_(0, cols, dk_c)
    del qs, ks, vs, dos, s, ds, st
    if A is not None:
        # weight_i = exp(r_I - lse_i) (0 at padded queries); u_I, w_I as in the module docstring.
        weight = torch.exp(row_max.reshape(R, 1) + neg_stats[:, 0, :, 0])
        u = torch.bmm(weight[:, None, :], do).view(G, nb, d)
        w = (weight * neg_stats[:, 1, :, 0]).sum(dim=-1).neg_().view(G, nb)
        means = (x.view(G, nb, d) for x in (qbar, kbar, vbar))
        dqbar, dkbar, dvbar = coarse_grads(A.view(G, nb, nb), u, w, *means)
        inv_counts = 1.0 / (counts.repeat_interleave(H, dim=0).view(R, 1, 1) + EPS)
        dq.add_(dqbar.view(R, 1, d) * (inv_counts * scale))
        dk.add_(dkbar.view(R, 1, d) * (inv_counts * scale))
        dv.add_(dvbar.view(R, 1, d) * inv_counts)
    shape = (B, H, n, d)
    return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None, None, None


def _key_bias(mask: torch.Tensor, H: int, block_size: int) -> torch.Tensor | None:
    """-1e4 at padded keys, as [G * nb, 1, b] rows to gather per key block (None: no padding)."""
    if bool((mask == 1).all()):
        return None
    bias = -PAD_PENALTY * (1.0 - mask)
    return bias.repeat_interleave(H, dim=0).view(-1, 1, block_size)


def _scores(qf, kf, rows, cols, qs, ks, bias, out) -> torch.Tensor:
    """Gather the chunk's query and key blocks into qs, ks and write s = qs ks^T / sqrt(d) + bias
    (broadcast to [blocks, b, b]; None: no bias) into `out`."""
    torch.index_select(qf, 0, rows, out=qs)
    torch.index_select(kf, 0, cols, out=ks)
    alpha = 1.0 / math.sqrt(qs.shape[-1])
    if bias is None:  # beta=0: out's old contents are ignored
        return torch.baddbmm(out, qs, ks.transpose(1, 2), beta=0.0, alpha=alpha, out=out)
    return torch.baddbmm(bias, qs, ks.transpose(1, 2), alpha=alpha, out=out)


def mra2_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sel: Selection,
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    vbar: torch.Tensor | None,
) -> torch.Tensor:
    """Steps 5-10 on padded, zeroed float inputs [B, H, n, d] and mask [B, n], with
    `selection.prepare`'s results for them; full mode (MRA-2) when `vbar` is given, else sparse.
    No gradient flows into `sel` or the means: the backward carries the coarse part's itself."""
    # float math in the inputs' dtype: autocast would round the scores and clash with the
    # float32 buffers.
    with torch.autocast(device_type=q.device.type, enabled=False):
        means = (None if x is None else x.detach().to(q.dtype) for x in (qbar, kbar, vbar))
        return _MRA2Torch.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask, sel, *means)
