"""MRA-2 / MRA-2-s in plain torch: the reference path, and what CPU users train with.

For a query i in block I (full mode), with the chosen block set from `selection.prepare`:

    A(i, j) ~ exp(q_i . k_j / sqrt d)          for j in a chosen block (I, J)       (fine part)
    A(i, j) ~ exp(qbar_I . kbar_J / sqrt d)    for j in an unrefined block J        (coarse part)
    out_i = sum_j A(i, j) v_j / sum_j A(i, j)

`mra2_torch` is one autograd Function with a FlashAttention-style backward, so that a step's
memory stays near that of q, k, v and their gradients:

- Forward. The chosen blocks of all slices, in row-major order, are cut into chunks of whole
  block rows (`BlockPlan`). Per chunk: gather the blocks' q, k, v, score them with one batched
  matmul, take each query's stabiliser m_i = max(r_I, mu_i) (full mode; mu_i alone in sparse
  mode), and sum exp(s_ij - m_i) v_j back per block row. The coarse part (step 8, on the small
  nb x nb matrices) is put on the same stabiliser, which is the merge of step 9. Saved: q, k, v,
  the output and each query's log-sum-exp lse_i = m_i + log(l_i + eps), nothing per block.
- Backward, over the same chunks, recomputing the probabilities P_ij = exp(s_ij - lse_i):

      D_i = dO_i . out_i,   dS_ij = P_ij (dO_i . v_j - D_i)
      dq_i += sum_j dS_ij k_j / sqrt(d),   dk_j += sum_i dS_ij q_i / sqrt(d),
      dv_j += sum_i P_ij dO_i

  The coarse entries act as extra softmax entries with logit S_IJ + log c_J and value vbar_J;
  with A_IJ = c_J exp(S_IJ - r_I) (0 for J in M), u_I = sum_{i in I} exp(r_I - lse_i) dO_i and
  w_I = sum_{i in I} exp(r_I - lse_i) D_i:

      dS_IJ = A_IJ (u_I . vbar_J - w_I),   dvbar_J = sum_I A_IJ u_I,

  carried on to q, k, v here, through S = qbar kbar^T / sqrt(d) and the block means
  (d qbar_I / d q_i = 1 / (c_I + eps) for i in I), straight into dq, dk, dv: no autograd graph
  through sel.coarse and vbar, whose [B, H, n, d]-sized gradient copies would add to the peak.

Chunks bound the memory of the gathered blocks and keep them in cache; every sum runs in a fixed
order (index_add on CPU adds in index order), so the backward is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mra_lra.attention.mra import selection
from mra_lra.attention.mra.selection import EMPTY_ROW_MAX, EPS, PAD_PENALTY, Selection

# Elements of one gathered [blocks, b, max(b, d)] tensor per chunk: 2 MiB in float32, which keeps
# a chunk's working set (a handful of such tensors) inside a CPU's L2/L3 cache.
CHUNK_ELEMENTS = 2**19


@dataclass
class BlockPlan:
    """The chosen blocks of all G = B*H slices as flat block indices, cut into chunks.

    rows, cols:   [T] query and key block of each chosen block, as g * nb + I (row-major order)
    row_ids:      [U] the distinct query blocks that have a chosen block (ascending)
    row_of_block: [T] position of each chosen block's query block in row_ids
    chunks:       (t0, t1, u0, u1): blocks t0:t1, which are exactly the blocks of rows u0:u1
    """

    rows: torch.Tensor
    cols: torch.Tensor
    row_ids: torch.Tensor
    row_of_block: torch.Tensor
    chunks: list[tuple[int, int, int, int]]

    @property
    def max_chunk(self) -> int:
        return max(t1 - t0 for t0, t1, _, _ in self.chunks)


def block_plan(block_idx: torch.Tensor, nb: int, chunk_blocks: int) -> BlockPlan:
    """Flatten [B, H, k_sel] chosen indices and cut them into chunks of whole block rows, each of
    at most `chunk_blocks` blocks unless one block row alone has more."""
    G = block_idx.shape[0] * block_idx.shape[1]
    flat = block_idx.reshape(G, -1)
    offset = (torch.arange(G, device=flat.device) * nb)[:, None]
    rows = (flat // nb + offset).flatten()
    cols = (flat % nb + offset).flatten()
    row_ids, row_of_block, counts = torch.unique_consecutive(
        rows, return_inverse=True, return_counts=True
    )
    chunks, t0, u0, t = [], 0, 0, 0
    for u, count in enumerate(counts.tolist()):
        if t + count - t0 > chunk_blocks and t > t0:
            chunks.append((t0, t, u0, u))
            t0, u0 = t, u
        t += count
    chunks.append((t0, t, u0, len(counts)))
    return BlockPlan(rows, cols, row_ids, row_of_block, chunks)


def coarse_weights(
    coarse: torch.Tensor, row_max: torch.Tensor, counts: torch.Tensor, excluded: torch.Tensor
) -> torch.Tensor:
    """Step 8's weights A_IJ = c_J exp(S_IJ - r_I) for J not in M, 0 for J in M: [B, H, nb, nb].

    The coarse part is Ol_I = sum_J A_IJ vbar_J, Nl_I = sum_J A_IJ, on the stabiliser r_I.
    """
    A = (coarse - row_max[..., None]).exp_().mul_(counts[:, None, None, :])
    return A.masked_fill_(excluded, 0.0)


class _Workspace:
    """Chunk buffers allocated once per call and reused by every chunk (sliced to its length):
    no allocator traffic in the loops, and a step's peak memory does not depend on chunk sizes.
    `values` name [blocks, b, d] buffers, `scores` name [blocks, b, b] ones."""

    def __init__(self, like: torch.Tensor, blocks: int, b: int, d: int, values: str, scores: str):
        for name in values.split():
            setattr(self, name, like.new_empty(blocks, b, d))
        for name in scores.split():
            setattr(self, name, like.new_empty(blocks, b, b))


class _MRA2Torch(torch.autograd.Function):
    """Differentiable in q, k, v (padded, zeroed, [B, H, n, d]); in full mode the gradient of the
    coarse part reaches them through the block means, computed here (see `mra2_torch`)."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        sel: Selection,
        vbar: torch.Tensor | None,
        plan: BlockPlan,
        block_size: int,
    ) -> torch.Tensor:
        B, H, n, d = q.shape
        b, nb, G = block_size, n // block_size, B * H
        full = vbar is not None
        scale = 1.0 / math.sqrt(d)
        qf, kf, vf = (t.view(G * nb, b, d) for t in (q, k, v))
        key_bias = _key_bias(mask, H, b)
        r = sel.row_max.reshape(G * nb)
        # Rows without a chosen block keep the initial out and lse: the coarse part alone on its
        # stabiliser r_I (full mode), zeros (sparse mode). The stabiliser of a row with chosen
        # blocks starts at r_I (full) or EMPTY_ROW_MAX (sparse); row_* follow plan.row_ids.
        if full:
            A = coarse_weights(sel.coarse.detach(), sel.row_max, sel.counts, sel.excluded)
            Ol = torch.matmul(A, vbar).view(G * nb, d)
            Nl = A.sum(dim=-1).view(G * nb)
            del A
            out = (Ol / (Nl + EPS)[:, None])[:, None, :].expand(-1, b, -1).contiguous()
            lse = (r + torch.log(Nl + EPS))[:, None].expand(-1, b).contiguous()
            row_r, row_Ol, row_Nl = (x[plan.row_ids] for x in (r, Ol, Nl))
            m_start = row_r[:, None].expand(-1, b)
        else:
            out = q.new_zeros(G * nb, b, d)
            lse = q.new_full((G * nb, b), EMPTY_ROW_MAX)
            m_start = q.new_full((1, 1), EMPTY_ROW_MAX).expand(len(plan.row_ids), b)
        ws = _Workspace(q, plan.max_chunk, b, d, "qs ks vs", "s")
        for t0, t1, u0, u1 in plan.chunks:
            c, rows, cols = t1 - t0, plan.rows[t0:t1], plan.cols[t0:t1]
            row_ids, local = plan.row_ids[u0:u1], plan.row_of_block[t0:t1] - u0
            qs, ks, vs, s = (x[:c] for x in (ws.qs, ws.ks, ws.vs, ws.s))
            torch.index_select(qf, 0, rows, out=qs)
            torch.index_select(kf, 0, cols, out=ks)
            torch.index_select(vf, 0, cols, out=vs)
            _scores(qs, ks, key_bias, cols, scale, s)
            # Stabiliser per query: the max over its chosen entries (and r_I in full mode).
            m = m_start[u0:u1].clone()
            m.scatter_reduce_(0, local[:, None].expand(-1, b), s.amax(dim=-1), "amax")
            a = s.sub_(m[local][:, :, None]).exp_()
            pv = torch.bmm(a, vs, out=ks)  # ks is free once the scores are taken
            acc = q.new_zeros(u1 - u0, b, d).index_add_(0, local, pv)
            l_sum = q.new_zeros(u1 - u0, b).index_add_(0, local, a.sum(dim=-1))
            if full:
                w = (row_r[u0:u1, None] - m).exp_()
                acc.addcmul_(row_Ol[u0:u1, None, :], w[..., None])
                l_sum.addcmul_(row_Nl[u0:u1, None], w)
            l_sum.add_(EPS)
            out.index_copy_(0, row_ids, acc.div_(l_sum[..., None]))
            lse.index_copy_(0, row_ids, m.add_(l_sum.log_()))
        del ws
        out = out.view(B, H, n, d)
        if key_bias is not None:
            out.mul_(mask[:, None, :, None])
        ctx.save_for_backward(q, k, v, mask, vbar, out, lse, sel.row_max, sel.counts, sel.excluded)
        ctx.plan, ctx.block_size = plan, block_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        with torch.autocast(device_type=dout.device.type, enabled=False):
            return _backward(ctx, dout)


def _backward(ctx, dout: torch.Tensor) -> tuple:
    """dq, dk, dv: the fine part over the chunks, then the coarse part (full mode)."""
    q, k, v, mask, vbar, out, lse, row_max, counts, excluded = ctx.saved_tensors
    plan, b = ctx.plan, ctx.block_size
    B, H, n, d = q.shape
    nb, G = n // b, B * H
    scale = 1.0 / math.sqrt(d)
    do = dout.reshape(G * nb, b, d)
    # Padded queries output constant zeros: no gradient flows back from them. Their out_i is
    # 0, so D_i is too; their dO_i is masked per chunk (not copied whole).
    query_mask = mask.repeat_interleave(H, dim=0).view(G * nb, b)
    has_padding = bool((query_mask == 0).any())
    delta = torch.einsum("rbd,rbd->rb", do, out.view(G * nb, b, d))
    qf, kf, vf = (t.view(G * nb, b, d) for t in (q, k, v))
    key_bias = _key_bias(mask, H, b)
    dq, dk, dv = (torch.zeros_like(qf) for _ in range(3))
    ws = _Workspace(q, plan.max_chunk, b, d, "qs ks vs dos", "s ds")
    for t0, t1, _, _ in plan.chunks:
        c, rows, cols = t1 - t0, plan.rows[t0:t1], plan.cols[t0:t1]
        qs, ks, vs, dos, s, ds = (x[:c] for x in (ws.qs, ws.ks, ws.vs, ws.dos, ws.s, ws.ds))
        torch.index_select(qf, 0, rows, out=qs)
        torch.index_select(kf, 0, cols, out=ks)
        torch.index_select(vf, 0, cols, out=vs)
        torch.index_select(do, 0, rows, out=dos)
        if has_padding:
            dos.mul_(query_mask[rows][:, :, None])
        _scores(qs, ks, key_bias, cols, scale, s)
        p = s.sub_(lse[rows][:, :, None]).exp_()
        torch.bmm(dos, vs.transpose(1, 2), out=ds)
        part = vs  # free from here on: holds each block's dv, dq, dk contribution in turn
        dv.index_add_(0, cols, torch.bmm(p.transpose(1, 2), dos, out=part))
        ds.sub_(delta[rows][:, :, None]).mul_(p).mul_(scale)  # dS / sqrt(d)
        dq.index_add_(0, rows, torch.bmm(ds, ks, out=part))
        dk.index_add_(0, cols, torch.bmm(ds.transpose(1, 2), qs, out=part))
    del ws
    if vbar is not None:
        _coarse_backward(
            q, k, do, delta, lse, query_mask, vbar, row_max, counts, excluded, dq, dk, dv, b
        )
    shape = (B, H, n, d)
    return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None, None, None


def _coarse_backward(
    q, k, do, delta, lse, query_mask, vbar, row_max, counts, excluded, dq, dk, dv, b
):
    """Add the coarse part's gradient to dq, dk, dv (in place), through S and the block means."""
    B, H, n, d = q.shape
    nb = n // b
    qbar = selection.block_means(q, counts, b)
    kbar = selection.block_means(k, counts, b)
    S, _ = selection.coarse_logits(qbar, kbar, counts)
    A = coarse_weights(S, row_max, counts, excluded)
    weight = torch.exp(row_max.reshape(-1, 1) - lse).mul_(query_mask)  # exp(r_I - lse_i)
    u = torch.bmm(weight[:, None, :], do).view(B, H, nb, d)
    w = (weight * delta).sum(dim=-1).view(B, H, nb)
    dS = torch.matmul(u, vbar.transpose(-1, -2)).sub_(w[..., None]).mul_(A)
    inv_counts = 1.0 / (counts[:, None, :, None] + EPS)  # d(block mean) / d(token)
    dqbar = torch.matmul(dS, kbar).mul_(inv_counts / math.sqrt(d))
    dkbar = torch.matmul(dS.transpose(-1, -2), qbar).mul_(inv_counts / math.sqrt(d))
    dvbar = torch.matmul(A.transpose(-1, -2), u).mul_(inv_counts)
    for grad, gbar in ((dq, dqbar), (dk, dkbar), (dv, dvbar)):
        grad.view(B, H, nb, b, d).add_(gbar[:, :, :, None, :])


def _key_bias(mask: torch.Tensor, H: int, block_size: int) -> torch.Tensor | None:
    """-1e4 at padded keys, as [G * nb, 1, b] rows to gather per key block (None: no padding)."""
    if bool((mask == 1).all()):
        return None
    bias = -PAD_PENALTY * (1.0 - mask)
    return bias.repeat_interleave(H, dim=0).view(-1, 1, block_size)


def _scores(
    qs: torch.Tensor,
    ks: torch.Tensor,
    key_bias: torch.Tensor | None,
    cols: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """s = qs ks^T / sqrt(d) + key bias, written into `out` ([blocks, b, b])."""
    if key_bias is None:  # beta=0: out's old contents are ignored, no bias to copy in
        return torch.baddbmm(out, qs, ks.transpose(1, 2), beta=0.0, alpha=scale, out=out)
    return torch.baddbmm(key_bias[cols], qs, ks.transpose(1, 2), alpha=scale, out=out)


def mra2_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sel: Selection,
    vbar: torch.Tensor | None,
) -> torch.Tensor:
    """Steps 5-10 on padded, zeroed float inputs [B, H, n, d] and mask [B, n]; returns
    [B, H, n, d]. Full mode (MRA-2) when `vbar` is given, sparse mode (MRA-2-s) when it is None.

    `sel` and `vbar` must be `selection.prepare`'s results for these q, k, v and mask.
    Gradients reach q, k, v through the fine part and, in full mode, through the block means of
    the coarse part; that second path is computed here from q, k, v, so no gradient flows into
    `sel.coarse` or `vbar` themselves (none through the selection, r or mu either).
    """
    B, H, n, d = q.shape
    block_size = n // sel.num_block_rows
    chunk_blocks = max(1, CHUNK_ELEMENTS // (block_size * max(block_size, d)))
    plan = block_plan(sel.block_idx, sel.num_block_rows, chunk_blocks)
    # float math in the inputs' dtype: autocast would round the scores and clash with the
    # float32 buffers.
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _MRA2Torch.apply(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            mask,
            sel,
            None if vbar is None else vbar.detach(),
            plan,
            block_size,
        )
