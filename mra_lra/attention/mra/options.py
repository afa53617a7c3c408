"""MRA's options as one frozen bundle, validated once where it is made and handed down unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch

APPROX_MODES = ("full", "sparse")
BACKENDS = ("auto", "torch", "triton")
TILE_CHOICES = (1, 2, 4)
# What the Triton kernels take (float32 accumulation).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class MRAOptions:
    """approx_mode: "full" (MRA-2) or "sparse" (MRA-2-s); the priors of spec/mra.md step 4;
    query_rows, blocks_per_step: the Triton kernels' tiles (the same function at every setting)."""

    approx_mode: str = "full"
    initial_prior_first_n_blocks: int = 0
    initial_prior_diagonal_n_blocks: int = 0
    block_size: int = 32
    backend: str = "auto"
    query_rows: int = 1
    blocks_per_step: int = 1

    def __post_init__(self) -> None:
        if self.approx_mode not in APPROX_MODES:
            raise ValueError(f"approx_mode must be one of {APPROX_MODES}, got {self.approx_mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        least = dict(
            block_size=1, initial_prior_first_n_blocks=0, initial_prior_diagonal_n_blocks=0
        )
        for name, low in least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"attn.{name} must be an integer >= {low}, got {value!r}")
        for name in ("query_rows", "blocks_per_step"):
            if (value := getattr(self, name)) not in TILE_CHOICES:
                raise ValueError(f"attn.{name} must be one of {TILE_CHOICES}, got {value!r}")

    @property
    def full(self) -> bool:
        return self.approx_mode == "full"

    def num_blocks(self, n: int, block_per_row: int) -> int:
        """k_sel for n tokens: block_per_row blocks per block row, at most every block."""
        nb = -(-n // self.block_size)
        return min(nb * block_per_row, nb * nb)
