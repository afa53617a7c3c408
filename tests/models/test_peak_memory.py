"""Peak memory is per run: a multirun's later jobs must not report an earlier job's peak."""

from pathlib import Path

import numpy as np
import pytest

from mra_lra.models.module import peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_reset_forgets_an_earlier_peak():
    reset_peak_memory()
    big = np.ones(400 * 2**20, dtype=np.uint8)  # 400 MiB, touched
    with_big, kind = peak_memory_mb()
    assert kind == "cpu_peak_rss"
    del big
    reset_peak_memory()
    after, _ = peak_memory_mb()
    assert with_big - after > 300, (with_big, after)
