"""Tests for benchmark.py's command line: bad input is refused in one line `error: ...` (exit 2)
before any work, on the small data set of conftest.py (500 training images)."""

from __future__ import annotations

import pytest
import torch

import benchmark


def error_line(capsys, argv: list[str]) -> str:
    """Run benchmark.py with argv; it must exit 2 with one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as e:
        benchmark.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_device_is_cpu_or_cuda(capsys):
    """`--device gpu` was passed to torch.device: a RuntimeError traceback."""
    assert "invalid choice: 'gpu'" in error_line(capsys, ["model", "--device", "gpu"])


def test_device_cuda_without_a_gpu_is_refused(capsys, monkeypatch):
    """`--device cuda` on a machine without a GPU was a RuntimeError traceback from CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(benchmark, "bench_model", lambda args: pytest.fail("benchmark started"))
    line = error_line(capsys, ["model", "--device", "cuda"])
    assert line.startswith("error: --device cuda: ") and "--device cpu" in line


@pytest.mark.parametrize("minutes", ["nan", "inf", "0"])
def test_minutes_must_be_finite_and_positive(batches_dir, capsys, monkeypatch, minutes):
    """`recipe --minutes nan` (or inf) trained for ever: its clock never reached the budget."""
    monkeypatch.setattr(benchmark, "bench_recipe", lambda args: pytest.fail("recipe started"))
    line = error_line(capsys, ["recipe", "--data-dir", str(batches_dir), "--minutes", minutes])
    assert line == f"error: --minutes must be positive and finite, got {float(minutes)}"


def test_recipe_batch_larger_than_the_training_set_is_refused(batches_dir, capsys, monkeypatch):
    """`recipe --batch-size 100000` ended in `UnboundLocalError: loss` (no full batch, so no
    step). Now refused before the data loader or the model is made."""
    monkeypatch.setattr(benchmark, "DataLoader", lambda *a, **k: pytest.fail("work started"))
    line = error_line(capsys, ["recipe", "--data-dir", str(batches_dir), "--batch-size", "100000"])
    assert line.startswith("error: --batch-size 100000 is larger than the training set")
    assert "(500 images)" in line


def test_data_batch_larger_than_a_timing_round_is_refused(capsys, monkeypatch):
    """`data --num-images 100` with batches of 256: "ours" timed no batch at all."""
    monkeypatch.setattr(benchmark, "DataLoader", lambda *a, **k: pytest.fail("work started"))
    line = error_line(capsys, ["data", "--num-images", "100"])
    assert line == "error: --batch-size 256 is larger than the 100 images of a timing round"
