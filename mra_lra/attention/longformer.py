"""Longformer (Beltagy et al., 2020): sliding-window attention plus a few global tokens.

`window` is the total width w (even), as Longformer's `attention_window`: query i sees the keys
with |i - j| <= w / 2. The first `num_global_tokens` tokens attend to every key and every query
attends to them (scored once, not again inside a window). Blocked, O(n w d): blocks of w / 2
queries score the three key blocks around them (a strided view), masked to the band, with the
global keys appended to each row under one softmax.

No dropout on the probabilities; the MRA authors' reference (Hugging Face's
LongformerSelfAttention with a default config) drops them at 0.1 in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mra_lra.attention.registry import check_at_least, register
from mra_lra.attention.softmax import dtypes_and_keep, zero_padded_queries


@register("longformer")
class LongformerAttention(nn.Module):
    def __init__(self, window: int = 64, num_global_tokens: int = 1):
        super().__init__()
        if window < 2 or window % 2:
            raise ValueError(f"window must be a positive even number (w / 2 a side), got {window}")
        check_at_least(0, num_global_tokens=num_global_tokens)
        self.window = window
        self.num_global_tokens = num_global_tokens

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, H, n, d = q.shape
        in_dtype, compute, keep = dtypes_and_keep(q, mask)
        b = self.window // 2  # block size = one-sided window
        nb = math.ceil(n / b)
        g = min(self.num_global_tokens, n)
        lowest = torch.finfo(compute).min
        q = F.pad(q.to(compute), (0, 0, 0, nb * b - n)) / math.sqrt(d)
        k, v = (F.pad(t.to(compute), (0, 0, b, (nb + 1) * b - n)) for t in (k, v))
        keep = F.pad(keep, (b, (nb + 1) * b - n))  # k, v, keep: one block of padding each side

        # Windows: query block I sees key blocks I - 1, I, I + 1 (3b keys, a strided view).
        k_win = k.unfold(2, 3 * b, b)  # [B, H, nb, d, 3b]
        v_win = v.unfold(2, 3 * b, b)
        keep_win = keep.unfold(1, 3 * b, b)  # [B, nb, 3b]
        key_pos = torch.arange(-b, (nb + 1) * b, device=q.device).unfold(0, 3 * b, b)  # [nb, 3b]
        offset = (
            torch.arange(3 * b, device=q.device) - b - torch.arange(b, device=q.device)[:, None]
        )
        in_band = offset.abs() <= b  # [b, 3b]: key t of the window against query a of the block
        allowed = in_band & (key_pos >= g)[:, None, :] & keep_win[:, :, None, :]  # [B, nb, b, 3b]

        q_blocks = q.view(B, H, nb, b, d)
        # Under autocast the matmuls return half precision: mask and normalise in `compute`.
        logits_win = (q_blocks @ k_win).to(compute).masked_fill(~allowed[:, None], lowest)
        k_glob, v_glob = k[:, :, b : b + g], v[:, :, b : b + g]  # [B, H, g, d]
        logits_glob = (q_blocks @ k_glob[:, :, None].transpose(-1, -2)).to(compute)
        logits_glob = logits_glob.masked_fill(~keep[:, None, None, None, b : b + g], lowest)
        probs = torch.softmax(torch.cat([logits_win, logits_glob], dim=-1), dim=-1)
        out = (
            probs[..., : 3 * b] @ v_win.transpose(-1, -2) + probs[..., 3 * b :] @ v_glob[:, :, None]
        )
        out = out.view(B, H, nb * b, d)[:, :, :n]

        if g > 0:  # global queries see every key
            keys, values = k[:, :, b : b + n], v[:, :, b : b + n]
            logits = (q[:, :, :g] @ keys.transpose(-1, -2)).to(compute)
            logits = logits.masked_fill(~keep[:, None, None, b : b + n], lowest)
            out = torch.cat([torch.softmax(logits, dim=-1) @ values, out[:, :, g:]], dim=2)
        return zero_padded_queries(out, mask).to(in_dtype)
