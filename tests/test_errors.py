"""Bad input is one `error:` line naming the fix, for every command; bugs keep their traceback."""

import errno
import runpy
import sys
from pathlib import Path

import pytest

from mra_lra.errors import user_message

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "code, fix",
    [(errno.ENOSPC, "free space"), (errno.EROFS, "writable disk"), (errno.EACCES, "writable")],
)
def test_a_full_or_read_only_disk_names_the_file_and_the_fix(code, fix):
    err = OSError(code, "refused", "/data/generated/listops/shard_3.npy")
    message = user_message(err)
    assert "/data/generated/listops/shard_3.npy" in message and fix in message


def test_a_bug_is_no_user_error():
    assert user_message(RuntimeError("index out of range")) is None
    assert user_message(KeyError("x")) is None


def test_a_misspelt_option_names_the_closest(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("MRA_LRA_TRACEBACKS", "0")
    monkeypatch.setattr(sys, "argv", ["train.py", "attn=mrra", f"hydra.run.dir={tmp_path}/r"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: attn=mrra") and "mra" in err[15:]


def test_an_option_of_the_wrong_type_is_one_line(compose_cfg, conftest_tiny):
    """attn.block_per_row=abc failed with a TypeError deep inside the classifier."""
    from mra_lra.train import build

    with pytest.raises(Exception) as raised:
        build(compose_cfg([*conftest_tiny, "attn=mra", "attn.block_per_row=abc"]))
    assert "attn.block_per_row" in user_message(raised.value).splitlines()[0]
