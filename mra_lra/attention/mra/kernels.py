"""MRA-2 and MRA-2-s on Triton: the fine part as a block-sparse FlashAttention, both directions.
Only the `@triton.jit` code lives here; `launch.py` is the host side. The kernels, in launch order:

    selection `_block_stats_kernel` (c, qbar, kbar, vbar), `_coarse_logits_kernel` (S, r, P),
              then torch's top-k
    forward   `_coarse_fwd_kernel` (full mode: A, Ol = A vbar, Nl = A 1), `_mra_fwd_kernel`
    backward  `_bwd_pre_kernel` (D_i, and u_I, w_I in full mode), `_mra_bwd_dq_kernel`,
              `_mra_bwd_dkdv_kernel`

Forward, for a query i in block row I (spec/mra.md, steps 5-10 in one pass):

    start   full mode:  m_i = r_I,  l_i = Nl_I,  acc_i = Ol_I    (the coarse part, stabiliser r_I)
            sparse:     m_i = -1e5, l_i = 0,     acc_i = 0
    for every chosen key block J of row I, keys j in J (online softmax):
            s_ij = q_i . k_j / sqrt(d) - 1e4 (1 - mask_j)
            m'   = max(m_i, max_j s_ij),  alpha = exp(m_i - m'),  p_ij = exp(s_ij - m')
            l_i  = alpha l_i + sum_j p_ij,  acc_i = alpha acc_i + sum_j p_ij v_j,  m_i = m'
    out_i = mask_i acc_i / (l_i + 1e-6),    lse_i = m_i + log(l_i + 1e-6)

The final m_i is the common stabiliser max(r_I, mu_i) of the merge, so this equals the torch path.

Backward, FlashAttention-2 style, recomputing P from lse (no gradient through m, r or selection):

    P_ij = exp(s_ij - lse_i),  D_i = dO_i . out_i,  dS_ij = P_ij (dO_i . v_j - D_i)
    dq_i = sum_j dS_ij k_j / sqrt(d)                      over the forward list of I
    dk_j = sum_i dS_ij q_i / sqrt(d),  dv_j = sum_i P_ij dO_i     over the transposed list of J

Each program owns its output tile, so the backward is deterministic (no atomics). The coarse
part's gradient (u_I, w_I, dS_IJ: reference.py's docstring) reaches every token of a block
through the block means, d qbar_I / d q_i = 1 / (c_I + eps): the dq and dK/dV kernels add it in
their epilogues, so no autograd graph is kept for the selection.

Query tiles: a program handles ROWS consecutive block rows (BLOCK_M = ROWS * block_size query
rows) over the union of their key blocks; a bit per block row says which rows chose each block.
ROWS = 1 is the plain 32 x 32 tile; 2 or 4 feed the tensor cores better (`query_rows`, the
config's `attn.query_rows`).

Gathered steps: each inner-loop step takes GROUP consecutive list entries at once (pointer
arithmetic gathers any blocks as cheaply as contiguous ones), so a 32-row query tile meets
32 * GROUP keys per step, as FlashAttention's 64- or 128-key steps do, with 1/GROUP the rescales
of the online softmax; the dK/dV kernel gathers GROUP query tiles the same way. Entries past the
list's end score -inf. Set with `attn.blocks_per_step` (1, 2, 4); the backward gathers fewer
where its tiles would not fit in shared memory (`backward_group`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mra_lra.attention.mra.selection import EMPTY_ROW_MAX, EPS, PAD_PENALTY, PRIOR_BOOST

_EPS = tl.constexpr(EPS)
_PAD_PENALTY = tl.constexpr(PAD_PENALTY)
_EMPTY_ROW_MAX = tl.constexpr(EMPTY_ROW_MAX)
_PRIOR_BOOST = tl.constexpr(PRIOR_BOOST)


@triton.jit
def _tile_and_slice(num_tiles):
    """This program's (tile along the sequence, slice g = batch * H + head). Every grid is flat,
    num_tiles * B * H programs with tiles fastest (the order a [tiles, B * H] grid runs in): CUDA
    caps a grid's second axis at 65,535, which B * H can pass (a batch of 8,192 with 8 heads)."""
    pid = tl.program_id(0)
    return pid % num_tiles, pid // num_tiles


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    """Load a tile; in the interpreter, upcast (its bfloat16 arithmetic is not to be trusted)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _keep_chosen(s, Bits, entry, entry_ok, row_bit, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """Scores with GROUP gathered list entries along the columns (entry, entry_ok: [N]): -inf
    past the list's end and, with ROWS > 1, where the query's block row (its bit, `row_bit`,
    broadcast against s) did not choose the entry's block."""
    if ROWS > 1:
        bits = tl.load(Bits + entry, mask=entry_ok, other=0)
        s = tl.where(((bits[None, :] >> row_bit) & 1) == 1, s, float("-inf"))
    elif GROUP > 1:
        s = tl.where(entry_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def _gathered_scores(
    q, K, V, Mask, cols, bits, e, end, offs_n, offs_d, d_ok, base, mask_row, num_block_rows,
    stride_n, sm_scale, row_bit, BLOCK: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
    INDEXED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The keys and values of list entries e .. e + GROUP - 1 gathered into one tile, and q's
    scores against them: -1e4 at padded keys, -inf past the list's end or where not chosen. The
    forward and the dq kernel walk the same list with it."""
    entry = e + offs_n // BLOCK
    entry_ok = entry < end
    col = tl.load(cols + entry, mask=entry_ok, other=0)
    if INDEXED:  # flat block indices I * nb + J
        col = col % num_block_rows
    offs_k = col * BLOCK + offs_n % BLOCK
    kv_offs = base + offs_k[:, None] * stride_n + offs_d[None, :]
    k = _load(K + kv_offs, entry_ok[:, None] & d_ok[None, :], UPCAST)
    v = _load(V + kv_offs, entry_ok[:, None] & d_ok[None, :], UPCAST)
    key_bias = _PAD_PENALTY * (tl.load(Mask + mask_row + offs_k) - 1.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale + key_bias[None, :]
    return k, v, _keep_chosen(s, bits, entry, entry_ok, row_bit[:, None], ROWS, GROUP)


@triton.jit
def _mra_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    Mask,
    RowMax,
    Ol,
    Nl,
    TilePtr,
    TileCols,
    TileBits,
    sm_scale,
    num_heads,
    n_pad,
    num_block_rows,
    head_dim,
    stride_g,
    stride_n,
    ptr_stride,
    list_stride,
    FULL: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    INDEXED: tl.constexpr,
    D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile, g = _tile_and_slice(tl.cdiv(num_block_rows, ROWS))
    batch = g // num_heads

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, GROUP * BLOCK)  # keys of GROUP chosen blocks, gathered
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_pad
    d_ok = offs_d < head_dim
    base = g.to(tl.int64) * stride_g
    q_ptrs = Q + base + offs_m[:, None] * stride_n + offs_d[None, :]
    q = _load(q_ptrs, row_ok[:, None] & d_ok[None, :], UPCAST)

    block_row = offs_m // BLOCK
    row_bit = block_row - tile * ROWS
    stat = g.to(tl.int64) * num_block_rows + block_row
    if FULL:
        m_i = tl.load(RowMax + stat, mask=row_ok, other=0.0)
        l_i = tl.load(Nl + stat, mask=row_ok, other=0.0)
        ol_ptrs = Ol + stat[:, None] * head_dim + offs_d[None, :]
        acc = tl.load(ol_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        m_i = tl.full([BLOCK_M], _EMPTY_ROW_MAX, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    list_ptr = TilePtr + g * ptr_stride + tile
    start = tl.load(list_ptr)
    end = tl.load(list_ptr + 1)
    cols = TileCols + g.to(tl.int64) * list_stride  # chosen key blocks, e in start .. end - 1
    bits = TileBits + g.to(tl.int64) * list_stride
    for e in range(start, end, GROUP):
        k, v, s = _gathered_scores(
            q, K, V, Mask, cols, bits, e, end, offs_n, offs_d, d_ok, base, batch * n_pad,
            num_block_rows, stride_n, sm_scale, row_bit, BLOCK, ROWS, GROUP, INDEXED, PRECISION,
            UPCAST,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    query_mask = tl.load(Mask + batch * n_pad + offs_m, mask=row_ok, other=0.0)
    out = acc / (l_i + _EPS)[:, None] * query_mask[:, None]
    out_ptrs = Out + base + offs_m[:, None] * stride_n + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + g.to(tl.int64) * n_pad + offs_m, m_i + tl.log(l_i + _EPS), mask=row_ok)


@triton.jit
def _mra_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    Lse,
    Delta,
    Mask,
    Counts,
    DQbar,
    TilePtr,
    TileCols,
    TileBits,
    sm_scale,
    num_heads,
    n_pad,
    num_block_rows,
    head_dim,
    stride_g,
    stride_n,
    ptr_stride,
    list_stride,
    FULL: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    INDEXED: tl.constexpr,
    D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile, g = _tile_and_slice(tl.cdiv(num_block_rows, ROWS))
    batch = g // num_heads

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, GROUP * BLOCK)  # keys of GROUP chosen blocks, gathered
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < n_pad
    d_ok = offs_d < head_dim
    tile_ok = row_ok[:, None] & d_ok[None, :]
    base = g.to(tl.int64) * stride_g
    q_offs = base + offs_m[:, None] * stride_n + offs_d[None, :]
    q = _load(Q + q_offs, tile_ok, UPCAST)
    # Padded queries output constant zeros: no gradient flows back from them.
    query_real = tl.load(Mask + batch * n_pad + offs_m, mask=row_ok, other=0.0) > 0.5
    do = _load(DO + q_offs, tile_ok & query_real[:, None], UPCAST)
    row_offs = g.to(tl.int64) * n_pad + offs_m
    lse = tl.load(Lse + row_offs, mask=row_ok, other=0.0)
    delta = tl.load(Delta + row_offs, mask=row_ok, other=0.0)
    block_row = offs_m // BLOCK
    row_bit = block_row - tile * ROWS

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    list_ptr = TilePtr + g * ptr_stride + tile
    start = tl.load(list_ptr)
    end = tl.load(list_ptr + 1)
    cols = TileCols + g.to(tl.int64) * list_stride  # chosen key blocks, e in start .. end - 1
    bits = TileBits + g.to(tl.int64) * list_stride
    for e in range(start, end, GROUP):
        # The forward's gathered keys, values and scores.
        k, v, s = _gathered_scores(
            q, K, V, Mask, cols, bits, e, end, offs_n, offs_d, d_ok, base, batch * n_pad,
            num_block_rows, stride_n, sm_scale, row_bit, BLOCK, ROWS, GROUP, INDEXED, PRECISION,
            UPCAST,
        )  # fmt: skip
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    if FULL:
        # The coarse part reaches q_i through qbar_I = sum_{i in I} q_i / (c_I + eps).
        stat = g.to(tl.int64) * num_block_rows + block_row
        inv_count = 1.0 / (
            tl.load(Counts + batch * num_block_rows + block_row, mask=row_ok, other=0.0) + _EPS
        )
        dqbar = tl.load(DQbar + stat[:, None] * head_dim + offs_d[None, :], mask=tile_ok, other=0.0)
        dq += dqbar * inv_count[:, None]
    dq = dq * sm_scale
    tl.store(DQ + q_offs, dq.to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def _mra_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    Lse,
    Delta,
    Mask,
    Counts,
    DKbar,
    DVbar,
    KeyPtr,
    KeyTiles,
    KeyBits,
    sm_scale,
    num_heads,
    n_pad,
    num_block_rows,
    head_dim,
    stride_g,
    stride_n,
    ptr_stride,
    list_stride,
    FULL: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
    INDEXED: tl.constexpr,
    D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    key_block, g = _tile_and_slice(num_block_rows)
    batch = g // num_heads

    offs_k = key_block * BLOCK + tl.arange(0, BLOCK)
    offs_g = tl.arange(0, GROUP * BLOCK_M)  # queries of GROUP query tiles, gathered
    slot = offs_g // BLOCK_M
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    base = g.to(tl.int64) * stride_g
    kv_offs = base + offs_k[:, None] * stride_n + offs_d[None, :]
    k = _load(K + kv_offs, d_ok[None, :], UPCAST)
    v = _load(V + kv_offs, d_ok[None, :], UPCAST)
    key_bias = _PAD_PENALTY * (tl.load(Mask + batch * n_pad + offs_k) - 1.0)
    row_bit = offs_g % BLOCK_M // BLOCK

    dk = tl.zeros([BLOCK, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK, D_PAD], tl.float32)
    list_ptr = KeyPtr + g * ptr_stride + key_block
    key_tiles = KeyTiles + g.to(tl.int64) * list_stride
    key_bits = KeyBits + g.to(tl.int64) * list_stride
    start = tl.load(list_ptr)
    end = tl.load(list_ptr + 1)
    for e in range(start, end, GROUP):
        entry = e + slot
        entry_ok = entry < end
        query_tile = tl.load(key_tiles + entry, mask=entry_ok, other=0)
        if INDEXED:  # flat block indices I * nb + J (one block row per tile)
            query_tile = query_tile // num_block_rows
        offs_m = query_tile * BLOCK_M + offs_g % BLOCK_M
        row_ok = entry_ok & (offs_m < n_pad)
        tile_ok = row_ok[:, None] & d_ok[None, :]
        q_offs = base + offs_m[:, None] * stride_n + offs_d[None, :]
        q = _load(Q + q_offs, tile_ok, UPCAST)
        query_real = tl.load(Mask + batch * n_pad + offs_m, mask=row_ok, other=0.0) > 0.5
        do = _load(DO + q_offs, tile_ok & query_real[:, None], UPCAST)
        row_offs = g.to(tl.int64) * n_pad + offs_m
        lse = tl.load(Lse + row_offs, mask=row_ok, other=0.0)
        delta = tl.load(Delta + row_offs, mask=row_ok, other=0.0)
        # Transposed scores: keys along rows, queries along columns.
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * sm_scale + key_bias[:, None]
        st = _keep_chosen(st, key_bits, entry, entry_ok, row_bit[None, :], ROWS, GROUP)
        pt = tl.exp(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    if FULL:
        # ... and k_j, v_j through kbar_J and vbar_J (sums over J divided by c_J + eps).
        stat = (g.to(tl.int64) * num_block_rows + key_block) * head_dim + offs_d
        inv_count = 1.0 / (tl.load(Counts + batch * num_block_rows + key_block) + _EPS)
        dk += tl.load(DKbar + stat, mask=d_ok, other=0.0)[None, :] * inv_count
        dv += tl.load(DVbar + stat, mask=d_ok, other=0.0)[None, :] * inv_count
    dk = dk * sm_scale
    tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=d_ok[None, :])
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=d_ok[None, :])


@triton.jit
def _coarse_fwd_kernel(
    S,
    RowMax,
    Excluded,
    Counts,
    Vbar,
    A,
    Ol,
    Nl,
    num_heads,
    num_block_rows,
    head_dim,
    STORE_A: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Step 8 for BLOCK_I block rows: A_IJ = c_J exp(S_IJ - r_I) off M, Ol = A vbar, Nl = A 1."""
    pid, g = _tile_and_slice(tl.cdiv(num_block_rows, BLOCK_I))
    batch = g // num_heads
    nb = num_block_rows
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, D_PAD)
    i_ok = offs_i < nb
    d_ok = offs_d < head_dim
    row_max = tl.load(RowMax + g * nb + offs_i, mask=i_ok, other=0.0)
    grid_rows = g.to(tl.int64) * nb * nb + offs_i[:, None] * nb
    acc = tl.zeros([BLOCK_I, D_PAD], tl.float32)
    nl = tl.zeros([BLOCK_I], tl.float32)
    for j0 in range(0, nb, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < nb
        ok = i_ok[:, None] & j_ok[None, :]
        s = tl.load(S + grid_rows + offs_j[None, :], mask=ok, other=0.0)
        excluded = tl.load(Excluded + grid_rows + offs_j[None, :], mask=ok, other=1)
        count = tl.load(Counts + batch * nb + offs_j, mask=j_ok, other=0.0)
        a = tl.where(excluded == 0, count[None, :] * tl.exp(s - row_max[:, None]), 0.0)
        if STORE_A:
            tl.store(A + grid_rows + offs_j[None, :], a, mask=ok)
        nl += tl.sum(a, 1)
        vbar_ptrs = Vbar + (g.to(tl.int64) * nb + offs_j)[:, None] * head_dim + offs_d[None, :]
        vbar = tl.load(vbar_ptrs, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(a, vbar, input_precision="ieee")
    stat = g.to(tl.int64) * nb + offs_i
    tl.store(
        Ol + stat[:, None] * head_dim + offs_d[None, :], acc, mask=i_ok[:, None] & d_ok[None, :]
    )
    tl.store(Nl + stat, nl, mask=i_ok)


@triton.jit
def _bwd_pre_kernel(
    Out,
    DO,
    Mask,
    Lse,
    RowMax,
    Delta,
    U,
    W,
    num_heads,
    n_pad,
    num_block_rows,
    head_dim,
    stride_g,
    stride_n,
    FULL: tl.constexpr,
    BLOCK: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Per block row I: D_i = dO_i . out_i and, in full mode, u_I = sum_i exp(r_I - lse_i) dO_i,
    w_I = sum_i exp(r_I - lse_i) D_i (dO zero at padded queries)."""
    block_row, g = _tile_and_slice(num_block_rows)
    batch = g // num_heads
    offs_m = block_row * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    offs = g.to(tl.int64) * stride_g + offs_m[:, None] * stride_n + offs_d[None, :]
    query_real = tl.load(Mask + batch * n_pad + offs_m) > 0.5
    do = tl.load(DO + offs, mask=d_ok[None, :] & query_real[:, None], other=0.0).to(tl.float32)
    out = tl.load(Out + offs, mask=d_ok[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(do * out, 1)
    row_offs = g.to(tl.int64) * n_pad + offs_m
    tl.store(Delta + row_offs, delta)
    if FULL:
        stat = g.to(tl.int64) * num_block_rows + block_row
        weight = tl.exp(tl.load(RowMax + stat) - tl.load(Lse + row_offs))
        tl.store(U + stat * head_dim + offs_d, tl.sum(weight[:, None] * do, 0), mask=d_ok)
        tl.store(W + stat, tl.sum(weight * delta, 0))


@triton.jit
def _block_stats_kernel(
    Q,
    K,
    V,
    Mask,
    Qbar,
    Kbar,
    Vbar,
    Counts,
    num_heads,
    n_pad,
    num_block_rows,
    head_dim,
    stride_g,
    stride_n,
    WITH_V: tl.constexpr,
    BLOCK: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Step 2 for block J of slice g: c_J and the float32 block means of (zeroed) q, k, v."""
    block, g = _tile_and_slice(num_block_rows)
    batch = g // num_heads
    offs_m = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    count = tl.sum(tl.load(Mask + batch * n_pad + offs_m), 0)
    denominator = count + _EPS
    offs = g.to(tl.int64) * stride_g + offs_m[:, None] * stride_n + offs_d[None, :]
    stat = (g.to(tl.int64) * num_block_rows + block) * head_dim + offs_d
    q = tl.load(Q + offs, mask=d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(Qbar + stat, tl.sum(q, 0) / denominator, mask=d_ok)
    k = tl.load(K + offs, mask=d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(Kbar + stat, tl.sum(k, 0) / denominator, mask=d_ok)
    if WITH_V:
        v = tl.load(V + offs, mask=d_ok[None, :], other=0.0).to(tl.float32)
        tl.store(Vbar + stat, tl.sum(v, 0) / denominator, mask=d_ok)
    tl.store(Counts + batch * num_block_rows + block, count, mask=g % num_heads == 0)


@triton.jit
def _coarse_logits_kernel(
    Qbar,
    Kbar,
    Counts,
    S,
    P,
    RowMax,
    num_heads,
    num_block_rows,
    head_dim,
    sm_scale,
    first_n_blocks,
    diagonal_reach,
    PADDED: tl.constexpr,
    PRIORS: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """Steps 3-4 up to the top-k, for BLOCK_I block rows: S = qbar kbar^T / sqrt(d), r = its row
    max before the padding penalty, S after it, and P = S - r + prior bonus. Two passes over the
    block columns (the first finds r), recomputing S: it is small next to reading it back."""
    pid, g = _tile_and_slice(tl.cdiv(num_block_rows, BLOCK_I))
    batch = g // num_heads
    nb = num_block_rows
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, D_PAD)
    i_ok = offs_i < nb
    d_ok = offs_d < head_dim
    stat_i = g.to(tl.int64) * nb + offs_i
    qbar = tl.load(
        Qbar + stat_i[:, None] * head_dim + offs_d[None, :],
        mask=i_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    row_max = tl.full([BLOCK_I], float("-inf"), tl.float32)
    for j0 in range(0, nb, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < nb
        kbar_ptrs = Kbar + (g.to(tl.int64) * nb + offs_j)[:, None] * head_dim + offs_d[None, :]
        kbar = tl.load(kbar_ptrs, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qbar, tl.trans(kbar), input_precision="ieee") * sm_scale
        row_max = tl.maximum(row_max, tl.max(tl.where(j_ok[None, :], s, float("-inf")), 1))
    count_i = tl.load(Counts + batch * nb + offs_i, mask=i_ok, other=0.0)
    grid_rows = g.to(tl.int64) * nb * nb + offs_i[:, None] * nb
    for j0 in range(0, nb, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < nb
        kbar_ptrs = Kbar + (g.to(tl.int64) * nb + offs_j)[:, None] * head_dim + offs_d[None, :]
        kbar = tl.load(kbar_ptrs, mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(qbar, tl.trans(kbar), input_precision="ieee") * sm_scale
        if PADDED:
            count_j = tl.load(Counts + batch * nb + offs_j, mask=j_ok, other=0.0)
            empty = (count_i[:, None] * count_j[None, :]) < 0.5
            s = s - _PAD_PENALTY * empty.to(tl.float32)
        p = s - row_max[:, None]
        if PRIORS:
            reach = offs_i[:, None] - offs_j[None, :]
            near = (reach <= diagonal_reach) & (reach >= -diagonal_reach)
            bonus = tl.where(near, _PRIOR_BOOST, 0.0)
            bonus += tl.where((offs_i < first_n_blocks)[:, None], _PRIOR_BOOST, 0.0)
            bonus += tl.where((offs_j < first_n_blocks)[None, :], _PRIOR_BOOST, 0.0)
            p = p + bonus
        ok = i_ok[:, None] & j_ok[None, :]
        tl.store(S + grid_rows + offs_j[None, :], s, mask=ok)
        tl.store(P + grid_rows + offs_j[None, :], p, mask=ok)
    tl.store(RowMax + stat_i, row_max, mask=i_ok)
