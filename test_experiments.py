"""Tests for experiments.py: the experiments log that every training run appends to, and the
machine's description."""

from __future__ import annotations

from pathlib import Path

import pytest

import experiments
import train_cifar10 as tc
from conftest import run_at_once

slow = pytest.mark.slow


def test_every_run_appends_one_row_and_keeps_the_earlier_ones(tiny, tmp_path):
    first = tc.train(tiny(run_name="a"))
    before = (tmp_path / "experiments.csv").read_bytes()
    second = tc.train(tiny(run_name="b", lr=3e-4, seed=4), ref_img_s=123.4)
    after = (tmp_path / "experiments.csv").read_bytes()
    assert after.startswith(before)  # the first row byte for byte
    rows = experiments.read_log(tmp_path / "experiments.csv")
    assert [r["run"] for r in rows] == [str(tmp_path / "a"), str(tmp_path / "b")]
    a, b = rows
    assert float(a["best_acc"]) == round(100 * first["best_acc"], 2)
    assert float(b["best_acc"]) == round(100 * second["best_acc"], 2)
    assert (a["status"], a["eval_set"], a["epochs"], a["seed"]) == ("finished", "test", "1", "0")
    assert a["ref_img_s"] == "" and b["ref_img_s"] == "123.4"  # not measured: --no-measure-speed
    assert "--lr 0.0003" in b["changes"] and "--seed 4" in b["changes"]
    assert b["command"].startswith("python train_cifar10.py") and b["preset"] == ""
    assert float(b["clock_min"]) <= float(b["wall_min"]) and float(b["images_per_sec"]) > 0
    assert a["started"] <= a["finished"] <= b["started"]


def test_a_log_of_other_columns_is_refused_before_training_and_left_as_it_is(tiny, tmp_path):
    log = tmp_path / "mine.csv"
    log.write_text("name,score\nexp1,93.1\n")
    with pytest.raises(ValueError, match="is not an experiments log of these columns"):
        tc.train(tiny(run_name="a", log_csv=str(log)))
    assert log.read_text() == "name,score\nexp1,93.1\n"
    assert not (tmp_path / "a").exists()  # nothing trained or saved


def test_a_failed_run_gets_a_row_and_keeps_its_error(tiny, tmp_path):
    with pytest.raises(FloatingPointError):
        tc.train(tiny(run_name="nan", lr=1e6, clip_grad=0.0, label_smoothing=0.0))
    (row,) = experiments.read_log(tmp_path / "experiments.csv")
    assert (row["status"], row["epochs"], row["best_acc"]) == ("failed", "0", "0.0")


def test_a_symbolic_link_to_a_log_is_followed(tiny, tmp_path):
    (tmp_path / "real.csv").write_text(experiments.HEADER)
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    tc.train(tiny(run_name="a", log_csv=str(tmp_path / "link.csv")))
    assert (tmp_path / "link.csv").is_symlink()
    assert len(experiments.read_log(tmp_path / "real.csv")) == 1


def test_no_log_with_off(tiny, tmp_path):
    tc.train(tiny(run_name="a", log_csv="off"))
    assert not list(tmp_path.glob("*.csv"))


def test_the_preset_and_its_changes_are_separate_columns(tmp_path):
    log = tmp_path / "log.csv"
    experiments.append_row(log, {"command": "python train_cifar10.py --preset cpu --lr 0.002",
                                 "preset": "cpu", "changes": "--lr 0.002", "best_acc": 80.1})
    (row,) = experiments.read_log(log)
    assert (row["preset"], row["changes"], row["best_acc"], row["status"]) == (
        "cpu", "--lr 0.002", "80.1", "")


def _append(path: str, who: str, n: int) -> None:
    for i in range(n):
        experiments.append_row(Path(path), {"run": f"{who}{i}", "command": "a, \"quoted\" cmd"})


@slow
def test_two_processes_appending_at_once_lose_no_row(tmp_path):
    log = tmp_path / "log.csv"
    run_at_once(_append, [(str(log), who, 30) for who in "ab"])
    rows = experiments.read_log(log)
    assert sorted(r["run"] for r in rows) == sorted(f"{w}{i}" for w in "ab" for i in range(30))
    assert {r["command"] for r in rows} == {'a, "quoted" cmd'}
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_reference_speed_is_images_per_second_of_the_fixed_step(monkeypatch):
    monkeypatch.setattr(experiments, "train_step_timer", lambda model, x, y: lambda: 0.5)
    assert experiments.reference_speed(rounds=3, batch=128) == 256.0
