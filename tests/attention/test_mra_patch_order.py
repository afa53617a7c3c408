"""`attn.patch_shape`: MRA on image tasks sees 4 x 8 patches as its 32-token blocks."""

import pytest
import torch

from mra_lra.attention import build
from mra_lra.attention.mra import patch_order
from tests.attention.dense import dense_softmax

B, H, D = 1, 2, 8


def test_patch_order_by_hand():
    # An 8 x 8 image in 2 x 4 patches: the first patch is rows 0-1, columns 0-3, and so on.
    order = patch_order(64, (2, 4), torch.device("cpu")).tolist()
    assert order[:8] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert order[8:16] == [4, 5, 6, 7, 12, 13, 14, 15]
    assert order[16:24] == [16, 17, 18, 19, 24, 25, 26, 27]
    assert sorted(order) == list(range(64))


def patch_constant(side, ph, pw, generator):
    """[B, H, side*side, D] in row-major image order, constant over each ph x pw patch."""
    per_patch = torch.randn(B, H, side // ph, 1, side // pw, 1, D, generator=generator)
    x = per_patch.expand(-1, -1, -1, ph, -1, pw, -1)
    return x.reshape(B, H, side * side, D).double()


@pytest.mark.parametrize("mode", ["mra", "mra_s"])
def test_patch_shape_makes_patch_constant_images_exact(mode):
    # q and k constant over 4 x 8 patches of a 32 x 32 image. With patch order each 32-token
    # block is one patch, so MRA-2's block means are exact and, at a budget of nb blocks (one
    # per row, block_per_row=1), full mode equals softmax; row-major blocks straddle 4 patches.
    g = torch.Generator().manual_seed(0)
    side, n = 32, 1024
    q, k = patch_constant(side, 4, 8, g), patch_constant(side, 4, 8, g)
    v = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, n, dtype=torch.float64)
    reference = dense_softmax(q, k, v, mask)

    options = dict(block_per_row=1, backend="torch")
    patched = build(mode, patch_shape=[4, 8], **options)(q, k, v, mask)
    plain = build(mode, **options)(q, k, v, mask)
    if mode == "mra":
        torch.testing.assert_close(patched, reference, atol=1e-6, rtol=1e-6)
        assert (plain - reference).abs().max() > 1e-3
    else:
        # Sparse mode keeps only the chosen blocks, so neither is exact; but the order matters.
        assert (patched - plain).abs().max() > 1e-3


def test_a_cls_token_moves_behind_the_image():
    """With a CLS token first (prefix_tokens=1, as the encoder passes for pooling=cls) the image's
    patches still fill whole blocks: the patch-constant case stays exact."""
    g = torch.Generator().manual_seed(2)
    side, n = 32, 1025
    cls_q, cls_k = (torch.randn(B, H, 1, D, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.cat([cls_q, patch_constant(side, 4, 8, g)], dim=2)
    k = torch.cat([cls_k, patch_constant(side, 4, 8, g)], dim=2)
    v = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, n, dtype=torch.float64)
    options = dict(patch_shape=[4, 8], block_per_row=1, backend="torch")
    out = build("mra", prefix_tokens=1, **options)(q, k, v, mask)
    torch.testing.assert_close(out, dense_softmax(q, k, v, mask), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="patch_shape"):
        build("mra", **options)(q, k, v, mask)


def test_all_blocks_chosen_is_softmax_in_any_order():
    g = torch.Generator().manual_seed(1)
    n = 256  # a 16 x 16 image, 8 blocks of 32; block_per_row 8 chooses every block
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(B, n, dtype=torch.float64)
    mask[:, 200:] = 0  # padding follows the tokens through the reordering
    out = build("mra", patch_shape=[4, 8], block_per_row=8, backend="torch")(q, k, v, mask)
    torch.testing.assert_close(out, dense_softmax(q, k, v, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("n", "shape"), [(1000, [4, 8]), (256, [3, 8]), (1024, [4])])
def test_bad_patch_shape_or_length_is_a_clear_error(n, shape):
    q = torch.zeros(1, 1, n, 8)
    with pytest.raises(ValueError, match="patch_shape"):
        build("mra", patch_shape=shape, backend="torch")(q, q, q, torch.ones(1, n))
