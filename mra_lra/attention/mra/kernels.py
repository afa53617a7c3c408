"""MRA-2 and MRA-2-s on Triton: the fine part as a block-sparse FlashAttention, both directions.

Everything is a few launches, because at moderate sizes the op count, not the arithmetic, sets
the time:

    selection `_block_stats_kernel` (c, qbar, kbar, vbar), `_coarse_logits_kernel` (S, r, P),
              torch's top-k (`prepare_fused`; on a GPU every MRA path selects this way, so all
              choose the same blocks, see `selection.choose`)
    forward   lists of chosen blocks (`block_lists`: for 32-row tiles the sorted indices
              themselves, one searchsorted, one stable sort), `_coarse_fwd_kernel` (full mode:
              A, Ol = A vbar, Nl = A 1), `_mra_fwd_kernel`
    backward  `_bwd_pre_kernel` (D_i, and u_I, w_I in full mode), four batched matmuls on the
              nb x nb matrices (full mode), `_mra_bwd_dq_kernel`, `_mra_bwd_dkdv_kernel`

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
entries act as extra softmax entries with logit S_IJ + log c_J and value vbar_J; with
u_I = sum_{i in I} exp(r_I - lse_i) dO_i and w_I = sum_{i in I} exp(r_I - lse_i) D_i:

    dS_IJ = A_IJ (u_I . vbar_J - w_I),   dvbar_J = sum_I A_IJ u_I,
    A_IJ = c_J exp(S_IJ - r_I) for J not in M, else 0,

and dqbar = dS kbar / sqrt(d), dkbar = dS^T qbar / sqrt(d) reach every token of a block through
the block means (d qbar_I / d q_i = 1 / (c_I + eps)): the dq and dK/dV kernels add them in their
epilogues, so no autograd graph is kept for the selection.

Query tiles: a program handles ROWS consecutive block rows (BLOCK_M = ROWS * block_size query
rows) over the union of their key blocks; a bit per block row says which rows chose each block.
ROWS = 1 is the plain 32 x 32 tile; 2 or 4 feed the tensor cores better (`query_rows`, the
config's `attn.query_rows`).

Gathered steps: each inner-loop step takes GROUP consecutive list entries at once (pointer
arithmetic gathers any blocks as cheaply as contiguous ones), so a 32-row query tile meets
32 * GROUP keys per step, as FlashAttention's 64- or 128-key steps do, with 1/GROUP the rescales
of the online softmax; the dK/dV kernel gathers GROUP query tiles the same way. Entries past the
list's end score -inf. Set with `blocks_per_step` (`attn.blocks_per_step`: 1, 2, 4). The
backward kernels gather fewer where their tiles would not fit in shared memory
(`backward_group`); the function is the same at every setting.

Launch settings: num_warps and num_stages follow the tile size (`_launch_settings`), so each
kernel compiles once per shape class; MRA_TRITON_AUTOTUNE=1 (read at import) autotunes them
instead, at the price of compiling several variants.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mra_lra.attention.mra import check_tiles, selection
from mra_lra.attention.mra.selection import EMPTY_ROW_MAX, EPS, PAD_PENALTY, PRIOR_BOOST

# triton.jit picks the interpreter when it decorates, from the same variable; the interpreter
# runs on CPU tensors and cannot autotune.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
AUTOTUNE = os.environ.get("MRA_TRITON_AUTOTUNE", "0") == "1" and not INTERPRET
MAX_HEAD_DIM = selection.FUSED_MAX_HEAD_DIM

_EPS = tl.constexpr(EPS)
_PAD_PENALTY = tl.constexpr(PAD_PENALTY)
_EMPTY_ROW_MAX = tl.constexpr(EMPTY_ROW_MAX)
_PRIOR_BOOST = tl.constexpr(PRIOR_BOOST)


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Few warps for 32-row (or 32-key) tiles, more for 128-row ones."""
    args = {**named_args, **kwargs}
    size = args["ROWS"] * args["GROUP"]
    keep = [c for c in configs if size <= c.num_warps <= 4 * size]
    return keep or configs


def _autotuned(kernel, key: list[str]):
    if not AUTOTUNE:
        return kernel
    configs = [
        triton.Config({}, num_warps=w, num_stages=s)
        for w, s in ((2, 2), (4, 2), (4, 3), (8, 2), (8, 1))
    ]
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": _prune_configs}
    )(kernel)


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
    q,
    K,
    V,
    Mask,
    TileCols,
    TileBits,
    e,
    end,
    offs_n,
    row_bit,
    offs_d,
    d_ok,
    base,
    mask_base,
    sm_scale,
    stride_n,
    num_block_rows,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP: tl.constexpr,
    INDEXED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One loop step of the forward and dq kernels: the keys and values of list entries
    e .. e + GROUP - 1 gathered into one tile (offs_n = arange(GROUP * BLOCK)), and the scores
    of the query tile q against them, -1e4 at padded keys and -inf where not chosen. INDEXED:
    the entries are flat block indices I * nb + J, else key blocks J."""
    entry = e + offs_n // BLOCK
    entry_ok = entry < end
    col = tl.load(TileCols + entry, mask=entry_ok, other=0)
    if INDEXED:
        col = col % num_block_rows
    offs_k = col * BLOCK + offs_n % BLOCK
    kv_offs = base + offs_k[:, None] * stride_n + offs_d[None, :]
    k = _load(K + kv_offs, entry_ok[:, None] & d_ok[None, :], UPCAST)
    v = _load(V + kv_offs, entry_ok[:, None] & d_ok[None, :], UPCAST)
    key_bias = _PAD_PENALTY * (tl.load(Mask + mask_base + offs_k) - 1.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale + key_bias[None, :]
    s = _keep_chosen(s, TileBits, entry, entry_ok, row_bit[:, None], ROWS, GROUP)
    return s, k, v


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
    for e in range(start, end, GROUP):
        s, k, v = _gathered_scores(
            q,
            K,
            V,
            Mask,
            TileCols + g.to(tl.int64) * list_stride,
            TileBits + g.to(tl.int64) * list_stride,
            e,
            end,
            offs_n,
            row_bit,
            offs_d,
            d_ok,
            base,
            batch * n_pad,
            sm_scale,
            stride_n,
            num_block_rows,
            BLOCK,
            ROWS,
            GROUP,
            INDEXED,
            PRECISION,
            UPCAST,
        )
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
    for e in range(start, end, GROUP):
        s, k, v = _gathered_scores(
            q,
            K,
            V,
            Mask,
            TileCols + g.to(tl.int64) * list_stride,
            TileBits + g.to(tl.int64) * list_stride,
            e,
            end,
            offs_n,
            row_bit,
            offs_d,
            d_ok,
            base,
            batch * n_pad,
            sm_scale,
            stride_n,
            num_block_rows,
            BLOCK,
            ROWS,
            GROUP,
            INDEXED,
            PRECISION,
            UPCAST,
        )
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


_TUNE_KEY = ["FULL", "BLOCK", "ROWS", "GROUP", "D_PAD"]
_mra_fwd = _autotuned(_mra_fwd_kernel, _TUNE_KEY)
_mra_bwd_dq = _autotuned(_mra_bwd_dq_kernel, _TUNE_KEY)
_mra_bwd_dkdv = _autotuned(_mra_bwd_dkdv_kernel, _TUNE_KEY)
_coarse_fwd = _coarse_fwd_kernel
_bwd_pre = _bwd_pre_kernel
_block_stats = _block_stats_kernel
_coarse_logits = _coarse_logits_kernel
# The kernels launched from the host, by module attribute (bench.profile_mra counts them).
LAUNCHED = (
    "_block_stats",
    "_coarse_logits",
    "_coarse_fwd",
    "_mra_fwd",
    "_bwd_pre",
    "_mra_bwd_dq",
    "_mra_bwd_dkdv",
)


@dataclass
class BlockLists:
    """The chosen blocks of all G slices in two compressed-row layouts.

    Forward: query tile t of slice g (ROWS block rows) owns entries tile_ptr[g * ptr_stride + t]
    .. tile_ptr[g * ptr_stride + t + 1] - 1, counted from g * list_stride, of tile_cols (its key
    blocks, ascending) and tile_bits (bit r set when block row t * ROWS + r chose the block).
    Transposed: key block J of slice g owns entries key_ptr[g * key_ptr_stride + J] .. of
    key_tiles (its query tiles) and key_bits. `indexed`: the entries are flat indices I * nb + J
    (key block J = entry mod nb, query tile I = entry div nb; one row per tile, bits unused),
    else the block and tile numbers themselves.
    """

    tile_ptr: torch.Tensor
    tile_cols: torch.Tensor
    tile_bits: torch.Tensor
    key_ptr: torch.Tensor | None
    key_tiles: torch.Tensor | None
    key_bits: torch.Tensor | None
    ptr_stride: int
    key_ptr_stride: int
    list_stride: int
    indexed: bool


def _compress(
    major: torch.Tensor, minor: torch.Tensor, bits: torch.Tensor, num_major: int, num_minor: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[G, k] (major, minor, bit) triples -> CSR over (slice, major) with unique minors, bits OR-ed.

    Sizes depend on the data only through values, never through shapes, so there is no host sync.
    """
    G, k = major.shape
    slice_major = torch.arange(G, device=major.device)[:, None] * num_major + major
    key, order = (slice_major * num_minor + minor).flatten().sort()
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    pos = first.cumsum(0) - 1
    cols = torch.zeros(G * k, dtype=torch.int64, device=key.device)
    cols.scatter_(0, pos, key % num_minor)
    out_bits = torch.zeros_like(cols).scatter_add_(0, pos, bits.flatten()[order])
    counts = torch.zeros(G * num_major + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key // num_minor + 1, first.long())
    # The row pointers count across all slices: int64, since G * k can pass 2**31.
    return counts.cumsum(0), cols.int(), out_bits.int()


@selection.cached_per_shape
def _bounds(
    num_slices: int, num_block_rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, nb + 1] (int64): the first flat index of each block row, r * nb, and r itself; made
    once per shape, so that the 32-row lists are a handful of ops (`_row_lists`)."""
    nb = num_block_rows
    with torch.inference_mode(False), torch.no_grad():
        rows = torch.arange(nb + 1, device=device).expand(num_slices, nb + 1).contiguous()
        return rows * nb, rows


def _row_lists(block_idx: torch.Tensor, num_block_rows: int, transposed: bool) -> BlockLists:
    """One block row per tile. The chosen flat indices I * nb + J of a slice are sorted, hence
    grouped by row: they are the forward lists as they are, with row pointers from one
    `searchsorted`. A stable sort by J groups them by key block with I ascending: the
    transposed lists."""
    nb = num_block_rows
    flat = block_idx.reshape(-1, block_idx.shape[-1])
    row_starts, rows = _bounds(flat.shape[0], nb, flat.device)
    tile_ptr = torch.searchsorted(flat, row_starts, out_int32=True)
    key_ptr = key_entries = None
    if transposed:
        cols, order = torch.sort(flat % nb, dim=-1, stable=True)
        key_entries = flat.gather(-1, order)
        key_ptr = torch.searchsorted(cols, rows, out_int32=True)
    return BlockLists(
        tile_ptr, flat, flat, key_ptr, key_entries, key_entries, nb + 1, nb + 1, flat.shape[1], True
    )


def block_lists(
    block_idx: torch.Tensor, num_block_rows: int, rows: int = 1, transposed: bool = True
) -> BlockLists:
    """Forward and transposed lists from chosen flat indices I * nb + J, [B, H, k_sel] (sorted
    ascending per slice). `transposed=False` leaves the transposed (backward-only) lists out."""
    nb = num_block_rows
    if rows == 1:
        return _row_lists(block_idx, nb, transposed)
    num_tiles = -(-nb // rows)
    flat = block_idx.reshape(-1, block_idx.shape[-1]).long()
    I, J = flat // nb, flat % nb
    bits = torch.ones_like(I) << (I % rows)
    tile_ptr, tile_cols, tile_bits = _compress(I // rows, J, bits, num_tiles, nb)
    key_ptr = key_tiles = key_bits = None
    if transposed:
        key_ptr, key_tiles, key_bits = _compress(J, I // rows, bits, nb, num_tiles)
    return BlockLists(
        tile_ptr, tile_cols, tile_bits, key_ptr, key_tiles, key_bits, num_tiles, nb, 0, False
    )


def _padded_head_dim(d: int) -> int:
    """The kernels' D_PAD: tiles span a power of two of at least 16 head-dim columns."""
    return max(16, triton.next_power_of_2(d))


def _launch_config(q: torch.Tensor, block_size: int, rows: int, group: int) -> dict:
    B, H, n_pad, d = q.shape
    d_pad = _padded_head_dim(d)
    return dict(
        sm_scale=1.0 / math.sqrt(d),
        num_heads=H,
        n_pad=n_pad,
        num_block_rows=n_pad // block_size,
        head_dim=d,
        stride_g=n_pad * d,  # every tensor the kernels index is contiguous [B, H, n_pad, d]
        stride_n=d,
        BLOCK=block_size,
        ROWS=rows,
        BLOCK_M=rows * block_size,  # query rows per tile
        GROUP=group,  # list entries (chosen blocks) gathered into one tile per loop step
        D_PAD=d_pad,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET,
        **(
            {} if AUTOTUNE else _launch_settings(rows * block_size * group, d_pad, q.element_size())
        ),
    )


def _launch_settings(block_m: int, d_pad: int, element_size: int) -> dict:
    """num_warps by tile size; one pipeline stage less when a stage's two [block_m, d_pad] tiles
    (the dK/dV kernel's q and dO) would pass 64 KiB of shared memory."""
    tile = block_m * d_pad
    num_warps = 2 if tile <= 32 * 64 else 4 if tile <= 64 * 128 else 8
    num_stages = 2 if 2 * tile * element_size <= 64 * 2**10 else 1
    return dict(num_warps=num_warps, num_stages=num_stages)


# The largest gathered tile (rows * block_size * blocks per step rows of the padded head dim, in
# the input dtype) of each backward kernel, from their compiles for sm_90 (Hopper: 227 KiB of
# shared memory). dK/dV keeps q and dO tiles of that size in flight and needs about 3.3x it:
# above 64 KiB it fails (bf16 4 x 4 at d = 128: 400 KiB; fp32 4 x 2 at d = 128, 4 x 4 at d = 64).
# dQ needs 1-1.5x it: 128 KiB fits (bf16 4 x 4 at d = 128: 128 KiB; fp32 4 x 2 at d = 128:
# 192 KiB), 256 KiB does not (fp32 4 x 4 at d = 128).
BACKWARD_TILE_BYTES = {"dq": 128 * 2**10, "dkdv": 64 * 2**10}


def backward_group(
    kernel: str, rows: int, group: int, block_size: int, d_pad: int, element_size: int
) -> int:
    """Chosen blocks backward `kernel` ("dq" or "dkdv") gathers per loop step: `group`
    (attn.blocks_per_step), halved until a gathered tile of rows * block_size * group rows fits
    its BACKWARD_TILE_BYTES (`_check_inputs` refuses tiles that fit at no group). The forward
    keeps `group`: at block size 32 it fits at every setting (compiled for sm_90)."""
    budget = BACKWARD_TILE_BYTES[kernel]
    while group > 1 and rows * block_size * group * d_pad * element_size > budget:
        group //= 2
    return group


def _backward_config(cfg: dict, kernel: str, element_size: int) -> dict:
    """The forward's launch config with `kernel`'s gather (`backward_group`) and, unless
    autotuning, the launch settings of that tile."""
    rows, block = cfg["ROWS"], cfg["BLOCK"]
    group = backward_group(kernel, rows, cfg["GROUP"], block, cfg["D_PAD"], element_size)
    if group == cfg["GROUP"]:
        return cfg
    out = {**cfg, "GROUP": group}
    if not AUTOTUNE:
        out.update(_launch_settings(rows * block * group, cfg["D_PAD"], element_size))
    return out


COARSE_TILE = 32  # block rows (and block columns per step) of the coarse kernel's tiles


class _MRA2Triton(torch.autograd.Function):
    """Differentiable in q, k, v: padded, zeroed [B, H, n_pad, d] in the input dtype. The
    selection and the float32 block means (qbar, kbar, vbar; None in sparse mode) are values:
    the backward carries the coarse part's gradient back through the block means itself."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        sel: selection.Selection,
        qbar: torch.Tensor | None,
        kbar: torch.Tensor | None,
        vbar: torch.Tensor | None,
        lists: BlockLists,
        block_size: int,
        rows: int,
        group: int,
    ) -> torch.Tensor:
        B, H, n_pad, d = q.shape
        nb = n_pad // block_size
        full = vbar is not None
        cfg = _launch_config(q, block_size, rows, group)
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, n_pad, device=q.device, dtype=torch.float32)
        row_max = sel.row_max.contiguous()
        A = ol = nl = None
        if full:
            # Step 8 in one kernel: A (kept for the backward), Ol = A vbar and Nl = A 1.
            ol = torch.empty(B, H, nb, d, device=q.device, dtype=torch.float32)
            nl = torch.empty(B, H, nb, device=q.device, dtype=torch.float32)
            if any(ctx.needs_input_grad[:3]):
                A = torch.empty(B, H, nb, nb, device=q.device, dtype=torch.float32)
            _coarse_fwd[(triton.cdiv(nb, COARSE_TILE) * B * H,)](
                sel.coarse.contiguous(),
                row_max,
                sel.excluded.contiguous().view(torch.uint8),
                sel.counts.contiguous(),
                vbar.contiguous(),
                nl if A is None else A,
                ol,
                nl,
                H,
                nb,
                d,
                STORE_A=A is not None,
                BLOCK_I=COARSE_TILE,
                BLOCK_J=COARSE_TILE,
                D_PAD=cfg["D_PAD"],
                num_warps=4,
            )
        grid = (triton.cdiv(nb, rows) * B * H,)
        _mra_fwd[grid](
            q,
            k,
            v,
            out,
            lse,
            mask,
            row_max,
            ol,
            nl,
            lists.tile_ptr,
            lists.tile_cols,
            lists.tile_bits,
            ptr_stride=lists.ptr_stride,
            list_stride=lists.list_stride,
            FULL=full,
            INDEXED=lists.indexed,
            **cfg,
        )
        ctx.save_for_backward(q, k, v, out, lse, mask, row_max, sel.counts, A, qbar, kbar, vbar)
        ctx.lists, ctx.cfg, ctx.block_size = lists, cfg, block_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        with torch.autocast(device_type=dout.device.type, enabled=False):
            return _backward(ctx, dout)


def _backward(ctx, dout: torch.Tensor) -> tuple:
    """dq, dk, dv from three kernels; full mode adds the coarse part, whose gradient on the small
    matrices is a few batched matmuls:

        dS = A * (u vbar^T - w),  dvbar = A^T u,  dqbar = dS kbar,  dkbar = dS^T qbar

    (u, w from the preprocessing kernel; the kernels' epilogues add dqbar_I / (c_I + eps) to
    every q_i of block I, the same for k and v, and apply 1/sqrt(d) where it belongs)."""
    q, k, v, out, lse, mask, row_max, counts, A, qbar, kbar, vbar = ctx.saved_tensors
    lists, cfg, b = ctx.lists, ctx.cfg, ctx.block_size
    B, H, n_pad, d = q.shape
    G, nb = B * H, n_pad // b
    full = A is not None
    do = dout.contiguous()
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = torch.empty(B, H, n_pad, **f32)
    u = torch.empty(B, H, nb, d, **f32) if full else delta
    w = torch.empty(B, H, nb, **f32) if full else delta
    shared = {key: cfg[key] for key in ("num_heads", "n_pad", "num_block_rows", "head_dim")}
    _bwd_pre[(nb * G,)](
        out,
        do,
        mask,
        lse,
        row_max,
        delta,
        u,
        w,
        **shared,
        stride_g=cfg["stride_g"],
        stride_n=cfg["stride_n"],
        FULL=full,
        BLOCK=b,
        D_PAD=cfg["D_PAD"],
        num_warps=2,
    )
    dqbar = dkbar = dvbar = delta  # placeholders in sparse mode: the kernels never read them
    if full:
        A, u = A.view(G, nb, nb), u.view(G, nb, d)
        dS = torch.baddbmm(w.view(G, nb, 1), u, vbar.view(G, nb, d).transpose(1, 2), beta=-1.0)
        dS.mul_(A)
        dvbar = torch.bmm(A.transpose(1, 2), u)
        dqbar = torch.bmm(dS, kbar.view(G, nb, d))
        dkbar = torch.bmm(dS.transpose(1, 2), qbar.view(G, nb, d))
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    rows = cfg["ROWS"]
    _mra_bwd_dq[(triton.cdiv(nb, rows) * G,)](
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        mask,
        counts,
        dqbar,
        lists.tile_ptr,
        lists.tile_cols,
        lists.tile_bits,
        ptr_stride=lists.ptr_stride,
        list_stride=lists.list_stride,
        FULL=full,
        INDEXED=lists.indexed,
        **_backward_config(cfg, "dq", q.element_size()),
    )
    _mra_bwd_dkdv[(nb * G,)](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        mask,
        counts,
        dkbar,
        dvbar,
        lists.key_ptr,
        lists.key_tiles,
        lists.key_bits,
        ptr_stride=lists.key_ptr_stride,
        list_stride=lists.list_stride,
        FULL=full,
        INDEXED=lists.indexed,
        **_backward_config(cfg, "dkdv", q.element_size()),
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


def prepare_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_blocks: int,
    block_size: int,
    initial_prior_first_n_blocks: int,
    initial_prior_diagonal_n_blocks: int,
    padded: bool = True,
    with_vbar: bool = True,
) -> tuple[selection.Selection, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`selection.prepare` plus vbar in two kernels and the top-k: (selection, qbar, kbar,
    vbar or None), all float32. q, k, v: padded, zeroed, contiguous [B, H, n_pad, d] in float32,
    float16 or bfloat16 (accumulated in float32); mask: contiguous float32 [B, n_pad]."""
    first, diagonal = initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks
    selection.check_priors(first, diagonal)
    B, H, n_pad, d = q.shape
    nb = n_pad // block_size
    d_pad = _padded_head_dim(d)
    f32 = dict(device=q.device, dtype=torch.float32)
    qbar, kbar = torch.empty(B, H, nb, d, **f32), torch.empty(B, H, nb, d, **f32)
    vbar = torch.empty(B, H, nb, d, **f32) if with_vbar else None
    counts = torch.empty(B, nb, **f32)
    _block_stats[(nb * B * H,)](
        q,
        k,
        v,
        mask,
        qbar,
        kbar,
        qbar if vbar is None else vbar,
        counts,
        H,
        n_pad,
        nb,
        d,
        n_pad * d,
        d,
        WITH_V=with_vbar,
        BLOCK=block_size,
        D_PAD=d_pad,
        num_warps=2,
    )
    S, P = torch.empty(B, H, nb, nb, **f32), torch.empty(B, H, nb, nb, **f32)
    row_max = torch.empty(B, H, nb, **f32)
    _coarse_logits[(triton.cdiv(nb, COARSE_TILE) * B * H,)](
        qbar,
        kbar,
        counts,
        S,
        P,
        row_max,
        H,
        nb,
        d,
        1.0 / math.sqrt(d),
        first,
        diagonal // 2 if diagonal > 0 else -1,  # |I - J| <= D // 2 gets the diagonal prior
        PADDED=padded,
        PRIORS=first > 0 or diagonal > 0,
        BLOCK_I=COARSE_TILE,
        BLOCK_J=COARSE_TILE,
        D_PAD=d_pad,
        num_warps=4,
    )
    block_idx, excluded = selection.top_blocks(P, num_blocks)
    return selection.Selection(counts, S, row_max, block_idx, excluded), qbar, kbar, vbar


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else None


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run these kernels with these versions, or None.

    Triton 3.6 and older turn a runtime loop bound (`range(0, nb, BLOCK)`) into a one-element
    numpy array, which numpy 2.4 no longer converts to an int (3.7 and newer are fine)."""
    tv, nv = _major_minor(triton_version), _major_minor(numpy_version)
    if tv and nv and tv < (3, 7) and nv >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter cannot run the MRA kernels with numpy "
            f"{numpy_version} (a loop bound fails with 'only 0-dimensional arrays can be converted "
            "to Python scalars'): install triton>=3.7, or numpy<2.4, or use backend='torch' on CPU"
        )
    return None


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, query_rows: int = 1
) -> None:
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"mra2_triton needs CUDA tensors, got {q.device.type}: use backend='torch' on CPU "
            "(or set TRITON_INTERPRET=1 before triton is imported to run the kernels in Triton's "
            "interpreter)"
        )
    if INTERPRET:
        import numpy

        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mra2_triton takes float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"mra2_triton supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"mra2_triton needs block_size a power of two >= 16, got {block_size}; "
            "use backend='torch' for other block sizes"
        )
    d_pad = _padded_head_dim(q.shape[-1])
    if query_rows * block_size * d_pad * q.element_size() > BACKWARD_TILE_BYTES["dkdv"]:
        raise ValueError(
            f"query tiles of {query_rows} x {block_size} rows at head dim {q.shape[-1]} in "
            f"{q.dtype} need more shared memory than a GPU has in the backward, even one block "
            "per step; lower attn.query_rows (or block_size), or use backend='torch'"
        )


def mra2_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_blocks: int,
    approx_mode: str = "full",
    initial_prior_first_n_blocks: int = 0,
    initial_prior_diagonal_n_blocks: int = 0,
    block_size: int = 32,
    query_rows: int = 1,
    blocks_per_step: int = 1,
) -> torch.Tensor:
    """MRA-2 (`approx_mode="full"`) or MRA-2-s ("sparse") on Triton; the torch path's function.

    q, k, v: [B, H, n, d] float32 / float16 / bfloat16 (float32 accumulation), d <= 128, any n;
    mask: [B, n] (1 real, 0 pad) or None. query_rows: block rows per query tile (1, 2 or 4).
    blocks_per_step: chosen blocks the kernels gather into one tile per inner-loop step (1, 2 or
    4: 32 to 128 keys in the forward and dq kernels, up to 4 query tiles in the dK/dV kernel,
    fewer where they would not fit in shared memory: `backward_group`).
    Returns [B, H, n, d] in q's dtype.
    """
    check_tiles(query_rows, blocks_per_step)
    _check_inputs(q, k, v, block_size, query_rows)
    if approx_mode not in ("full", "sparse"):
        raise ValueError(f"approx_mode must be 'full' or 'sparse', got {approx_mode!r}")
    full = approx_mode == "full"
    n = q.shape[2]
    # Statistics and the coarse part are float32 math: keep autocast from rounding them.
    with torch.autocast(device_type=q.device.type, enabled=False):
        qp, kp, vp, mask_p = selection.pad_to_blocks(q, k, v, mask, block_size)
        qp, kp, vp = qp.contiguous(), kp.contiguous(), vp.contiguous()
        mask_p = mask_p.float().contiguous()
        # Float32 statistics from the fused kernels, the same as every MRA path on a GPU
        # (selection.choose). They are values here: the backward differentiates the coarse part.
        sel, qbar, kbar, vbar = selection.choose(
            qp,
            kp,
            vp,
            mask_p,
            num_blocks=num_blocks,
            block_size=block_size,
            initial_prior_first_n_blocks=initial_prior_first_n_blocks,
            initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks,
            padded=selection.has_padding(mask, n, block_size),
            with_vbar=full,
            kernels=True,
        )
        if not full:
            qbar = kbar = None
        # The transposed lists serve the backward only: a forward without gradients (eval,
        # inference) skips them.
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        lists = block_lists(sel.block_idx, sel.num_block_rows, query_rows, needs_grad)
        out = _MRA2Triton.apply(
            qp,
            kp,
            vp,
            mask_p,
            sel,
            qbar,
            kbar,
            vbar,
            lists,
            block_size,
            query_rows,
            blocks_per_step,
        )
    return out[:, :, :n]
