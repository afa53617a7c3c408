"""Linear attention against its O(n^2) form, written densely in float64."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mra_lra.attention import build

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "linear.yaml"


def dense_linear(q, k, v, mask):
    """A_ij = phi(q_i) . phi(k_j) over real keys, rows normalised; padded queries output 0."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    phi_q = torch.where(q > 0, q + 1, torch.exp(q))
    phi_k = torch.where(k > 0, k + 1, torch.exp(k))
    weights = torch.einsum("bhid,bhjd->bhij", phi_q, phi_k) * mask[:, None, None, :]
    out = torch.einsum("bhij,bhjd->bhid", weights / weights.sum(-1, keepdim=True), v)
    return out * mask[:, None, :, None]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.ones(B, n, dtype=dtype)
    if pad_from is not None:
        mask[1, pad_from:] = 0
    return q, k, v, mask


def test_config_builds():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "linear"}
    build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)


@pytest.mark.parametrize("n,pad_from", [(64, None), (100, 61), (37, 20)])
def test_equals_quadratic_form(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = build("linear")(q, k, v, mask)
    torch.testing.assert_close(out, dense_linear(q, k, v, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept(dtype):
    q, k, v, mask = random_inputs(45, dtype=dtype, pad_from=30)
    out = build("linear")(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    assert build("linear")(q, k, v, None).shape == q.shape


def test_padding_is_ignored_and_padded_queries_are_zero():
    n, pad_from = 70, 41
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    attn = build("linear")
    out = attn(q, k, v, mask)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[1, :, pad_from:] = 100 * torch.randn_like(t[1, :, pad_from:])
    out2 = attn(q2, k2, v2, mask)
    torch.testing.assert_close(out2[1, :, :pad_from], out[1, :, :pad_from], atol=1e-12, rtol=0)
    assert (out2[1, :, pad_from:] == 0).all()


def test_gradients_reach_q_k_v():
    q, k, v, mask = random_inputs(50, pad_from=33)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    (build("linear")(q, k, v, mask) ** 2).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
        assert (t.grad[1, :, 33:] == 0).all()
