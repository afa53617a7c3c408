"""MRA attention (Zeng et al., ICML 2022): MRA-2 (`approx_mode="full"`) and MRA-2-s ("sparse").

`mra2_attention` is the function of spec/mra.md; `backend` picks the torch path or the Triton
kernels (CUDA tensors only). `MRAAttention` is the module registered as `mra` and `mra_s`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mra_lra.attention.mra import selection
from mra_lra.attention.mra.reference import mra2_torch
from mra_lra.attention.registry import register

APPROX_MODES = ("full", "sparse")
BACKENDS = ("auto", "torch", "triton")


TILE_CHOICES = (1, 2, 4)


def check_tiles(query_rows: int, blocks_per_step: int) -> None:
    """The Triton kernels' tile settings (attn.query_rows, attn.blocks_per_step)."""
    for name, value in (("query_rows", query_rows), ("blocks_per_step", blocks_per_step)):
        if value not in TILE_CHOICES:
            raise ValueError(f"attn.{name} must be one of {TILE_CHOICES}, got {value!r}")


def _check(approx_mode: str, backend: str, block_size: int) -> None:
    if approx_mode not in APPROX_MODES:
        raise ValueError(f"approx_mode must be one of {APPROX_MODES}, got {approx_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and selection.triton_available() else "torch"
    return backend


def mra2_attention(
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
    backend: str = "auto",
    query_rows: int = 1,
    blocks_per_step: int = 1,
) -> torch.Tensor:
    """MRA-2 attention. q, k, v: [B, H, n, d]; mask: [B, n] (1 real, 0 pad) or None.

    num_blocks is k_sel, the number of fine blocks each (batch, head) slice gets in total.
    Any n works (padded to a multiple of block_size inside); returns [B, H, n, d] in q's dtype.
    query_rows and blocks_per_step are the Triton kernels' tile settings (`mra2_triton`); the
    torch path does not use them.
    """
    _check(approx_mode, backend, block_size)
    check_tiles(query_rows, blocks_per_step)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must all be [B, H, n, d], got {list(q.shape)}, {list(k.shape)}, "
            f"{list(v.shape)}"
        )
    n = q.shape[2]
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        from mra_lra.attention.mra.kernels import mra2_triton

        return mra2_triton(
            q,
            k,
            v,
            mask,
            num_blocks=num_blocks,
            approx_mode=approx_mode,
            initial_prior_first_n_blocks=initial_prior_first_n_blocks,
            initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks,
            block_size=block_size,
            query_rows=query_rows,
            blocks_per_step=blocks_per_step,
        )
    in_dtype = q.dtype
    compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
    padded = selection.has_padding(mask, n, block_size)
    fused = selection.fused_available(q)
    if fused:  # pad in the input dtype: the fused statistics read what the Triton path reads
        qp, kp, vp, mask = selection.pad_to_blocks(q, k, v, mask, block_size)
        q, k, v = qp.to(compute), kp.to(compute), vp.to(compute)
    else:
        q, k, v, mask = selection.pad_to_blocks(
            q.to(compute), k.to(compute), v.to(compute), mask, block_size
        )
        qp, kp, vp = q, k, v
    mask = mask.to(compute)
    # The selection and the block means are values to mra2_torch, whose autograd Function
    # differentiates the coarse part itself; no graph needs to be kept for them.
    sel, _, _, vbar = selection.choose(
        qp,
        kp,
        vp,
        mask,
        num_blocks=num_blocks,
        block_size=block_size,
        initial_prior_first_n_blocks=initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks,
        padded=padded,
        with_vbar=approx_mode == "full",
        kernels=fused,
    )
    out = mra2_torch(q, k, v, mask, sel, vbar, approx_mode=approx_mode, block_size=block_size)
    return out[:, :, :n].to(in_dtype)


def patch_order(n: int, patch_shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Positions of a square image of n = side * side tokens (row-major) reordered so that each
    run of ph * pw tokens is one ph x pw patch: reshape (side/ph, ph, side/pw, pw), swap the
    middle axes, flatten. `x[:, :, order]` reorders; `y[:, :, argsort(order)]` undoes it."""
    ph, pw = patch_shape
    side = math.isqrt(n)
    if side * side != n or side % ph or side % pw:
        raise ValueError(
            f"attn.patch_shape={list(patch_shape)} needs a square image whose side is a multiple "
            f"of {ph} and {pw}, but the sequence has {n} tokens; set attn.patch_shape=null for "
            "non-image tasks"
        )
    grid = torch.arange(n, device=device).view(side // ph, ph, side // pw, pw)
    return grid.transpose(1, 2).reshape(n)


def check_patch_shape(patch_shape) -> tuple[int, int] | None:
    """attn.patch_shape as a tuple, or a clear error."""
    if patch_shape is not None and (len(patch_shape) != 2 or min(patch_shape) < 1):
        raise ValueError(f"attn.patch_shape must be [rows, columns] or null, got {patch_shape}")
    return tuple(patch_shape) if patch_shape is not None else None


def in_patch_order(
    attend, q, k, v, mask: torch.Tensor | None, patch_shape, prefix_tokens: int
) -> torch.Tensor:
    """`attend(q, k, v, mask)` on the tokens reordered into `patch_shape` patches (`patch_order`;
    the first `prefix_tokens` move behind the image), with the output in the original order.
    patch_shape None: `attend` as it is."""
    if patch_shape is None:
        return attend(q, k, v, mask)
    p = prefix_tokens
    order = patch_order(q.shape[2] - p, patch_shape, q.device)
    if p:
        order = torch.cat([order + p, torch.arange(p, device=q.device)])
    if mask is not None:
        mask = mask[:, order]
    out = attend(q[:, :, order], k[:, :, order], v[:, :, order], mask)
    return out[:, :, torch.argsort(order)]


class MRAAttention(nn.Module):
    """MRA-2 as an attention module; k_sel = min(nb * block_per_row, nb * nb) per slice.

    `patch_shape` (e.g. [4, 8], the MRA recipe on image tasks) reorders the tokens of a square
    image before attention so that each 32-token block is a 4 x 8 patch, and restores the order on
    the output; the attention is then a different approximation of the same softmax.
    `prefix_tokens` (from the encoder: 1 with a CLS token) leading tokens are not pixels: they
    move behind the image, so the patches still start on block boundaries."""

    default_mode = "full"

    def __init__(
        self,
        block_per_row: int = 8,
        approx_mode: str | None = None,
        initial_prior_first_n_blocks: int = 0,
        initial_prior_diagonal_n_blocks: int = 0,
        block_size: int = 32,
        backend: str = "auto",
        patch_shape: list[int] | tuple[int, int] | None = None,
        query_rows: int = 1,
        blocks_per_step: int = 1,
        prefix_tokens: int = 0,
    ):
        super().__init__()
        approx_mode = approx_mode or self.default_mode
        _check(approx_mode, backend, block_size)
        check_tiles(query_rows, blocks_per_step)
        if block_per_row < 1:
            raise ValueError(f"block_per_row must be >= 1, got {block_per_row}")
        self.patch_shape = check_patch_shape(patch_shape)
        self.block_per_row = block_per_row
        self.approx_mode = approx_mode
        self.initial_prior_first_n_blocks = initial_prior_first_n_blocks
        self.initial_prior_diagonal_n_blocks = initial_prior_diagonal_n_blocks
        self.block_size = block_size
        self.backend = backend
        self.query_rows = query_rows
        self.blocks_per_step = blocks_per_step
        self.prefix_tokens = prefix_tokens

    def num_blocks(self, n: int) -> int:
        nb = -(-n // self.block_size)
        return min(nb * self.block_per_row, nb * nb)

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        return in_patch_order(self._attend, q, k, v, mask, self.patch_shape, self.prefix_tokens)

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        return mra2_attention(
            q,
            k,
            v,
            mask,
            num_blocks=self.num_blocks(q.shape[2]),
            approx_mode=self.approx_mode,
            initial_prior_first_n_blocks=self.initial_prior_first_n_blocks,
            initial_prior_diagonal_n_blocks=self.initial_prior_diagonal_n_blocks,
            block_size=self.block_size,
            backend=self.backend,
            query_rows=self.query_rows,
            blocks_per_step=self.blocks_per_step,
        )

    def extra_repr(self) -> str:
        return (
            f"approx_mode={self.approx_mode}, block_per_row={self.block_per_row}, "
            f"priors=({self.initial_prior_first_n_blocks}, "
            f"{self.initial_prior_diagonal_n_blocks}), backend={self.backend}, "
            f"patch_shape={self.patch_shape}"
        )


@register("mra")
class MRA2(MRAAttention):
    default_mode = "full"


@register("mra_s")
class MRA2Sparse(MRAAttention):
    default_mode = "sparse"
