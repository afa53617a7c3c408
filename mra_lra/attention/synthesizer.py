"""Synthesizer (Tay et al., ICML 2021), with the LRA code's settings: random synthetic attention
mixed with dot-product attention.

Per head h, the logits are a sum of terms, then a softmax over the real keys:

    logits = q k^T / sqrt(d)                  (dot_product: true)
           + R_h[:n, :n]                      (mode random: R_h learned, [max_length, max_length])
           + (R1_h R2_h)[:n, :n]              (mode factorized_random: R1_h [max_length, r],
                                               R2_h [r, max_length], r = factorized_rank)
           + relu(q'_i W1)_h W2[:, :n]        (mode dense: row i from token i alone, below)
    out = softmax(logits) v

`mode` joins terms with "+" ("dense+random", "dense+factorized_random"), as LRA's
`synthesizer_mode` strings do. R does not depend on the input: with dot_product false and mode
random, q and k are not used at all.

Settings, from google-research/long-range-arena (lra_benchmarks/models/synthesizer/):
- mode random with dot_product true is what every LRA run computes: `SynthesizerEncoder` defaults
  to `synthesizer_mode='random'`, `ignore_dot_product=False`; ListOps, Text and Retrieval pass
  neither (text's config sets `synthesizer_mode = "factorized_random"`, `ignore_dot_product =
  True` and `k = 32` at the config's top level, which its train.py never reads), and the CIFAR-10
  and Pathfinder configs set `model.synthesizer_mode = "random"`. R is then the paper's "Random"
  synthesizer mixed with the vanilla dot product.
- factorized_rank 32 (LRA's `k`).
- Initialisation as flax's `xavier_uniform` (the LRA block's kernel init) gives these shapes:
  R_h ~ U(+-sqrt(3 / (H L))) (flax's fans of an [H, L, L] tensor are H L each), R1 and R2 ~
  U(+-sqrt(6 / (H (L + r)))), W1 ~ U(+-sqrt(3 / (H d))), W2 ~ U(+-sqrt(6 / (d + L))); no biases
  (the LRA block passes `bias=False`). L = max_length, H = num_heads, d = head_dim.
- Sized from the model's max_length (the encoder's, one more with a CLS token, as LRA's
  `max_len += 1`); for n < max_length the first n rows and columns are used, n > max_length is
  an error. Non-causal.

Departures from the LRA code:
- Dense synthesizer from q, not from the layer input x: our attentions receive q, k and v only.
  LRA computes relu(x W1) W2 with W1: [width, H d] and W2: [d, L] shared by the heads; we compute
  relu(q' W1) W2 with q' the concatenation of token i's queries over the heads ([H d], a linear
  function of x) and W1: [H d, H d], so the dense logits are those of the original applied to
  x W_q (+ b_q).
- LRA turns the dense logits [B, n, H, L] into [B, H, n, L] with a reshape, which mixes tokens
  and heads; we transpose.
- Padded keys are always masked. LRA adds its padding bias only when the dot product is on
  (with `ignore_dot_product=True` it masks nothing).
- No attention dropout (LRA: 0.1); our other attentions take none either.
- Computed in at least float32 under autocast. A fully padded row outputs zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import register
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
        for key, value in (("max_length", max_length), ("head_dim", head_dim)):
            if value is None or value < 1:
                raise ValueError(
                    f"synthesizer needs {key} >= 1 (the encoder passes it in `context`), got "
                    f"{value}"
                )
        if num_heads is None or num_heads < 1:
            raise ValueError(f"synthesizer needs num_heads >= 1, got {num_heads}")
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
        if factorized_rank < 1:
            raise ValueError(f"factorized_rank must be >= 1, got {factorized_rank}")
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
        if n > self.max_length:
            raise ValueError(
                f"synthesizer got sequence length {n} > max_length {self.max_length} "
                "(its synthetic logits have max_length columns)"
            )
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

    def extra_repr(self) -> str:
        return f"mode={self.mode}, dot_product={self.dot_product}, max_length={self.max_length}"
