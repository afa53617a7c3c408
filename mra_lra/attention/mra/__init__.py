"""MRA attention (Zeng et al., ICML 2022): MRA-2 (`approx_mode="full"`) and MRA-2-s ("sparse").

`mra2_attention` is the function of spec/mra.md; `MRAAttention` is the module registered as `mra`
and `mra_s`. The layers, each importing only those listed before it:

    options.py    MRAOptions, the options as one frozen bundle, validated once
    selection.py  steps 1-4 in torch: padding, block statistics, coarse logits, the top-k
    reference.py  steps 5-10 in torch: the CPU path, and the reference of the kernels
    kernels.py    the Triton kernels (`@triton.jit` code only)
    launch.py     their host side: statistics, block lists, launch settings, autograd Function
    here          `attend`, the one place that picks the path; the modules
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

from mra_lra.attention.mra import reference, selection
from mra_lra.attention.mra.options import TRITON_DTYPES, TRITON_MAX_HEAD_DIM, MRAOptions
from mra_lra.attention.registry import register


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    num_blocks: int,
    options: MRAOptions,
    padded: bool,
    kernels: bool | None = None,
) -> tuple[selection.Selection, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps 2-4 for every MRA path (and flex_mra) on padded, zeroed inputs: the fused kernels or
    torch. `kernels=None` takes the kernels for CUDA tensors they accept, so that on a GPU every
    backend chooses the same blocks, even where two candidates tie to the last bit."""
    if kernels is None:
        kernels = (
            q.is_cuda
            and q.dtype in TRITON_DTYPES
            and q.shape[-1] <= TRITON_MAX_HEAD_DIM
            and triton_available()
        )
    if not kernels:
        return selection.prepare(q, k, v, mask, num_blocks, options, padded)
    from mra_lra.attention.mra import launch

    q, k, v, mask = q.contiguous(), k.contiguous(), v.contiguous(), mask.float().contiguous()
    return launch.fused_statistics(q, k, v, mask, num_blocks, options, padded)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    num_blocks: int,
    options: MRAOptions,
) -> torch.Tensor:
    """`mra2_attention` with its options bundled."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must all be [B, H, n, d], got {list(q.shape)}, {list(k.shape)}, "
            f"{list(v.shape)}"
        )
    n, in_dtype = q.shape[2], q.dtype
    on_triton = resolve_backend(options.backend, q.device) == "triton"
    if on_triton:
        from mra_lra.attention.mra import launch

        launch.check_inputs(q, k, v, options)
    # Statistics and the coarse part are float32 math at least: keep autocast from rounding them.
    with torch.autocast(device_type=q.device.type, enabled=False):
        padded = selection.has_padding(mask, n, options.block_size)
        q, k, v, mask = selection.pad_to_blocks(q, k, v, mask, options.block_size)
        if on_triton:
            q, k, v, mask = (t.contiguous() for t in (q, k, v, mask.float()))
        kernels = True if on_triton else None
        sel, qbar, kbar, vbar = statistics(q, k, v, mask, num_blocks, options, padded, kernels)
        # The statistics are values here: each path's backward differentiates the coarse part.
        if on_triton:
            out = launch.mra2_triton(q, k, v, mask, sel, qbar, kbar, vbar, options)
        else:
            compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
            q, k, v, mask = (t.to(compute) for t in (q, k, v, mask))
            out = reference.mra2_torch(q, k, v, mask, sel, qbar, kbar, vbar)
    return out[:, :, :n].to(in_dtype)


def mra2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_blocks: int,
    **options,
) -> torch.Tensor:
    """MRA-2 attention. q, k, v: [B, H, n, d]; mask: [B, n] (1 real, 0 pad) or None; any n.

    num_blocks is k_sel, the number of fine blocks each (batch, head) slice gets in total;
    `options` are MRAOptions' (approx_mode="full", the priors, block_size=32, backend="auto",
    and the Triton tiles query_rows and blocks_per_step, which the torch path ignores).
    """
    return attend(q, k, v, mask, num_blocks, MRAOptions(**options))


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


def in_patch_order(
    attend, q, k, v, mask: torch.Tensor | None, patch_shape, prefix_tokens: int
) -> torch.Tensor:
    """`attend(q, k, v, mask)` on the tokens reordered into `patch_shape` patches, the first
    `prefix_tokens` moved behind the image; the output comes back in the original order."""
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

    `patch_shape` (e.g. [4, 8], the MRA recipe on image tasks) makes each 32-token block a 4 x 8
    patch of a square image. `prefix_tokens` (1 with a CLS token) are not pixels: they move behind
    the image, so the patches still start on block boundaries."""

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
        self.options = MRAOptions(
            approx_mode=approx_mode or self.default_mode,
            initial_prior_first_n_blocks=initial_prior_first_n_blocks,
            initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks,
            block_size=block_size,
            backend=backend,
            query_rows=query_rows,
            blocks_per_step=blocks_per_step,
        )
        if not isinstance(block_per_row, int) or block_per_row < 1:
            raise ValueError(f"attn.block_per_row must be an integer >= 1, got {block_per_row!r}")
        if patch_shape is not None and (len(patch_shape) != 2 or min(patch_shape) < 1):
            raise ValueError(f"attn.patch_shape must be [rows, columns] or null, got {patch_shape}")
        self.block_per_row = block_per_row
        self.patch_shape = tuple(patch_shape) if patch_shape is not None else None
        self.prefix_tokens = prefix_tokens

    def num_blocks(self, n: int) -> int:
        return self.options.num_blocks(n, self.block_per_row)

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        return in_patch_order(self._attend, q, k, v, mask, self.patch_shape, self.prefix_tokens)

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        return attend(q, k, v, mask, self.num_blocks(q.shape[2]), self.options)

    @torch.no_grad()
    def chosen_blocks(self, q, k, v, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The blocks forward attends exactly, bool [B, H, nb, nb], and the real tokens per block
        [B, nb]; blocks in the order forward sees them (patches under patch_shape)."""
        found = []

        def select(q, k, v, mask):
            n, size = q.shape[2], self.options.block_size
            padded = selection.has_padding(mask, n, size)
            q, k, v, mask = selection.pad_to_blocks(q, k, v, mask, size)
            found.append(statistics(q, k, v, mask, self.num_blocks(n), self.options, padded)[0])
            return q[:, :, :n]

        in_patch_order(select, q, k, v, mask, self.patch_shape, self.prefix_tokens)
        return found[0].excluded, found[0].counts

    def extra_repr(self) -> str:
        return f"block_per_row={self.block_per_row}, {self.options}, patch_shape={self.patch_shape}"


@register("mra")
class MRA2(MRAAttention):
    default_mode = "full"


@register("mra_s")
class MRA2Sparse(MRAAttention):
    default_mode = "sparse"
