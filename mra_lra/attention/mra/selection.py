"""Steps 1-4 of spec/mra.md in torch (padding, block statistics, coarse logits, the top-k), and
the constants every path shares. `launch.fused_statistics` is the same on the Triton kernels."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from mra_lra.attention.mra.options import MRAOptions

EPS = 1e-6
PAD_PENALTY = 1e4  # subtracted from scores that touch padding
PRIOR_BOOST = 5e3  # added to prior blocks so that top-k takes them first
EMPTY_ROW_MAX = -1e5  # stabiliser of a query row that got no chosen block


def pad_to_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad n up to a multiple of `block_size` (added tokens masked) and zero padded tokens:
    q, k, v [B, H, n_pad, d] and a float mask [B, n_pad]."""
    B, H, n, d = q.shape
    if not has_padding(mask, n, block_size):
        # Nothing to pad or zero: skip three [B, H, n, d] copies that backward would keep alive.
        return q, k, v, q.new_ones(B, n)
    if mask is None:
        mask = q.new_ones(B, n)
    if mask.shape != (B, n):
        raise ValueError(f"mask must have shape [B, n] = {[B, n]}, got {list(mask.shape)}")
    mask = mask.to(q.dtype)
    n_pad = math.ceil(n / block_size) * block_size
    if n_pad != n:
        extra = n_pad - n
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        mask = torch.nn.functional.pad(mask, (0, extra))
    # where, not a product: inf or NaN at a padded position must not leak (inf * 0 = NaN).
    real = mask[:, None, :, None] != 0
    return tuple(torch.where(real, t, 0) for t in (q, k, v)) + (mask,)


def has_padding(mask: torch.Tensor | None, n: int, block_size: int) -> bool:
    """Whether some block may hold padding; False lets the coarse logits skip their penalty."""
    return mask is not None or n % block_size != 0


def block_means(x: torch.Tensor, counts: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, H, n, d] -> [B, H, nb, d]: block sums divided by (real-token count + eps)."""
    B, H, n, d = x.shape
    sums = x.view(B, H, n // block_size, block_size, d).sum(dim=3)
    return sums / (counts[:, None, :, None] + EPS)


@dataclass
class Selection:
    """What the fine and coarse parts need from steps 2-4, for G = B*H slices.

    counts:     [B, nb] real tokens per block
    coarse:     [B, H, nb, nb] coarse logits S, padding penalty applied
    row_max:    [B, H, nb] r_I, the row max of S before the penalty
    block_idx:  [B, H, k_sel] chosen blocks as flat indices I * nb + J (sorted ascending)
    excluded:   [B, H, nb, nb] bool, the set M kept out of the coarse part (full mode)
    """

    counts: torch.Tensor
    coarse: torch.Tensor
    row_max: torch.Tensor
    block_idx: torch.Tensor
    excluded: torch.Tensor

    @property
    def num_block_rows(self) -> int:
        return self.coarse.shape[-1]


def coarse_logits(
    qbar: torch.Tensor, kbar: torch.Tensor, counts: torch.Tensor, padded: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: S = qbar kbar^T / sqrt(d), r = row max before masking, then the padding penalty
    (skipped when `padded=False` promises that every block is full)."""
    d = qbar.shape[-1]
    S = torch.matmul(qbar, kbar.transpose(-1, -2)).div_(math.sqrt(d))
    r = S.detach().amax(dim=-1)
    if padded:
        empty = (counts[:, :, None] * counts[:, None, :]) < 0.5  # [B, nb, nb]
        S = S - PAD_PENALTY * empty[:, None].to(S.dtype)
    return S, r


def cached_per_shape(make):
    """`make(*sizes, device)` cached per arguments (small constant tensors, made once per shape),
    except while a CUDA graph is being captured: tensors made then hold their values only once
    the graph replays, so an eager call before that would read garbage from the cache."""
    cached = functools.lru_cache(maxsize=32)(make)

    @functools.wraps(make)
    def get(*args):
        device = args[-1]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return make(*args)
        return cached(*args)

    return get


@cached_per_shape
def prior_bonus(
    nb: int, first_n_blocks: int, diagonal_n_blocks: int, device: torch.device
) -> torch.Tensor | None:
    """Step 4 priors as a cached, read-only [nb, nb] additive bonus (None: no priors)."""
    if first_n_blocks == 0 and diagonal_n_blocks == 0:
        return None
    with torch.inference_mode(False), torch.no_grad():
        bonus = torch.zeros(nb, nb, device=device)
        if diagonal_n_blocks > 0:
            idx = torch.arange(nb, device=device)
            bonus += PRIOR_BOOST * ((idx[:, None] - idx[None, :]).abs() <= diagonal_n_blocks // 2)
        bonus[:first_n_blocks, :] += PRIOR_BOOST
        bonus[:, :first_n_blocks] += PRIOR_BOOST
        return bonus


@torch.no_grad()
def top_blocks(P: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4's top-k on the row-normalised, prior-boosted P [B, H, nb, nb]: one global top-k
    over the nb x nb grid of each slice (not k per row). Returns the chosen flat indices
    I * nb + J, [B, H, k_sel] (ascending, so row-major), and the excluded set M as a bool
    [B, H, nb, nb], which is exactly the chosen set.

    The published code (and spec/mra.md) takes M = {P >= smallest chosen value}: a tied block
    that top-k did not choose then sits in M and in neither part, so its keys get no weight.
    Ties are not rare (every row of P has an exact 0, its maximum, and the float32 prior boost
    rounds P to steps of about 5e-4); without ties the two rules agree."""
    nb = P.shape[-1]
    k_sel = min(int(num_blocks), nb * nb)
    if k_sel < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    flat = P.flatten(-2)
    idx = torch.topk(flat, k_sel, dim=-1, sorted=False).indices
    excluded = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return idx.sort(dim=-1).values, excluded.view_as(P)


@torch.no_grad()
def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    num_blocks: int,
    options: MRAOptions,
    padded: bool = True,
) -> tuple[Selection, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps 2-4 on padded, zeroed [B, H, n_pad, d] inputs and mask [B, n_pad]: (selection,
    qbar, kbar, vbar or None), no gradient, in float32 at least whatever the input dtype and
    autocast, so that the chosen blocks do not depend on them."""
    b = options.block_size
    B, H, n, d = q.shape
    nb = n // b
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        counts = mask.to(compute).view(B, nb, b).sum(dim=-1)
        qbar, kbar = (block_means(x.to(compute), counts, b) for x in (q, k))
        vbar = block_means(v.to(compute), counts, b) if options.full else None
        S, r = coarse_logits(qbar, kbar, counts, padded)
        P = (S - r[..., None]).float()
        o = options
        bonus = prior_bonus(
            nb, o.initial_prior_first_n_blocks, o.initial_prior_diagonal_n_blocks, P.device
        )
        if bonus is not None:
            P += bonus
        block_idx, excluded = top_blocks(P, num_blocks)
    return Selection(counts, S, r, block_idx, excluded), qbar, kbar, vbar
