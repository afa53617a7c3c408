"""The parts of MRA shared by the torch path and the Triton kernels (spec/mra.md, steps 1-4).

Everything here is cheap next to the fine part: block statistics are O(n d), the coarse logits and
the selection live on the nb x nb grid of blocks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

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
    """Pad n up to a multiple of `block_size` (added tokens are masked) and zero padded tokens.

    Returns q, k, v of shape [B, H, n_pad, d] and a float mask [B, n_pad].
    """
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
    """Whether some block holds padding: a mask was given, or n is not a multiple of the block
    size. False lets the coarse logits skip their (then zero) padding penalty."""
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
    """Step 3: S = qbar kbar^T / sqrt(d), r = row max before masking, then the padding penalty.
    `padded=False` promises that every block is full (no mask, n a multiple of the block size):
    the penalty is then zero and is skipped."""
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


def check_priors(first_n_blocks: int, diagonal_n_blocks: int) -> None:
    if first_n_blocks < 0 or diagonal_n_blocks < 0:
        raise ValueError("prior block counts must be >= 0")


@cached_per_shape
def prior_bonus(
    nb: int, first_n_blocks: int, diagonal_n_blocks: int, device: torch.device
) -> torch.Tensor | None:
    """Step 4 priors as an [nb, nb] additive bonus (None when there are no priors); made once
    per shape and device (treat it as read-only)."""
    check_priors(first_n_blocks, diagonal_n_blocks)
    if first_n_blocks == 0 and diagonal_n_blocks == 0:
        return None
    with torch.inference_mode(False), torch.no_grad():
        return _prior_bonus(nb, first_n_blocks, diagonal_n_blocks, device)


def _prior_bonus(
    nb: int, first_n_blocks: int, diagonal_n_blocks: int, device: torch.device
) -> torch.Tensor:
    bonus = torch.zeros(nb, nb, device=device)
    if diagonal_n_blocks > 0:
        idx = torch.arange(nb, device=device)
        near = (idx[:, None] - idx[None, :]).abs() <= diagonal_n_blocks // 2
        bonus += PRIOR_BOOST * near
    if first_n_blocks > 0:
        bonus[:first_n_blocks, :] += PRIOR_BOOST
        bonus[:, :first_n_blocks] += PRIOR_BOOST
    return bonus


@torch.no_grad()
def select_blocks(
    coarse: torch.Tensor,
    row_max: torch.Tensor,
    num_blocks: int,
    initial_prior_first_n_blocks: int = 0,
    initial_prior_diagonal_n_blocks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: one global top-k over the nb x nb grid of each slice (not k per row).

    Returns the chosen flat block indices [B, H, k_sel] (ascending, so row-major) and the
    excluded set M (the chosen blocks) as a bool [B, H, nb, nb].
    """
    nb = coarse.shape[-1]
    P = (coarse - row_max[..., None]).float()
    bonus = prior_bonus(nb, initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks, P.device)
    if bonus is not None:
        P += bonus
    return top_blocks(P, num_blocks)


@torch.no_grad()
def top_blocks(P: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of step 4 on the row-normalised, prior-boosted P [B, H, nb, nb]: chosen flat
    indices [B, H, k_sel] (ascending) and the excluded set M, which is exactly the chosen set.

    The published code (and spec/mra.md) takes M = {P >= smallest chosen value}, which differs
    only when values tie at the cut: a tied block that top-k did not choose then sits in M and in
    neither part, so its keys get no weight. Ties are not rare: every row of P has an exact 0 (its
    maximum), so a budget below nb cuts among them, and the prior boost (5e3) added in float32
    rounds P to steps of about 5e-4, merging nearby values. With M = the chosen set every block
    is counted once, at full or at coarse resolution; without ties the two rules agree."""
    nb = P.shape[-1]
    k_sel = min(int(num_blocks), nb * nb)
    if k_sel < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    flat = P.flatten(-2)
    idx = torch.topk(flat, k_sel, dim=-1, sorted=False).indices
    excluded = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return idx.sort(dim=-1).values, excluded.view_as(P)


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_blocks: int,
    block_size: int,
    initial_prior_first_n_blocks: int,
    initial_prior_diagonal_n_blocks: int,
    padded: bool = True,
) -> tuple[Selection, torch.Tensor, torch.Tensor]:
    """Steps 2-4 on padded, zeroed inputs. Returns the selection and qbar, kbar.

    Runs in the inputs' dtype even under autocast, so that the coarse logits (and the chosen
    blocks) do not depend on it. `padded=False`: see `coarse_logits`.
    """
    B, H, n, d = q.shape
    nb = n // block_size
    with torch.autocast(device_type=q.device.type, enabled=False):
        counts = mask.view(B, nb, block_size).sum(dim=-1)
        denominator = (counts + EPS)[:, None, :, None]
        qbar = q.view(B, H, nb, block_size, d).sum(dim=3) / denominator
        kbar = k.view(B, H, nb, block_size, d).sum(dim=3) / denominator
        S, r = coarse_logits(qbar, kbar, counts, padded)
        block_idx, excluded = select_blocks(
            S, r, num_blocks, initial_prior_first_n_blocks, initial_prior_diagonal_n_blocks
        )
    return Selection(counts, S, r, block_idx, excluded), qbar, kbar


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_MAX_HEAD_DIM = 128  # as the Triton attention kernels


def fused_available(x: torch.Tensor) -> bool:
    """Whether `choose` takes the fused Triton kernels for x [B, H, n, d] by default: CUDA
    tensors of a dtype and head dim they take, with triton installed."""
    return (
        x.is_cuda
        and x.dtype in FUSED_DTYPES
        and x.shape[-1] <= FUSED_MAX_HEAD_DIM
        and triton_available()
    )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def choose(
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
    kernels: bool | None = None,
) -> tuple[Selection, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Steps 2-4 and the value block means for every MRA path: (selection, qbar, kbar, vbar or
    None), no gradient. q, k, v: padded, zeroed [B, H, n_pad, d] in the input dtype (statistics
    in float32 at least); mask [B, n_pad].

    `kernels=True` runs `kernels.prepare_fused` (two Triton kernels and the top-k), False the
    torch ops above, None the kernels for CUDA tensors (`fused_available`) and torch otherwise.
    On a GPU every backend (and flex_mra) thus computes the same statistics the same way and
    chooses the same blocks even where two candidates tie to the last bit; both ways compute the
    same function up to float32 rounding."""
    kw = dict(
        num_blocks=num_blocks,
        block_size=block_size,
        initial_prior_first_n_blocks=initial_prior_first_n_blocks,
        initial_prior_diagonal_n_blocks=initial_prior_diagonal_n_blocks,
        padded=padded,
    )
    if kernels is None:
        kernels = fused_available(q)
    if kernels:
        from mra_lra.attention.mra.kernels import prepare_fused

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return prepare_fused(q, k, v, mask.float().contiguous(), with_vbar=with_vbar, **kw)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    sel, qbar, kbar = prepare(q.to(compute), k.to(compute), mask.to(compute), **kw)
    vbar = block_means(v.to(compute), sel.counts, block_size) if with_vbar else None
    return sel, qbar, kbar, vbar
