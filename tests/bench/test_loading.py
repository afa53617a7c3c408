"""The loading benchmark runs and serves batches of the requested shape."""

from mra_lra.bench import loading


def test_loading_benchmark_prints_a_rate(tmp_path, capsys) -> None:
    args = ["--workers", "0", "--num-images", "600", "--batches", "3", "--warmup", "1"]
    loading.main([*args, "--batch-size", "64", "--data-dir", str(tmp_path)])
    line = capsys.readouterr().out.strip()
    assert line.startswith("num_workers=0 batch_size=64 max_length=1024")
    assert float(line.rsplit(": ", 1)[1].split()[0].replace(",", "")) > 0


def test_random_pixels_batches_have_the_task_shape(tmp_path) -> None:
    options = dict(num_images=20, side=32, pixel_zero_is_pad=False, patch_order=[4, 8])
    dm = loading.RandomPixels(str(tmp_path), 8, 1056, 0, **options)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 1056) and batch["mask"].shape == (8, 1056)
    assert batch["mask"][:, :1024].all() and not batch["mask"][:, 1024:].any()
