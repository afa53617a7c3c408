"""YOSO: the expectation form against a dense float64 reference, the sampled form against the
expectation form (forward and backward) as the number of hashes grows."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mra_lra.attention import build
from mra_lra.attention.yoso import compact_codes, expectation_cumulation, lsh_cumulation
from tests.attention.dense import qkv_near

B, H, D = 2, 2, 16
CONFIG = Path(__file__).parents[2] / "conf" / "attn" / "yoso.yaml"


def dense_expectation(q, k, v, mask, tau):
    """normalise(sum_j (1 - angle(q_i, k_j) / pi)^tau v_j) over real j; padded queries output 0."""
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    cos = torch.einsum("bhid,bhjd->bhij", q, k) / (
        q.norm(dim=-1)[..., None] * k.norm(dim=-1)[..., None, :]
    )
    weights = (1 - torch.arccos(cos.clamp(-1, 1)) / math.pi) ** tau * mask[:, None, None, :]
    y = torch.einsum("bhij,bhjd->bhid", weights, v)
    return y / y.norm(dim=-1, keepdim=True) * mask[:, None, :, None]


def random_inputs(n, seed=0, dtype=torch.float64, pad_from=None):
    return qkv_near((B, H, n, D), seed=seed, dtype=dtype, pad_from=pad_from)


def test_config_builds_with_spec_settings():
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    assert cfg == {"name": "yoso", "num_hashes": 16, "hash_code_len": 10, "expectation": False}
    attn = build(cfg.pop("name"), context={"head_dim": D, "num_heads": H, "max_length": 512}, **cfg)
    assert (attn.num_hashes, attn.hash_code_len, attn.expectation) == (16, 10, False)


@pytest.mark.parametrize("n,pad_from", [(64, None), (37, 20)])
def test_expectation_form_equals_dense_reference(n, pad_from):
    q, k, v, mask = random_inputs(n, pad_from=pad_from)
    out = build("yoso", hash_code_len=8, expectation=True)(q, k, v, mask)
    torch.testing.assert_close(out, dense_expectation(q, k, v, mask, 8), atol=1e-10, rtol=1e-10)


def test_sampled_mean_approaches_expectation_form():
    q, k, v, mask = random_inputs(64, pad_from=40)
    ref = dense_expectation(q, k, v, mask, 8)
    errors = []
    for num_hashes in (4, 64, 1024):
        torch.manual_seed(1)
        out = build("yoso", num_hashes=num_hashes, hash_code_len=8)(q, k, v, mask)
        errors.append(((out - ref).norm() / ref.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.15  # about 1 / sqrt(num_hashes) of the error at one hash


def _unit_inputs(n=32, seed=0):
    """Unit q, k for 2 slices, the second padded from 20. (Small: CPU ops stay single-threaded.)"""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(2, n, D, generator=g, dtype=torch.float64), dim=-1)
    k = F.normalize(q + 0.5 * torch.randn(2, n, D, generator=g, dtype=torch.float64), dim=-1)
    v, weight = (torch.randn(2, n, D, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(2, n, dtype=torch.float64)
    keep[1, 20:] = 0
    return q, k, v, keep, weight


def _grads(fn, q, k, v, weight):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    (fn(q, k, v) * weight).sum().backward()
    return q.grad, k.grad, v.grad


def test_expectation_backward_is_yosos_surrogate():
    q, k, v, keep, weight = _unit_inputs()
    tau = 6
    dq, dk, dv = _grads(lambda a, b, c: expectation_cumulation(a, b, c, keep, tau), q, k, v, weight)
    e = (1 - torch.arccos((q @ k.transpose(1, 2)).clamp(-1, 1)) / math.pi) ** tau
    e = e * keep[:, :, None] * keep[:, None, :]
    gv = torch.einsum("gid,gjd->gij", weight, v) * e  # E_ij (g_i . v_j)
    torch.testing.assert_close(dq, tau / 2 * torch.einsum("gij,gjd->gid", gv, k))
    torch.testing.assert_close(dk, tau / 2 * torch.einsum("gij,gid->gjd", gv, q))
    torch.testing.assert_close(dv, torch.einsum("gij,gid->gjd", e, weight))


def test_sampled_backward_approaches_expectation_backward():
    q, k, v, keep, weight = _unit_inputs()
    ref = _grads(lambda a, b, c: expectation_cumulation(a, b, c, keep, 6), q, k, v, weight)

    def sampled(num_hashes):
        torch.manual_seed(2)
        grads = _grads(
            lambda a, b, c: lsh_cumulation(a, b, c, keep, num_hashes, 6), q, k, v, weight
        )
        errors = [((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref, strict=True)]
        return grads, errors

    _, few = sampled(16)
    grads, many = sampled(1024)
    for e_few, e_many in zip(few, many, strict=True):
        assert e_many < 0.5 * e_few and e_many < 0.2
    assert (grads[1][1, 20:] == 0).all() and (grads[2][1, 20:] == 0).all()


def test_compact_codes_keep_which_codes_are_equal():
    g = torch.Generator().manual_seed(5)
    codes_q = torch.randint(0, 64, (3, 20, 4), generator=g)
    codes_k = torch.randint(0, 64, (3, 30, 4), generator=g)
    new_q, new_k, num_buckets = compact_codes(codes_q, codes_k)
    assert num_buckets == 50 and new_q.max() < 50 and new_k.max() < 50
    same = codes_q[:, :, None, :] == codes_k[:, None, :, :]
    assert torch.equal(new_q[:, :, None, :] == new_k[:, None, :, :], same)
