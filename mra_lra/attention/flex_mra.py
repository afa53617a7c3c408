"""MRA-2-s through PyTorch FlexAttention: a BlockMask built from MRA's chosen blocks.

MRA-2-s (spec/mra.md, sparse mode) is softmax attention restricted to the k_sel blocks that MRA's
selection picks; this module reuses that selection (`mra.statistics`) and hands the chosen set
to FlexAttention:

    kv_num_blocks / kv_indices             chosen blocks whose key block has padding (partial)
    full_kv_num_blocks / full_kv_indices   chosen blocks whose key block is all real (full)
    mask_mod(b, h, i, j) = chosen[b, h, i // bs, j // bs] and key j is real

so the compiled kernel visits only the chosen blocks, and skips the mask on full ones. The
mask_mod repeats the block pattern so that FlexAttention's unfused path (which ignores the block
lists) computes the same function. `mask_block_size` (a multiple of block_size) builds the
BlockMask on coarser tiles, any chosen block making a tile visited, with the same function: torch
2.11's compiled backward finds no kernel for 32-token mask blocks in half precision
(pytorch/pytorch#176025, fixed by PR #184797); 128 works there.

On CUDA, flex_attention is compiled (fused, forward and backward) with Triton tiles of
gcd(block_size, 64), which must divide the MRA blocks. On CPU it runs FlexAttention's unfused
eager path, forward only (torch has no FlexAttention backward there; train with attn=mra_s, the
same function up to MRA-2-s's 1e-6 in the denominator).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from mra_lra.attention.mra import MRAAttention, selection, statistics
from mra_lra.attention.registry import register
from mra_lra.attention.softmax import zero_padded_queries

_compiled_flex: Callable | None = None


def _flex_api() -> tuple[Callable, type]:
    """flex_attention and BlockMask, or a RuntimeError naming what is missing."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as err:
        raise RuntimeError(
            f"attn=flex_mra needs torch.nn.attention.flex_attention (torch >= 2.5), which this "
            f"torch {torch.__version__} does not provide; use attn=mra_s (the same function, "
            f"MRA's own torch and Triton paths) or upgrade torch"
        ) from err
    return flex_attention, BlockMask


def _kernel_options(block_size: int) -> dict[str, int]:
    """Triton tiles that divide the MRA block (the compiled kernel requires it), 16 to 64."""
    tile = math.gcd(block_size, 64)
    if tile < 16:
        raise ValueError(
            f"attn=flex_mra on CUDA needs block_size a multiple of 16 (the kernel's tiles must "
            f"divide it), got {block_size}; use attn=mra_s for other block sizes"
        )
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
    return dict.fromkeys(names, tile)


def _run_flex(flex_attention: Callable, q, k, v, block_mask, block_size: int) -> torch.Tensor:
    global _compiled_flex
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        # Tiles must divide the mask blocks; FlexAttention's own choices (for 128-token mask
        # blocks, its default) already do for multiples of 128.
        options = None if block_size % 128 == 0 else _kernel_options(block_size)
        return _compiled_flex(q, k, v, block_mask=block_mask, kernel_options=options)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            f"attn=flex_mra cannot train on {q.device.type}: torch {torch.__version__} has no "
            f"FlexAttention backward there. Train on a CUDA device, or use attn=mra_s (the same "
            f"function with a CPU path); flex_mra's CPU forward runs under torch.no_grad()"
        )
    with warnings.catch_warnings():
        # The unfused path warns that it is unfused; on CPU that is the point (tests, inference).
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


def _block_lists(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, nb, nb] bool -> counts [B, H, nb] and indices [B, H, nb, nb] (chosen first), int32."""
    counts = table.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, order.to(torch.int32)


def coarsen_block_table(table: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, nb, nb] bool -> (any, all) over r x r groups of blocks, [B, H, nb/r, nb/r] each
    (broadcast dimensions of size 1 stay 1)."""
    if r == 1:
        return table, table
    B, H, rows, cols = table.shape
    rr, rc = (r if rows > 1 else 1), (r if cols > 1 else 1)
    groups = table.reshape(B, H, rows // rr, rr, cols // rc, rc)
    return groups.any(dim=5).any(dim=3), groups.all(dim=5).all(dim=3)


def chosen_block_table(block_idx: torch.Tensor, num_block_rows: int) -> torch.Tensor:
    """Flat chosen-block indices I * nb + J [B, H, k_sel] -> bool table [B, H, nb, nb]."""
    B, H, _ = block_idx.shape
    nb = num_block_rows
    table = torch.zeros(B, H, nb * nb, dtype=torch.bool, device=block_idx.device)
    return table.scatter_(-1, block_idx, True).view(B, H, nb, nb)


@register("flex_mra")
class FlexMRAAttention(MRAAttention):
    """MRA-2-s with FlexAttention: MRAAttention's options, patch order and k_sel per slice."""

    def __init__(
        self,
        block_per_row: int = 8,
        initial_prior_first_n_blocks: int = 0,
        initial_prior_diagonal_n_blocks: int = 0,
        block_size: int = 32,
        mask_block_size: int | None = None,
        patch_shape: list[int] | tuple[int, int] | None = None,
        prefix_tokens: int = 0,
    ):
        super().__init__(
            block_per_row,
            "sparse",
            initial_prior_first_n_blocks,
            initial_prior_diagonal_n_blocks,
            block_size,
            patch_shape=patch_shape,
            prefix_tokens=prefix_tokens,
        )
        if mask_block_size is not None and (
            mask_block_size < block_size or mask_block_size % block_size
        ):
            raise ValueError(
                f"attn.mask_block_size must be a multiple of block_size={block_size} (or null), "
                f"got {mask_block_size}"
            )
        self.mask_block_size = mask_block_size or block_size

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        flex_attention, BlockMask = _flex_api()
        B, H, n, d = q.shape
        bs = self.options.block_size
        qp, kp, vp, keep = selection.pad_to_blocks(q, k, v, mask, bs)
        n_pad = qp.shape[2]
        nb = n_pad // bs
        with torch.no_grad():
            # Selection as in mra2_attention (on a GPU, the same kernels: the same blocks).
            padded = selection.has_padding(mask, n, bs)
            sel = statistics(qp, kp, vp, keep, self.num_blocks(n), self.options, padded)[0]
            chosen = chosen_block_table(sel.block_idx, nb)
            key_real = keep.bool()
            key_block_full = (sel.counts == bs)[:, None, None, :]  # [B, 1, 1, nb]
            mb = self.mask_block_size
            if n_pad % mb:
                raise ValueError(
                    f"attn.mask_block_size={mb} must divide the sequence length padded to "
                    f"block_size ({n_pad}); use the default (null) for this length"
                )
            any_chosen, all_chosen = coarsen_block_table(chosen, mb // bs)
            _, all_full = coarsen_block_table(key_block_full, mb // bs)
            full = all_chosen & all_full
            partial_num, partial_idx = _block_lists(any_chosen & ~full)
            full_num, full_idx = _block_lists(full)

        def mask_mod(b, h, q_idx, kv_idx):
            return chosen[b, h, q_idx // bs, kv_idx // bs] & key_real[b, kv_idx]

        block_mask = BlockMask.from_kv_blocks(
            partial_num,
            partial_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=mb,
            mask_mod=mask_mod,
            seq_lengths=(n_pad, n_pad),
        )
        out = _run_flex(flex_attention, qp, kp, vp, block_mask, mb)
        return zero_padded_queries(out[:, :, :n], mask).to(q.dtype)

    def extra_repr(self) -> str:
        return (
            f"block_per_row={self.block_per_row}, {self.options}, "
            f"mask_block_size={self.mask_block_size}, patch_shape={self.patch_shape}"
        )
