"""Nystromformer attention against a float64 dense masked softmax."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build
from tests.attention.dense import dense_softmax, random_qkv

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "nystrom.yaml"


def depthwise_conv(v, weight, mask):
    """out[b, h, i] = sum_t weight[h, t] * (mask v)[b, h, i + t - r], zero outside [0, n)."""
    v = v.double() * mask.double()[:, None, :, None]
    kernel = weight.double()[:, 0, :, 0]  # [H, K]
    r = kernel.shape[1] // 2
    n = v.shape[2]
    out = torch.zeros_like(v)
    for t in range(kernel.shape[1]):
        lo, hi = max(0, r - t), min(n, n + r - t)
        out[:, :, lo:hi] += kernel[None, :, t, None, None] * v[:, :, lo + t - r : hi + t - r]
    return out * mask.double()[:, None, :, None]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return random_qkv((B, H, n, D), seed, dtype, pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {
        "name": "nystrom",
        "num_landmarks": 64,
        "pinv_iterations": 6,
        "conv_kernel_size": 33,
    }
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert attn.conv.weight.shape == (H, 1, 33, 1)


@pytest.mark.parametrize("n,pad_from", [(64, None), (100, 61), (37, 20)])
def test_landmarks_equal_n_is_softmax(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    ref = dense_softmax(q, k, v, mask)
    # Enough pseudo-inverse iterations to converge: the Nystrom form itself is then exact.
    converged = build("nystrom", num_landmarks=n, pinv_iterations=20, conv_kernel_size=None)
    torch.testing.assert_close(converged(q, k, v, mask), ref, atol=1e-6, rtol=1e-6)
    # The published 6 iterations: close, not exact.
    default = build("nystrom", num_landmarks=n, pinv_iterations=6, conv_kernel_size=None)
    assert (default(q, k, v, mask) - ref).abs().max() < 0.1


def test_conv_adds_a_depthwise_conv_of_v():
    n = 50
    q, k, v, mask = random_inputs(n, pad_from=31)
    attn = build("nystrom", num_landmarks=n, pinv_iterations=20, conv_kernel_size=5, num_heads=H)
    attn = attn.double()
    ref = dense_softmax(q, k, v, mask) + depthwise_conv(v, attn.conv.weight, mask)
    torch.testing.assert_close(attn(q, k, v, mask), ref, atol=1e-6, rtol=1e-6)


def test_conv_needs_num_heads():
    with pytest.raises(ValueError, match="num_heads"):
        build("nystrom", conv_kernel_size=33)
    with pytest.raises(ValueError, match="odd"):
        build("nystrom", conv_kernel_size=32, num_heads=H)


def test_half_padded_and_empty_landmarks_ignore_padding():
    """The general padding contract is in test_contract.py; here landmarks are segments of 2
    tokens, so one is half padding and the rest of the padded tail's are empty."""
    n, pad_from = 100, 45
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("nystrom", num_landmarks=64, num_heads=H).double()
    out = attn(q, k, v, mask)
    g = torch.Generator().manual_seed(1)
    pad = (mask == 0)[:, None, :, None]
    q2, k2, v2 = (
        torch.where(pad, 10 * torch.randn(t.shape, generator=g).double(), t) for t in (q, k, v)
    )
    out2 = attn(q2, k2, v2, mask)
    torch.testing.assert_close(out2, out, atol=1e-10, rtol=1e-10)
    assert (out[1, :, pad_from:] == 0).all()


def test_conv_weight_is_trained():
    q, k, v, mask = random_inputs(90, pad_from=70, dtype=torch.float32)
    attn = build("nystrom", num_landmarks=16, num_heads=H)
    attn(q, k, v, mask).square().sum().backward()
    assert attn.conv.weight.grad.abs().sum() > 0
