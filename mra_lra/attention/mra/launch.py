"""The host side of the MRA Triton kernels (`kernels.py`). Every pass is a few launches, because
at moderate sizes the op count, not the arithmetic, sets the time (`bench.profile_mra` counts them).

num_warps and num_stages follow the tile size (`_launch_settings`); MRA_TRITON_AUTOTUNE=1 (read at
import) autotunes them instead, at the price of compiling several variants.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import triton

from mra_lra.attention.mra import selection
from mra_lra.attention.mra.kernels import (
    _block_stats_kernel,
    _bwd_pre_kernel,
    _coarse_fwd_kernel,
    _coarse_logits_kernel,
    _mra_bwd_dkdv_kernel,
    _mra_bwd_dq_kernel,
    _mra_fwd_kernel,
)
from mra_lra.attention.mra.options import TRITON_DTYPES, TRITON_MAX_HEAD_DIM, MRAOptions
from mra_lra.attention.mra.reference import coarse_grads

# triton.jit picks the interpreter when it decorates, from the same variable; the interpreter
# runs on CPU tensors and cannot autotune.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
AUTOTUNE = os.environ.get("MRA_TRITON_AUTOTUNE", "0") == "1" and not INTERPRET


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

    def launch_args(self, transposed: bool = False) -> tuple[tuple, dict]:
        """The list arguments of a fine kernel: its three tensors and their keywords."""
        if transposed:
            tensors, ptr_stride = (self.key_ptr, self.key_tiles, self.key_bits), self.key_ptr_stride
        else:
            tensors, ptr_stride = (self.tile_ptr, self.tile_cols, self.tile_bits), self.ptr_stride
        return tensors, dict(
            ptr_stride=ptr_stride, list_stride=self.list_stride, INDEXED=self.indexed
        )


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
    """[G, nb + 1] (int64): the first flat index of each block row, r * nb, and r itself."""
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
    """Forward and (unless `transposed=False`) transposed lists from chosen flat indices
    I * nb + J, [B, H, k_sel] (sorted ascending per slice)."""
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


def _launch_config(q: torch.Tensor, options: MRAOptions) -> dict:
    B, H, n_pad, d = q.shape
    block_size, rows, group = options.block_size, options.query_rows, options.blocks_per_step
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


# The largest gathered tile (rows * block_size * group rows of D_PAD, in the input dtype) of each
# backward kernel, from their compiles for sm_90 (227 KiB of shared memory): dK/dV keeps q and dO
# tiles in flight and needs about 3.3x it, dQ 1-1.5x (fp32 4 x 4 at d = 128, 256 KiB, fails).
BACKWARD_TILE_BYTES = {"dq": 128 * 2**10, "dkdv": 64 * 2**10}


def backward_group(
    kernel: str, rows: int, group: int, block_size: int, d_pad: int, element_size: int
) -> int:
    """Chosen blocks backward `kernel` ("dq" or "dkdv") gathers per loop step: `group` halved
    until its tile fits BACKWARD_TILE_BYTES. The forward keeps `group`: at block size 32 it fits
    at every setting (compiled for sm_90)."""
    budget = BACKWARD_TILE_BYTES[kernel]
    while group > 1 and rows * block_size * group * d_pad * element_size > budget:
        group //= 2
    return group


def _backward_config(cfg: dict, kernel: str, element_size: int) -> dict:
    """The forward's launch config with `kernel`'s `backward_group` and its launch settings."""
    rows, block = cfg["ROWS"], cfg["BLOCK"]
    group = backward_group(kernel, rows, cfg["GROUP"], block, cfg["D_PAD"], element_size)
    if group == cfg["GROUP"]:
        return cfg
    out = {**cfg, "GROUP": group}
    if not AUTOTUNE:
        out.update(_launch_settings(rows * block * group, cfg["D_PAD"], element_size))
    return out


# The problem's sizes, in the order every kernel that takes them lists them.
SHAPE_ARGS = ("num_heads", "n_pad", "num_block_rows", "head_dim", "stride_g", "stride_n")
COARSE_TILE = 32  # block rows (and block columns per step) of the coarse kernels' tiles
COARSE_TILES = dict(BLOCK_I=COARSE_TILE, BLOCK_J=COARSE_TILE, num_warps=4)


class _MRA2Triton(torch.autograd.Function):
    """Differentiable in q, k, v: padded, zeroed [B, H, n_pad, d]. The selection and the block
    means are values: the backward carries the coarse part's gradient through the means itself."""

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
        options: MRAOptions,
    ) -> torch.Tensor:
        B, H, n_pad, d = q.shape
        nb = n_pad // options.block_size
        full = vbar is not None
        cfg = _launch_config(q, options)
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
            excluded = sel.excluded.contiguous().view(torch.uint8)
            _coarse_fwd[(triton.cdiv(nb, COARSE_TILE) * B * H,)](
                *(sel.coarse.contiguous(), row_max, excluded, sel.counts.contiguous()),
                *(vbar.contiguous(), nl if A is None else A, ol, nl, H, nb, d),
                STORE_A=A is not None,
                D_PAD=cfg["D_PAD"],
                **COARSE_TILES,
            )
        grid = (triton.cdiv(nb, options.query_rows) * B * H,)
        lists_args, lists_kw = lists.launch_args()
        tensors = (q, k, v, out, lse, mask, row_max, ol, nl, *lists_args)
        _mra_fwd[grid](*tensors, FULL=full, **lists_kw, **cfg)
        ctx.save_for_backward(q, k, v, out, lse, mask, row_max, sel.counts, A, qbar, kbar, vbar)
        ctx.lists, ctx.cfg = lists, cfg
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        with torch.autocast(device_type=dout.device.type, enabled=False):
            return _backward(ctx, dout)


def _backward(ctx, dout: torch.Tensor) -> tuple:
    """dq, dk, dv from three kernels; in full mode the coarse part's gradient on the small
    matrices (`coarse_grads`) goes between them, and the fine kernels' epilogues add it."""
    q, k, v, out, lse, mask, row_max, counts, A, qbar, kbar, vbar = ctx.saved_tensors
    lists, cfg = ctx.lists, ctx.cfg
    b = cfg["BLOCK"]
    B, H, n_pad, d = q.shape
    G, nb = B * H, n_pad // b
    full = A is not None
    do = dout.contiguous()
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = torch.empty(B, H, n_pad, **f32)
    u = torch.empty(B, H, nb, d, **f32) if full else delta
    w = torch.empty(B, H, nb, **f32) if full else delta
    shape = {key: cfg[key] for key in SHAPE_ARGS}
    pre = (out, do, mask, lse, row_max, delta, u, w)
    _bwd_pre[(nb * G,)](*pre, **shape, FULL=full, BLOCK=b, D_PAD=cfg["D_PAD"], num_warps=2)
    dqbar = dkbar = dvbar = delta  # placeholders in sparse mode: the kernels never read them
    if full:
        means = (x.view(G, nb, d) for x in (qbar, kbar, vbar))
        dqbar, dkbar, dvbar = coarse_grads(
            A.view(G, nb, nb), u.view(G, nb, d), w.view(G, nb), *means
        )
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    size = q.element_size()
    lists_args, lists_kw = lists.launch_args()
    tensors = (q, k, v, do, dq, lse, delta, mask, counts, dqbar, *lists_args)
    dq_cfg = _backward_config(cfg, "dq", size)
    _mra_bwd_dq[(triton.cdiv(nb, cfg["ROWS"]) * G,)](*tensors, FULL=full, **lists_kw, **dq_cfg)
    lists_args, lists_kw = lists.launch_args(transposed=True)
    tensors = (q, k, v, do, dk, dv, lse, delta, mask, counts, dkbar, dvbar, *lists_args)
    dkdv_cfg = _backward_config(cfg, "dkdv", size)
    _mra_bwd_dkdv[(nb * G,)](*tensors, FULL=full, **lists_kw, **dkdv_cfg)
    return dq, dk, dv, None, None, None, None, None, None, None


@torch.no_grad()
def fused_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    num_blocks: int,
    options: MRAOptions,
    padded: bool = True,
) -> tuple[selection.Selection, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`selection.prepare` in two kernels and the top-k, on contiguous inputs (float32 mask)."""
    first, diagonal = options.initial_prior_first_n_blocks, options.initial_prior_diagonal_n_blocks
    B, H, n_pad, d = q.shape
    block_size = options.block_size
    nb = n_pad // block_size
    d_pad = _padded_head_dim(d)
    f32 = dict(device=q.device, dtype=torch.float32)
    qbar, kbar = torch.empty(B, H, nb, d, **f32), torch.empty(B, H, nb, d, **f32)
    vbar = torch.empty(B, H, nb, d, **f32) if options.full else None
    counts = torch.empty(B, nb, **f32)
    tensors = (q, k, v, mask, qbar, kbar, qbar if vbar is None else vbar, counts)
    sizes = (H, n_pad, nb, d, n_pad * d, d)  # SHAPE_ARGS
    _block_stats[(nb * B * H,)](
        *tensors, *sizes, WITH_V=options.full, BLOCK=block_size, D_PAD=d_pad, num_warps=2
    )
    S, P = torch.empty(B, H, nb, nb, **f32), torch.empty(B, H, nb, nb, **f32)
    row_max = torch.empty(B, H, nb, **f32)
    reach = diagonal // 2 if diagonal > 0 else -1  # |I - J| <= D // 2 gets the diagonal prior
    _coarse_logits[(triton.cdiv(nb, COARSE_TILE) * B * H,)](
        *(qbar, kbar, counts, S, P, row_max),
        *(H, nb, d, 1.0 / math.sqrt(d), first, reach),
        PADDED=padded,
        PRIORS=first > 0 or diagonal > 0,
        D_PAD=d_pad,
        **COARSE_TILES,
    )
    block_idx, excluded = selection.top_blocks(P, num_blocks)
    return selection.Selection(counts, S, row_max, block_idx, excluded), qbar, kbar, vbar


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run these kernels with these versions, or None.

    Triton 3.6 and older turn a runtime loop bound (`range(0, nb, BLOCK)`) into a one-element
    numpy array, which numpy 2.4 no longer converts to an int (3.7 and newer are fine)."""
    tv, nv = (re.match(r"(\d+)\.(\d+)", v) for v in (triton_version, numpy_version))
    if tv and nv and (int(tv[1]), int(tv[2])) < (3, 7) and (int(nv[1]), int(nv[2])) >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter cannot run the MRA kernels with numpy "
            f"{numpy_version} (a loop bound fails with 'only 0-dimensional arrays can be converted "
            "to Python scalars'): install triton>=3.7, or numpy<2.4, or use backend='torch' on CPU"
        )
    return None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: MRAOptions) -> None:
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got {q.device.type}: use backend='torch' on "
            "CPU (or set TRITON_INTERPRET=1 before triton is imported to run the kernels in "
            "Triton's interpreter)"
        )
    if INTERPRET:
        import numpy

        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem:
            raise RuntimeError(problem)
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"backend='triton' supports head dims up to {TRITON_MAX_HEAD_DIM}, got {q.shape[-1]}"
        )
    b = options.block_size
    if b < 16 or b & (b - 1):
        raise ValueError(
            f"backend='triton' needs block_size a power of two >= 16, got {b}; "
            "use backend='torch' for other block sizes"
        )
    d_pad = _padded_head_dim(q.shape[-1])
    if options.query_rows * b * d_pad * q.element_size() > BACKWARD_TILE_BYTES["dkdv"]:
        raise ValueError(
            f"query tiles of {options.query_rows} x {b} rows at head dim {q.shape[-1]} in "
            f"{q.dtype} need more shared memory than a GPU has in the backward, even one block "
            "per step; lower attn.query_rows (or block_size), or use backend='torch'"
        )


def mra2_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sel: selection.Selection,
    qbar: torch.Tensor,
    kbar: torch.Tensor,
    vbar: torch.Tensor | None,
    options: MRAOptions,
) -> torch.Tensor:
    """Steps 5-10 on the kernels: padded, zeroed, contiguous inputs (float32 mask) and
    `fused_statistics`' results for them."""
    # The transposed lists serve the backward only: a forward without gradients skips them.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    lists = block_lists(sel.block_idx, sel.num_block_rows, options.query_rows, needs_grad)
    if not options.full:
        qbar = kbar = None
    return _MRA2Triton.apply(q, k, v, mask, sel, qbar, kbar, vbar, lists, options)
