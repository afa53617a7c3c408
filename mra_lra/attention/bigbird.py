"""BigBird (Zaheer et al., NeurIPS 2020), block-sparse ITC form: window, global and random blocks.

With n cut into blocks of `block_size`, a query block attends to the `num_window_blocks` blocks
centred on it (cut at the ends, no wrap-around), the global blocks (the first ceil(g / 2) and the
last floor(g / 2), as the original code for g = 2) and `num_random_blocks` blocks drawn per head
among the rest; each key block at most once. Global blocks attend to every key.

The random pattern depends only on (seed, number of blocks, heads). The seed is drawn at
construction from torch's global RNG (a seeded run reproduces it; each layer gets its own, as in
the original) and saved in the state dict. Cost O(n (window + global + random) block_size d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


@register("bigbird")
class BigBirdAttention(nn.Module):
    def __init__(
        self,
        block_size: int = 32,
        num_window_blocks: int = 3,
        num_global_blocks: int = 2,
        num_random_blocks: int = 2,
    ):
        super().__init__()
        check_at_least(1, block_size=block_size, num_window_blocks=num_window_blocks)
        check_at_least(0, num_global_blocks=num_global_blocks, num_random_blocks=num_random_blocks)
        if num_window_blocks % 2 == 0:
            raise ValueError(f"num_window_blocks must be odd (centred), got {num_window_blocks}")
        self.block_size = block_size
        self.num_window_blocks = num_window_blocks
        self.num_global_blocks = num_global_blocks
        self.num_random_blocks = num_random_blocks
        self.seed = int(torch.randint(2**31 - 1, ()).item())
        self._patterns: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def get_extra_state(self) -> dict:
        return {"seed": self.seed}

    def set_extra_state(self, state: dict) -> None:
        self.seed = state["seed"]
        self._patterns.clear()

    def global_blocks(self, num_blocks: int) -> torch.Tensor:
        """Indices of the global blocks: the first ceil(g / 2) and the last floor(g / 2)."""
        g = self.num_global_blocks
        ids = set(range(min(math.ceil(g / 2), num_blocks)))
        ids |= set(range(max(num_blocks - g // 2, 0), num_blocks))
        return torch.tensor(sorted(ids), dtype=torch.long)

    def block_pattern(self, nb: int, num_heads: int) -> tuple[torch.Tensor, ...]:
        """The key blocks of every sparse (non-global) query block, on CPU: rows [R] (the sparse
        query blocks), key_blocks [H, R, S] and valid [H, R, S] (False for slots cut off at the
        ends, taken by a global block, or left over); S = window + global + random."""
        if (nb, num_heads) in self._patterns:
            return self._patterns[nb, num_heads]
        glob = self.global_blocks(nb)
        is_global = torch.zeros(nb, dtype=torch.bool)
        is_global[glob] = True
        rows = torch.arange(nb)[~is_global]
        half = self.num_window_blocks // 2
        window = rows[:, None] + torch.arange(-half, half + 1)
        window_valid = (window >= 0) & (window < nb)
        window = window.clamp(0, nb - 1)
        window_valid &= ~is_global[window]
        distance = (rows[:, None] - torch.arange(nb)[None, :]).abs()
        candidate = (distance > half) & ~is_global[None, :]  # [R, nb]
        num_random = min(self.num_random_blocks, nb)
        generator = torch.Generator().manual_seed(self.seed)
        draw = torch.rand(num_heads, len(rows), nb, generator=generator)
        draw = draw.masked_fill(~candidate, -1.0)  # non-candidates sort last
        score, random = draw.topk(num_random, dim=-1)
        shape = (num_heads, len(rows), -1)
        fixed = torch.cat([window, glob.expand(len(rows), -1)], dim=-1)
        fixed_valid = F.pad(window_valid, (0, len(glob)), value=True)
        key_blocks = torch.cat([fixed.expand(shape), random], dim=-1)
        valid = torch.cat([fixed_valid.expand(shape), score >= 0], dim=-1)
        self._patterns[nb, num_heads] = rows, key_blocks, valid
        return rows, key_blocks, valid

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        b = self.block_size
        nb = math.ceil(n / b)
        lowest = torch.finfo(compute).min
        keep = F.pad(keep, (0, nb * b - n))
        q, k, v = (F.pad(t.to(compute), (0, 0, 0, nb * b - n)) for t in (q, k, v))
        q = q / math.sqrt(d)
        q_blocks = q.view(B, H, nb, b, d)
        out = torch.zeros_like(q_blocks)

        rows, key_blocks, valid = (t.to(q.device) for t in self.block_pattern(nb, H))
        if len(rows):
            heads = torch.arange(H, device=q.device)[:, None, None]
            R = len(rows)
            k_sel = k.view(B, H, nb, b, d)[:, heads, key_blocks].reshape(B, H, R, -1, d)
            v_sel = v.view(B, H, nb, b, d)[:, heads, key_blocks].reshape(B, H, R, -1, d)
            keep_sel = keep.view(B, nb, b)[:, key_blocks] & valid[None, ..., None]
            # Under autocast the matmul returns half precision: mask and normalise in `compute`.
            logits = (q_blocks[:, :, rows] @ k_sel.transpose(-1, -2)).to(compute)  # [B,H,R,b,Sb]
            logits = logits.masked_fill(~keep_sel.view(B, H, R, 1, -1), lowest)
            sparse = (torch.softmax(logits, dim=-1) @ v_sel).to(compute)
            out = out.index_copy(2, rows, sparse)

        glob = self.global_blocks(nb).to(q.device)
        if len(glob):  # global query blocks see every key
            logits = (q_blocks[:, :, glob].reshape(B, H, -1, d) @ k.transpose(-1, -2)).to(compute)
            logits = logits.masked_fill(~keep[:, None, None, :], lowest)
            dense = (torch.softmax(logits, dim=-1) @ v).to(compute).view(B, H, len(glob), b, d)
            out = out.index_copy(2, glob, dense)
        out = out.view(B, H, nb * b, d)[:, :, :n]
        return zero_padded_queries(out, mask).to(in_dtype)
