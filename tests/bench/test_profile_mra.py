"""The MRA profiler runs end to end (on CPU here; the GPU check runs it on CUDA)."""

from mra_lra.bench import profile_mra


def test_profile_writes_tables_and_trace(tmp_path):
    out = tmp_path / "out"
    text = profile_mra.main(
        [
            "--n",
            "256",
            "--heads",
            "2",
            "--d",
            "16",
            "--dtype",
            "float32",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert "mra fwd+bwd, B=1 H=2 n=256 d=16 float32 on cpu" in text
    assert "wall time per step (unprofiled)" in text
    # The torch path is one autograd Function; its forward and backward appear as ops.
    assert "_MRA2Torch" in text and "_MRA2TorchBackward" in text
    assert (out / "profile_mra.txt").read_text().strip() == text.strip()
    assert (out / "profile_mra.json").stat().st_size > 0
