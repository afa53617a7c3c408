"""The contract every registered attention keeps, checked for each one (README, "Adding an
attention"): [B, H, n, d] in, the same shape and dtype out, any n; padded keys get no weight and
padded queries output zero, whatever the padded positions hold; no mask is the all-ones mask;
batch entries do not mix; gradients are finite, reach q, k and v (k only where the method keeps
keys of its own) and are zero at padded positions; bfloat16 autocast on CPU runs.

Each method's own test file holds its exactness test against a dense reference. A newly
registered attention fails `test_every_registered_attention_has_a_case` until it gets a case
here, and then every check below runs on it.
"""

import pytest
import torch

from mra_lra.attention import build, names
from tests.attention.dense import qkv_near

B, H, D, MAX_LENGTH = 2, 2, 16, 128
CONTEXT = {"head_dim": D, "num_heads": H, "max_length": MAX_LENGTH}

# id -> (registered name, options sized for n <= 128). Methods that draw random numbers per call
# (reformer, yoso) are seeded before each call below.
CASES = {
    "softmax": ("softmax", {}),
    "mra": ("mra", {"block_per_row": 2, "backend": "torch"}),
    "mra_s": ("mra_s", {"block_per_row": 2, "backend": "torch"}),
    "mra_priors": (
        "mra",
        {"block_per_row": 1, "initial_prior_first_n_blocks": 1, "backend": "torch"},
    ),
    "flex_mra": ("flex_mra", {"block_per_row": 2}),
    "nystrom": ("nystrom", {"num_landmarks": 8, "conv_kernel_size": 5}),
    "linformer": ("linformer", {"projected_length": 32}),
    "performer": ("performer", {"num_features": 32}),
    "reformer": ("reformer", {"num_hashes": 2, "chunk_size": 16}),
    "longformer": ("longformer", {"window": 16, "num_global_tokens": 1}),
    "bigbird": ("bigbird", {"block_size": 16, "num_global_blocks": 1, "num_random_blocks": 1}),
    "local": ("local", {"block_size": 16}),
    "local_strided": ("local", {"block_size": 16, "strided": True}),
    "sparse_trans": ("sparse_trans", {"block_size": 16, "summary_size": 4}),
    "sparse_trans_causal_cls": (
        "sparse_trans",
        {"block_size": 16, "summary_size": 4, "causal": True, "prefix_tokens": 1},
    ),
    "linear": ("linear", {}),
    "h_transformer": ("h_transformer", {"block_size": 16}),
    "scatterbrain": ("scatterbrain", {"window_size": 16, "num_features": 32}),
    "soft": ("soft", {"num_landmarks": 8}),
    "cosformer": ("cosformer", {}),
    "skyformer": ("skyformer", {"num_landmarks": 16}),
    "skyformer_all": ("skyformer", {"num_landmarks": 256, "pinv_iterations": 10}),
    "yoso": ("yoso", {"num_hashes": 8, "hash_code_len": 6}),
    "yoso_expectation": ("yoso", {"hash_code_len": 6, "expectation": True}),
    "sinkhorn": ("sinkhorn", {"block_size": 16}),
    "sinkhorn_iterations": (
        "sinkhorn",
        {"block_size": 16, "sort_activation": "sinkhorn", "sinkhorn_iterations": 3},
    ),
    "synthesizer": ("synthesizer", {}),
    "synthesizer_dense": (
        "synthesizer",
        {"mode": "dense+factorized_random", "dot_product": False, "factorized_rank": 8},
    ),
}
# Methods that derive keys from the queries (shared-QK), so `k` gets no gradient.
KEYS_TIED_TO_QUERIES = {"reformer", "soft"}
# Cases whose variant uses no keys at all (synthetic logits without the dot product).
KEYS_UNUSED = {"synthesizer_dense"}
# FlexAttention has no backward on CPU (tests/attention/test_flex_mra.py checks its message).
NO_CPU_BACKWARD = {"flex_mra"}
IDS = sorted(CASES)


def make(case: str, dtype=torch.float64):
    name, options = CASES[case]
    return build(name, context=CONTEXT, **options).to(dtype)


def call(attn, q, k, v, mask, seed=0):
    """One forward with the global RNG reset, so random features and hashes repeat."""
    torch.manual_seed(seed)
    return attn(q, k, v, mask)


def inputs(n, dtype=torch.float64, pad_from=None, seed=0):
    return qkv_near((B, H, n, D), seed=seed, dtype=dtype, pad_from=pad_from)


def test_every_registered_attention_has_a_case():
    assert {name for name, _ in CASES.values()} == set(names())


@pytest.mark.parametrize("case", IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [128, 77])
def test_shape_dtype_and_no_mask(case, dtype, n):
    attn = make(case, dtype)
    q, k, v, mask = inputs(n, dtype=dtype)
    out = call(attn, q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    torch.testing.assert_close(call(attn, q, k, v, None), out, atol=0, rtol=0)


@pytest.mark.parametrize("case", IDS)
def test_padding_is_ignored_and_padded_queries_are_zero(case):
    n, pad_from = 100, 45
    attn = make(case)
    q, k, v, mask = inputs(n, pad_from=pad_from)
    out = call(attn, q, k, v, mask)
    g = torch.Generator().manual_seed(1)
    pad = (mask == 0)[:, None, :, None]
    q2, k2, v2 = (
        torch.where(pad, 10 * torch.randn(t.shape, generator=g).double(), t) for t in (q, k, v)
    )
    torch.testing.assert_close(call(attn, q2, k2, v2, mask), out, atol=1e-10, rtol=1e-10)
    assert (out[1, :, pad_from:] == 0).all()
    assert out[1, :, :pad_from].abs().sum() > 0


@pytest.mark.parametrize("case", IDS)
def test_fully_padded_rows_are_zero_not_nan(case):
    attn = make(case)
    q, k, v, mask = inputs(70)
    out = call(attn, q, k, v, torch.zeros_like(mask))
    assert (out == 0).all()


@pytest.mark.parametrize("case", IDS)
def test_batch_entries_do_not_mix(case):
    attn = make(case)
    q, k, v, mask = inputs(90, pad_from=60)
    out = call(attn, q, k, v, mask)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[1] = 3 * torch.randn_like(t[1])
    torch.testing.assert_close(call(attn, q2, k2, v2, mask)[0], out[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", [c for c in IDS if CASES[c][0] not in NO_CPU_BACKWARD])
def test_gradients_are_finite_reach_q_k_v_and_skip_padding(case):
    pad_from = 70
    attn = make(case, torch.float32)
    q, k, v, mask = inputs(90, dtype=torch.float32, pad_from=pad_from)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    (call(attn, q, k, v, mask) * weights).sum().backward()
    tied = CASES[case][0] in KEYS_TIED_TO_QUERIES or case in KEYS_UNUSED
    for t in (q, v) if tied else (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
        assert (t.grad[1, :, pad_from:] == 0).all()
    if tied:
        assert k.grad is None or (k.grad == 0).all()


@pytest.mark.parametrize("case", IDS)
def test_runs_under_bfloat16_autocast(case):
    """Inside a bf16-mixed training step on CPU: finite, and near the float32 output (the
    tolerance is bf16's: 8 bits of mantissa through a few matmuls)."""
    attn = make(case, torch.float32)
    q, k, v, mask = inputs(100, dtype=torch.float32, pad_from=61)
    ref = call(attn, q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(attn, q, k, v, mask)
    assert out.shape == q.shape and torch.isfinite(out).all()
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 0.03, f"{case}: relative error {err:.3g} under bf16 autocast"


@pytest.mark.parametrize("case", IDS)
@pytest.mark.parametrize("n", [96, 77])
def test_memory_layout_does_not_matter(case, n):
    """Strided inputs (the encoder's permuted qkv projection, a feature-major copy, a slice of a
    longer tensor) give the contiguous inputs' output."""
    attn = make(case)
    q, k, v, mask = inputs(n, pad_from=50)
    out = call(attn, q, k, v, mask)
    feature_major = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]
    packed = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).contiguous().permute(2, 0, 3, 1, 4)
    longer = [torch.cat([t, t[:, :, :9]], dim=2)[:, :, :n] for t in (q, k, v)]
    for layout in (feature_major, list(packed), longer):
        assert not layout[0].is_contiguous()
        torch.testing.assert_close(call(attn, *layout, mask), out, atol=1e-12, rtol=1e-12)
