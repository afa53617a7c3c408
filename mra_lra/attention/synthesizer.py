"""Synthesizer (Tay et al., ICML 2021), with the LRA code's settings: random synthetic attention
mixed with dot-product attention.

Per head h, the logits are a sum of terms, then a softmax over the real keys:

    logits = q k^T / sqrt(d)                  (dot_product: true)
           + R_h[:n, :n]                      (mode random: R_h learned, [max_length, max_length])
           + (R1_h R2_h)[:n, :n]              (mode factorized_random: factorized_rank, LRA's k)
           + relu(q'_i W1)_h W2[:, :n]        (mode dense: row i from token i alone, below)

`mode` joins terms with "+" ("dense+random"), as LRA's `synthesizer_mode`. Every LRA run computes
mode random with the dot product (google-research/long-range-arena models/synthesizer/: the
encoder's defaults; text's config sets other values its train.py never reads). Initialisation as
flax's xavier_uniform on these shapes, no biases. Sized from the model's max_length (one more with
a CLS token, as LRA's `max_len += 1`); n > max_length is an error.

Departures: the dense term is computed from q' (token i's queries over all heads, a linear
function of x) with W1 [H d, H d], since our attentions receive only q, k, v (LRA: relu(x W1) W2
from the layer input); LRA's reshape of the dense logits mixes tokens and heads, we transpose.
Padded keys are always masked (LRA: only with the dot product on). No attention dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, check_length, register
from mra_lra.attention.softmax import zero_padded_queries

TERMS = ("random", "factorized_random", "dense")


def _uniform(*shape: int, bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


@register("synthesizer")
class SynthesizerAttention(nn.Module):
    def __init__(
        self,
        max_length: int | None = None,
        head_dim: int | None = None,
        num_heads: int | None = None,
        mode: str = "random",
        dot_product: bool = True,
        factorized_rank: int = 32,
    ):
        super().__init__()
        check_at_least(1, max_length=max_length, head_dim=head_dim, num_heads=num_heads)
        terms = mode.split("+")
        if (
            not set(terms) <= set(TERMS)
            or len(set(terms)) != len(terms)
            or {"random", "factorized_random"} <= set(terms)
        ):
            raise ValueError(
                f"mode must be one of {TERMS} or 'dense' joined with a random one by '+' "
                f"(e.g. 'dense+random'), got {mode!r}"
            )
        check_at_least(1, factorized_rank=factorized_rank)
        self.max_length = max_length
        self.mode = mode
        self.dot_product = bool(dot_product)
        H, L, d, r = num_heads, max_length, head_dim, factorized_rank
        self.random = self.random1 = self.random2 = self.dense1 = self.dense2 = None
        if "random" in terms:
            self.random = _uniform(H, L, L, bound=math.sqrt(3 / (H * L)))
        if "factorized_random" in terms:
            bound = math.sqrt(6 / (H * (L + r)))
            self.random1 = _uniform(H, L, r, bound=bound)
            self.random2 = _uniform(H, r, L, bound=bound)
        if "dense" in terms:
            self.dense1 = _uniform(H * d, H * d, bound=math.sqrt(3 / (H * d)))
            self.dense2 = _uniform(d, L, bound=math.sqrt(6 / (d + L)))

    def synthetic_logits(self, q: torch.Tensor) -> torch.Tensor:
        """The synthetic terms of the logits, [B or 1, H, n, n], in q's dtype."""
        B, H, n, d = q.shape
        logits = torch.zeros((), dtype=q.dtype, device=q.device)
        if self.random is not None:
            logits = logits + self.random[:, :n, :n].to(q.dtype)
        if self.random1 is not None:
            logits = logits + self.random1[:, :n].to(q.dtype) @ self.random2[:, :, :n].to(q.dtype)
        if self.dense1 is not None:
            heads_joined = q.transpose(1, 2).reshape(B, n, H * d)
            hidden = F.relu(heads_joined @ self.dense1.to(q.dtype))
            hidden = hidden.view(B, n, H, d).transpose(1, 2)
            logits = logits + hidden @ self.dense2[:, :n].to(q.dtype)
        return logits

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        check_length(n, self.max_length)
        in_dtype = q.dtype
        compute = torch.promote_types(in_dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q = q.to(compute)
            logits = self.synthetic_logits(q)
            if self.dot_product:
                logits = logits + q @ k.to(compute).transpose(-1, -2) / math.sqrt(d)
            logits = logits.expand(B, H, n, n)
            if mask is not None:
                logits = logits.masked_fill(
                    ~mask.bool()[:, None, None, :], torch.finfo(compute).min
                )
            out = torch.softmax(logits, dim=-1) @ v.to(compute)
        return zero_padded_queries(out, mask).to(in_dtype)
