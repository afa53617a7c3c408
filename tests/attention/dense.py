"""Independent dense references shared by the attention tests (float64, O(n^2))."""

import math

import torch


def random_qkv(shape, seed=0, dtype=torch.float64, pad_from=None, device="cpu"):
    """Random q, k, v of `shape` [B, H, n, d] and a [B, n] mask that pads entry 1 from
    `pad_from` on."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, dtype=dtype).to(device) for _ in range(3))
    mask = torch.ones(shape[0], shape[2], dtype=dtype, device=device)
    if pad_from is not None:
        mask[1, pad_from:] = 0
    return q, k, v, mask


def qkv_near(shape, seed=0, dtype=torch.float64, pad_from=None):
    """random_qkv with keys near the queries (k = q + noise / 2), so that hashing methods see
    collisions."""
    q, noise, v, mask = random_qkv(shape, seed, dtype, pad_from)
    return q, q + 0.5 * noise, v, mask


def dense_softmax(q, k, v, mask, allowed=None):
    """float64 masked softmax attention over `allowed` pairs (broadcast to [B, H, n, n]);
    padded keys get no weight, and padded queries (or rows with no allowed key) output 0."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits.nan_to_num(neginf=-1e300), dim=-1) * torch.isfinite(logits)
    out = torch.einsum("bhij,bhjd->bhid", probs, v)
    return out * mask[:, None, :, None]
