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


def check_padded_keys_cannot_overflow(attn, d: int) -> None:
    """Real keys of large norm, so every real random-feature exponent w.k - |k|^2 / 2 is very
    negative, and padded keys of zero norm, whose exponents lie far above the real keys' max (the
    case where exp overflowed before padded keys were zeroed, and inf * 0 = NaN spread to every
    real row): the output is finite, the same whatever the padded keys hold, and k's gradient is
    finite and zero at padding."""
    g = torch.Generator().manual_seed(0)
    b, h, n = 1, 1, 8
    q, v = (torch.randn(b, h, n, d, generator=g) for _ in range(2))
    k = 8 * torch.randn(b, h, n, d, generator=g)
    mask = torch.ones(b, n)
    mask[:, 6:] = 0
    k[:, :, 6:] = 0
    padded = ~mask.bool()[:, None, :, None]
    others = [torch.where(padded, s * torch.randn(k.shape, generator=g), k) for s in (0.1, 8.0)]
    k.requires_grad_(True)
    out = attn(q, k, v, mask)
    assert torch.isfinite(out).all()
    for other in others:
        torch.testing.assert_close(attn(q, other, v, mask), out, rtol=0, atol=0)
    out.square().sum().backward()
    assert torch.isfinite(k.grad).all() and (k.grad[:, :, 6:] == 0).all()
