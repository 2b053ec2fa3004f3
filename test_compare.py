"""Tests for compare_configs.py and the CNN baseline (cnn_model.py), on small data sets the tests
make themselves (conftest.py: 500 training and 200 test images of an easy 10-class task)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import compare_configs as cc
import train_cifar10 as tc
from checkpoint import load_checkpoint, model_from_checkpoint
from cnn_model import ResNetCIFAR, ResNetConfig, resnet_param_count
from config import TrainConfig
from conftest import run_at_once
from data import load_dataset, split_data
from vit_model import estimate_flops

# A small baseline for the tests: a tiny ViT, 100 validation images, batches of 50.
SMALL = ["val_split=100", "embed_dim=32", "depth=2", "num_heads=2", "batch_size=50",
         "eval_subset=0", "log_every=2", "eval_batch_size=100"]
BUDGET = {"time_budget": 4.0, "epochs": 1000}


slow = pytest.mark.slow


@pytest.fixture
def data_dir(batches_dir) -> Path:
    return batches_dir


@pytest.fixture
def fast_machine(monkeypatch):
    monkeypatch.setattr(cc, "reference_speed", lambda: 400.0)
    monkeypatch.setattr(cc, "cpu_name", lambda: "test CPU")


def compare(tmp_path: Path, data_dir: Path, *args: str) -> None:
    cc.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "res"),
             "--fig-dir", str(tmp_path / "fig"), "--checkpoint-dir", str(tmp_path / "ck"),
             "--set", *SMALL, *args])


def tiny_study(monkeypatch, name: str, runs: list[cc.Run], plot: str = "bars") -> None:
    monkeypatch.setitem(cc.STUDIES, name, cc.Study(name, "a test study", runs, plot))


def rows(tmp_path: Path, study: str) -> list[dict]:
    """The rows of a study's equal-time file, or else of its equal-epochs file."""
    path = tmp_path / "res" / f"{study}.json"
    path = path if path.is_file() else tmp_path / "res" / f"{study}_epochs.json"
    return json.loads(path.read_text())["rows"]


# --------------------------------------------------------------------------------------------
# The CNN
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("widths, blocks", [((32, 64, 128), (2, 2, 2)), ((16, 32, 64), (3, 3, 3)),
                                            ((8, 8), (1, 2)), ((64, 128, 256, 512), (2, 2, 2, 2))])
def test_resnet_parameter_count_matches_the_formula(widths, blocks):
    cfg = ResNetConfig(widths=widths, blocks=blocks)
    assert sum(p.numel() for p in ResNetCIFAR(cfg).parameters()) == resnet_param_count(cfg)


def test_resnet_matches_torchvision_resnet18_apart_from_the_stem():
    """Widths 64-512 with two blocks each are ResNet-18's body: the same parameter count as
    torchvision's resnet18 once its 7x7 stem is swapped for ours (3x3), and its head for 10
    classes."""
    import torchvision
    ref = torchvision.models.resnet18(num_classes=10)
    ours = ResNetCIFAR(ResNetConfig(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)))
    n_ref = sum(p.numel() for p in ref.parameters()) - ref.conv1.weight.numel() + 3 * 3 * 3 * 64
    assert sum(p.numel() for p in ours.parameters()) == n_ref
    assert ours(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_keeps_32x32_resolution_in_its_first_stage():
    model = ResNetCIFAR(ResNetConfig())
    x = model.stem(torch.zeros(1, 3, 32, 32))
    sizes = []
    for stage in model.stages:
        x = stage(x)
        sizes.append(tuple(x.shape[1:]))
    assert sizes == [(32, 32, 32), (64, 16, 16), (128, 8, 8)]  # no max-pool, stride 1 stem


@slow
def test_resnet_checkpoint_round_trip_and_visualize_refuses_it(data_dir, tmp_path, capsys):
    tc.main(["--model", "resnet_cifar", "--epochs", "1", "--batch-size", "50",
             "--train-fraction", "0.2", "--no-measure-speed", "--data-dir", str(data_dir),
             "--out-dir", str(tmp_path), "--run-name", "cnn", "--wandb", "off", "--ema", "0.9"])
    ckpt = load_checkpoint(tmp_path / "cnn" / "last.pt")
    assert ckpt["model_config"]["arch"] == "resnet"
    model = model_from_checkpoint(ckpt, use_ema=False)
    assert isinstance(model, ResNetCIFAR)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    # the EMA copy carries the BatchNorm statistics of the trained model, not the initial ones
    assert torch.equal(ckpt["ema"]["stem.1.running_mean"], ckpt["model"]["stem.1.running_mean"])
    assert not torch.all(ckpt["ema"]["stem.1.running_mean"] == 0)
    import visualize_attention
    with pytest.raises(SystemExit):
        visualize_attention.main(["--checkpoint", str(tmp_path / "cnn" / "last.pt"),
                                  "--out-dir", str(tmp_path)])
    assert "attention maps need a ViT checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--patch-drop", "0.5"], ["--optimizer", "muon"],
                                  ["--depth", "4"], ["--res-schedule", "16:0.5"]])
def test_vit_only_settings_are_refused_for_the_cnn(data_dir, tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        tc.main(["--model", "resnet_cifar", "--data-dir", str(data_dir), "--wandb", "off", *flag])
    err = capsys.readouterr().err
    assert "apply to ViT models only" in err and flag[0] in err


# --------------------------------------------------------------------------------------------
# --train-fraction
# --------------------------------------------------------------------------------------------

def test_train_fraction_takes_the_same_share_of_every_class_and_nests(data_dir):
    # split_data takes no seed: every seed trains on the same images
    data = load_dataset(data_dir, download=False)
    per_class = torch.bincount(split_data(data, val_split=100)[1], minlength=10)
    kept = {}
    for frac in (1.0, 0.5, 0.2):
        x, y, evals = split_data(data, val_split=100, train_fraction=frac)
        kept[frac] = {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x}
        assert len(kept[frac]) == len(x)  # the synthetic images are all different
        expected = per_class.mul(frac).round().long()
        assert torch.bincount(y, minlength=10).tolist() == expected.tolist()
        assert evals.name == "val" and evals.size == 100
    assert kept[0.2] < kept[0.5] < kept[1.0]


# --------------------------------------------------------------------------------------------
# The studies
# --------------------------------------------------------------------------------------------

def test_every_study_builds_valid_configs_that_change_one_thing():
    base = dataclasses.asdict(TrainConfig(**{**cc.BASE, **BUDGET}))
    for study in cc.STUDIES.values():
        keys = set()
        seeds = [r.seed for r in study.runs if r.baseline]  # the noise needs two at least
        assert len(seeds) >= 2 and seeds == list(cc.SEEDS[:len(seeds)]), study.name
        for run in study.runs:
            cfg = cc.run_config(run, BUDGET, cc.BASE)  # validates
            # every run: the same shares of its budget for the warmup and the full-token phase
            # (the ResNet has no patch dropout), and only its training time counted
            assert (cfg.warmup_frac, cfg.clock, cfg.warmup_epochs) == (0.1, "train", 1.0)
            assert (cfg.full_token_frac, cfg.full_token_epochs) == (
                (0.2, 1) if cfg.patch_drop else (0.0, 0))
            keys.add(cc.run_key(cfg))
            changed = {k for k, v in dataclasses.asdict(cfg).items() if v != base[k]} - {"seed"}
            assert changed == {k for k, v in run.changes.items() if v != base[k]}, (
                study.name, run.label)
            params, mflops = cc.model_cost(cfg, 10)
            if cfg.model == "resnet_cifar":
                assert params == resnet_param_count(ResNetConfig()) == 696_618
            else:
                mcfg = tc.model_config_of(cfg, 10)
                assert mflops == estimate_flops(mcfg)["total"] / 1e6
        assert len(keys) == len(study.runs)  # no run twice within a study
    # the baseline is one run, the same in every study (so it is trained once and reused), but
    # in the transfer study, whose baseline learns the five target classes
    assert len({cc.run_key(cc.run_config(r, BUDGET, cc.BASE))
                for s in cc.STUDIES.values() if s.name != "transfer" for r in s.runs
                if r.baseline and r.seed == 0}) == 1
    assert cc.BASE["val_split"] == 5000 and cc.BASE["optimizer"] == "muon"


def test_a_setting_added_later_keeps_the_keys_of_rows_recorded_before_it():
    """A row recorded before --mimetic-init and --mix-off-frac existed (its config lacks them)
    keeps its key, so a resumed study reuses it; either setting switched on is a different
    run."""
    assert set(cc.NEWER_SETTINGS) == {"mimetic_init", "mix_off_frac", "eval_train"}
    cfg = cc.run_config(cc.STUDIES["data"].runs[0], BUDGET, cc.BASE)
    old = {k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in cc.PLACE and k not in cc.NEWER_SETTINGS}  # the config as recorded then
    old_key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert cc.run_key(cfg) == old_key
    assert cc.run_key(dataclasses.replace(cfg, mimetic_init=True)) != old_key
    assert cc.run_key(dataclasses.replace(cfg, mix_off_frac=0.2)) != old_key


def test_patch_study_counts_flops_of_the_token_count():
    cfgs = [cc.run_config(r, BUDGET, cc.BASE) for r in cc.STUDIES["patch"].runs]
    assert [c.patch_size for c in cfgs] == [4, 4, 4, 2, 8]
    tokens = [tc.model_config_of(c, 10).num_tokens for c in cfgs]
    assert tokens == [64, 64, 64, 256, 16]  # (32 / P)^2 patches; GAP: no class token
    mflops = [cc.model_cost(c, 10)[1] for c in cfgs]
    assert mflops[4] < mflops[0] < mflops[3]


def test_cnn_flops_match_a_hand_count():
    """Convolutions: 2 k^2 a b H W per layer; the head 2 C K; PyTorch's counter counts the same."""
    cfg = ResNetConfig()
    hand, a, size = 2 * 9 * 3 * 32 * 32 * 32, 32, 32
    for i, (b, n) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
        for j in range(n):
            if i > 0 and j == 0:
                size //= 2
                hand += 2 * a * b * size * size  # 1x1 shortcut
            hand += 2 * 9 * a * b * size * size + 2 * 9 * b * b * size * size
            a = b
    hand += 2 * 128 * 10
    run = next(r for r in cc.STUDIES["data"].runs if r.line.startswith("ResNet") and r.x == 1.0)
    assert cc.model_cost(cc.run_config(run, BUDGET, cc.BASE), 10)[1] == hand / 1e6


@slow
def test_a_study_writes_rows_table_and_plot(data_dir, tmp_path, monkeypatch, fast_machine,
                                            capsys):
    tiny_study(monkeypatch, "two", [*cc.baseline("base"), cc.Run("lr", {"lr": 3e-4})])
    compare(tmp_path, data_dir, "eval_train=40", "--study", "two", "--epochs", "2")
    got = rows(tmp_path, "two")
    # the baseline's seeds spread over the study, the first at the start and the last at the end
    assert [(r["label"], r["seed"], r["epochs"]) for r in got] == [
        ("base", 0, 2), ("base", 1, 2), ("lr", 0, 2), ("base", 2, 2)]
    assert [r["started"] for r in got] == sorted(r["started"] for r in got)
    for r in got:
        ckpt = load_checkpoint(Path(r["run_dir"]) / "last.pt")
        assert r["val_acc"] == round(100 * ckpt["best_acc"], 2)
        right = np.unpackbits(np.frombuffer(bytes.fromhex(r["val_correct"]), np.uint8))
        assert right[:r["val_images"]].mean() * 100 == pytest.approx(r["val_acc"], abs=0.006)
        assert r["config"]["seed"] == r["seed"] and r["machine"] == {
            "cpu": "test CPU", "ref_img_s": 400.0, "torch": torch.__version__, "device": "cpu",
            "threads": torch.get_num_threads()}
        assert r["train_images"] == 400 and r["command"].startswith(
            "python train_cifar10.py --preset cpu")
        # 2 epochs of 8 steps of 50 images; the steps from 80% of the run on (12.8 of 16: steps
        # 13, 14 and 15) with all tokens
        ph = r["phases"]
        assert r["images_seen"] == 800 and ph["full_token_share"] > 0
        assert ph["train_s"] + ph["eval_s"] <= ph["wall_s"]
        assert ph["drop_img_s"] > 0 and ph["full_img_s"] > 0  # (too tiny to compare speeds)
        hist = ckpt["history"]
        assert sum(h["full_images"] for h in hist) == 3 * 50
        # each epoch's curve, the gap included (--eval-train is not part of the run's key)
        assert [(c["elapsed_min"], c["eval_acc"], c["train_eval_acc"]) for c in r["curve"]] == [
            (round(h["elapsed_min"], 4), round(h["eval_acc"], 4), round(h["train_eval_acc"], 4))
            for h in hist]
        assert r["config"]["eval_train"] == 40
        assert r["key"] == cc.run_key(TrainConfig(**{**r["config"], "eval_train": 0}))
    base = [r["val_acc"] for r in got if r["baseline"]]
    mean, sd = np.mean(base), np.std(base, ddof=1)
    se = 100 * math.sqrt(mean / 100 * (1 - mean / 100) / 100)
    sigma = math.sqrt(sd ** 2 * (1 + 1 / 3) + se ** 2)
    table = (tmp_path / "res" / "two_epochs.md").read_text()
    assert f"均值 {mean:.2f}%" in table and f"s = {sd:.2f}" in table and f"se = {se:.2f}" in table
    assert f"= {sigma:.2f} 个百分点" in table
    assert table in capsys.readouterr().out
    with Image.open(tmp_path / "fig" / "study_two_epochs.png") as im:
        assert im.size[0] > 500
    # --report redraws from the rows alone, training nothing, even with a run still to do
    (tmp_path / "res" / "two_epochs.md").unlink()
    (tmp_path / "fig" / "study_two_epochs_curves.png").unlink()
    tiny_study(monkeypatch, "two", [*cc.baseline("base"), cc.Run("lr", {"lr": 3e-4}),
                                    cc.Run("not run", {"lr": 1e-4})])

    def no_training(*args, **kwargs):
        raise AssertionError("--report trained or measured the machine")

    monkeypatch.setattr(cc, "train_run", no_training)
    monkeypatch.setattr(cc, "reference_speed", no_training)
    cc.main(["--out", str(tmp_path / "res"), "--fig-dir", str(tmp_path / "fig"), "--study", "two",
             "--epochs", "2", "--report"])
    assert (tmp_path / "res" / "two_epochs.md").read_text() == table
    assert len(rows(tmp_path, "two")) == 4
    with Image.open(tmp_path / "fig" / "study_two_epochs_curves.png") as im:
        assert im.size[0] > 1000


def hand_row(label: str, acc: float, right: list[bool], seed: int = 0, baseline: bool = False,
             ref: float = 400.0, started: str = "2026-01-01T10:00:00+0000") -> dict:
    run = cc.Run(label, {}, seed, baseline)
    row = fake_row("s", run, cc.run_config(run, BUDGET, cc.BASE),
                   {"cpu": "test CPU", "ref_img_s": ref, "torch": "2"})
    return {**row, "val_acc": acc, "val_images": len(right), "started": started,
            "val_correct": np.packbits(np.array(right)).tobytes().hex()}


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_images():
    # 20 images: both right on 6, only the variant on 10, only the baseline on 2, both wrong on 2
    variant = [True] * 6 + [True] * 10 + [False] * 2 + [False] * 2
    base = [True] * 6 + [False] * 10 + [True] * 2 + [False] * 2
    a, b = hand_row("v", 80.0, variant), hand_row("b", 40.0, base, baseline=True)
    # P(X <= 2) for X ~ Binomial(12, 1/2), both tails: 2 * (1 + 12 + 66) / 4096
    assert cc.mcnemar(a, b) == pytest.approx(2 * 79 / 4096) == cc.mcnemar(b, a)
    assert cc.mcnemar(a, a) == 1.0


def test_the_noise_rule_decides_which_differences_are_real():
    """Three baseline seeds at 60, 61 and 62% on 5,000 images: s = 1, se = sqrt(.61 * .39 /
    5000) = 0.69 points, sigma = sqrt(1 * 4/3 + se^2) = 1.33; a variant 2.5 points up is within
    2 sigma (not real), 3 points up is beyond it."""
    right = [True] * 5000
    rows = [hand_row("base", acc, right, seed, True) for seed, acc in enumerate((60, 61, 62))]
    nz = cc.noise(rows)
    se = 100 * math.sqrt(0.61 * 0.39 / 5000)
    assert (nz["mean"], nz["sd"], nz["k"]) == (61, 1, 3) and nz["se"] == pytest.approx(se)
    assert nz["sigma"] == pytest.approx(math.sqrt(4 / 3 + se ** 2))
    study = cc.Study("s", "q", [cc.Run("base", {}, s, True) for s in range(3)]
                     + [cc.Run("up 2.5"), cc.Run("up 3", seed=1)])
    res = cc.Results.__new__(cc.Results)
    res.name, res.rows = "s", [*rows, hand_row("up 2.5", 63.5, right),
                               hand_row("up 3", 64.0, right, seed=1)]
    text = cc.table(study, res)
    assert "| up 2.5 | 0 | 63.50% | +2.50 | 否 |" in text
    assert "| up 3 | 1 | 64.00% | +3.00 | 是 |" in text


def with_rows(res: cc.Results, rows: list[dict]) -> cc.Results:
    out = cc.Results.__new__(cc.Results)
    out.name, out.rows = res.name, rows
    return out


def test_a_change_run_with_two_seeds_gets_a_mean_row_judged_by_its_own_noise():
    """Baseline seeds at 58 and 62% (s = 2.83, mean 60), se = sqrt(.6 * .4 / 5000) = 0.69: one
    run's 2 sigma = 2 sqrt(8 * 3/2 + se^2) = 7.07, so neither seed of a change at 66.0 / 66.5%
    is called real; their mean (+6.25) is judged by 2 sqrt(8 (1/2 + 1/2) + se^2) = 5.82: real."""
    right = [True] * 5000
    runs = [*cc.baseline("base", (0, 1)), *cc.seeded("up", {"lr": 1.0}, (0, 1)), cc.Run("once")]
    study = cc.Study("s", "q", runs, mean_rows=True)
    res = cc.Results.__new__(cc.Results)
    res.name, res.rows = "s", [hand_row("base", 58.0, right, 0, True),
                               hand_row("base", 62.0, right, 1, True),
                               hand_row("up", 66.0, right, 0), hand_row("up", 66.5, right, 1),
                               hand_row("once", 61.0, right)]
    se2 = 100 ** 2 * 0.6 * 0.4 / 5000
    text = cc.table(study, res)
    assert "| up | 0 | 66.00% | +6.00 | 否 |" in text and "| up | 1 | 66.50% | +6.50 | 否 |" in text
    assert "| up：2 个种子的均值 | 0, 1 | 66.25% | +6.25 | 是 |" in text
    assert "once：" not in text  # one seed: no mean row
    assert f"m = 2 时 2σ_m = {2 * math.sqrt(8 + se2):.2f}" in text
    assert 2 * math.sqrt(8 + se2) == pytest.approx(5.82, abs=0.005)  # the docstring's number
    # the studies without mean rows (the data study has several seeds of some fractions) keep
    # their tables as they were
    assert "均值 |" not in cc.table(cc.Study("s", "q", runs), res)
    # one baseline seed: the mean's noise is unknown; none: nothing to compare with
    one = cc.table(study, with_rows(res, [r for r in res.rows if r["seed"] == 0 or
                                          not r["baseline"]]))
    assert "| up：2 个种子的均值 | 0, 1 | 66.25% | +8.25 | 未知 |" in one and "nan" not in one
    none = cc.table(study, with_rows(res, [r for r in res.rows if not r["baseline"]]))
    assert "| up：2 个种子的均值 | 0, 1 | 66.25% | — | — |" in none
    assert cc.display_names(res.rows) == ["base (seed 0)", "base (seed 1)", "up (seed 0)",
                                          "up (seed 1)", "once"]


def test_with_one_baseline_seed_no_difference_is_called_real(tmp_path, monkeypatch):
    """A study stopped after its first baseline seed: the seeds' spread is unknown, so the table
    says "未知" for every variant (even 20 points up) and gives only the sampling error; the plot
    draws no noise band."""
    right = [True] * 5000
    study = cc.Study("s", "q", [cc.Run("base", {}, 0, True), cc.Run("base", {}, 1, True),
                                cc.Run("up 20")])
    res = cc.Results.__new__(cc.Results)
    res.name, res.rows = "s", [hand_row("base", 60.0, right, 0, True),
                               hand_row("up 20", 80.0, right)]
    text = cc.table(study, res)
    assert "| up 20 | 0 | 80.00% | +20.00 | 未知 |" in text
    assert "nan" not in text and "只有 1 个种子" in text
    assert f"√2·se = {math.sqrt(2) * 100 * math.sqrt(0.6 * 0.4 / 5000):.2f}" in text
    bands = []
    monkeypatch.setattr(cc.plt.Axes, "axvspan", lambda ax, *a, **k: bands.append(a))
    cc.plot(study, res, tmp_path / "p.png")
    assert bands == [] and (tmp_path / "p.png").stat().st_size > 10_000
    res.rows.append(hand_row("base", 62.0, right, 1, True))  # two seeds: the band is drawn
    cc.plot(study, res, tmp_path / "p.png")
    nz = cc.noise(res.rows)
    assert nz["mean"] == 61.0 and bands == [(61.0 - 2 * nz["sigma"], 61.0 + 2 * nz["sigma"])]


def test_report_refuses_what_it_cannot_do(tmp_path, capsys):
    """--report trains nothing: a --set is refused, and so is a study without finished rows of
    the budget asked for (a 7-minute file does not answer --budget-min 30)."""
    out = tmp_path / "res"
    out.mkdir()
    row = hand_row("base", 60.0, [True] * 8, 0, True)
    (out / "hour.json").write_text(json.dumps({"rows": [{**row, "study": "hour"}]}))
    for args, message in (
            (["--set", "lr=0.1"], "--set has no effect"),
            (["--epochs", "3"], "hour_epochs.json holds no finished runs"),
            (["--budget-min", "30"], "holds runs of 4 min each")):
        argv = ["--out", str(out), "--fig-dir", str(tmp_path / "fig"), "--study", "hour",
                "--report", *args]
        if "--set" in args:
            argv += ["--budget-min", "4"]
        with pytest.raises(SystemExit):
            cc.main(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "fig").exists() or not any((tmp_path / "fig").iterdir())


def test_rows_measured_far_from_the_first_reference_speed_are_flagged():
    right = [True] * 100
    rows = [hand_row("base", 60.0, right, 0, True, 400.0, "2026-01-01T10:00:00+0000"),
            hand_row("base", 60.0, right, 1, True, 450.0, "2026-01-01T11:00:00+0000"),
            hand_row("base", 60.0, right, 2, True, 350.0, "2026-01-01T12:00:00+0000")]
    study = cc.Study("s", "q", [cc.Run("base", {}, s, True) for s in range(3)])
    res = cc.Results.__new__(cc.Results)
    res.name, res.rows = "s", rows
    lines = [line for line in cc.table(study, res).splitlines() if line.startswith("| base")]
    flagged = [line.endswith(f" ⚠ | 01-01 1{h}:00 |") for line, h in zip(lines, "012", strict=True)]
    assert flagged == [False, True, True]  # +12.5% and -12.5% from the first run's 400 img/s
    assert "⚠：与本研究第一次运行（400）相差超过 10%" in cc.table(study, res)
    res.rows = rows[:1] + [hand_row("base", 60.0, right, 1, True, 430.0)]  # +7.5%: no flag
    text = cc.table(study, res)
    assert "⚠" not in text and "img/s（`python benchmark.py model`）。运行于" in text


def test_the_baseline_seeds_are_interleaved_with_the_variants():
    todo = ["b0", "v1", "v2", "b1", "v3", "v4", "b2"]
    mixed = cc.interleaved(sorted(todo), lambda t: t.startswith("b"))
    assert mixed == ["b0", "v1", "v2", "b1", "v3", "v4", "b2"]
    assert cc.interleaved(["b0", "b1", "b2", "v1"], lambda t: t[0] == "b") == [
        "b0", "b1", "v1", "b2"]
    assert cc.interleaved(["v1"], lambda t: t[0] == "b") == ["v1"]
    # two studies sharing the baseline: its seeds spread once, each copy right after its run
    two = ["p:b0", "p:b1", "p:b2", "p:v1", "p:v2", "q:b0", "q:b1", "q:b2", "q:v1", "q:v2"]
    assert cc.interleaved(two, lambda t: ":b" in t, lambda t: t[2:]) == [
        "p:b0", "q:b0", "p:v1", "p:v2", "p:b1", "q:b1", "q:v1", "q:v2", "p:b2", "q:b2"]


def test_runs_of_another_budget_are_refused_in_one_table(tmp_path):
    res = cc.Results(tmp_path, "s")
    res.add(a_row("a"))  # 4 minutes
    with pytest.raises(ValueError, match="holds runs of 4 min each; this command runs 6 min"):
        cc.check_budget(res.rows, {"time_budget": 6.0, "epochs": 1000}, "s.json")
    cc.check_budget(res.rows, BUDGET, "s.json")
    assert cc.results_name("patch", {"time_budget": 0.0, "epochs": 3}) == "patch_epochs"
    # a second process that checked before the first row existed is refused when it adds
    other = {**a_row("b", 2e-3), "config": {**a_row("b", 2e-3)["config"], "time_budget": 6.0}}
    with pytest.raises(ValueError, match="holds runs of 4 min each"):
        cc.Results(tmp_path, "s").add(other)
    slower = {**a_row("c", 3e-3), "machine": {"cpu": "test CPU", "ref_img_s": 250.0}}
    with pytest.raises(ValueError, match="this one is cpu with \\? threads, measuring 250"):
        cc.Results(tmp_path, "s").add(slower)
    threads = {**a_row("d", 4e-3), "machine": {"cpu": "test CPU", "ref_img_s": 400.0,
                                              "threads": 1}}
    cc.Results(tmp_path, "s").add(threads)  # rows without a thread count: not told apart
    with pytest.raises(ValueError, match="with 1 threads"):
        cc.Results(tmp_path, "s").add({**threads, "label": "e", "machine": {
            **threads["machine"], "threads": 2}})
    assert [r["label"] for r in cc.Results(tmp_path, "s").rows] == ["a", "d"]


def test_one_noisy_reference_reading_does_not_lock_a_file(tmp_path):
    """The speed check is against the median of the rows: a reading of 250 among 400s (a busy
    moment of a shared machine) neither refuses the next 400 nor lets a 260 in."""
    res = cc.Results(tmp_path, "s")
    res.add(a_row("a", 1e-3))
    res.add(a_row("b", 2e-3))  # both at 400; then a busy moment's 250, as an older check let in:
    noisy = {**a_row("c", 3e-3), "machine": {"cpu": "test CPU", "ref_img_s": 250.0}}
    res.path.write_text(json.dumps({"study": "s", "rows": [*res.rows, noisy]}))
    rows = cc.read_rows(res.path)
    assert cc.median_ref(rows) == 400.0
    cc.check_machine(rows, {"cpu": "test CPU", "ref_img_s": 560.0}, "s.json")  # 1.4x: same
    with pytest.raises(ValueError, match="median 400 img/s"):
        cc.check_machine(rows, {"cpu": "test CPU", "ref_img_s": 260.0}, "s.json")  # 1.54x


@slow
def test_rerun_skips_finished_rows_and_reuses_the_baseline(data_dir, tmp_path, monkeypatch,
                                                           fast_machine, capsys):
    tiny_study(monkeypatch, "one", cc.baseline("base")[:1])
    tiny_study(monkeypatch, "other", [*cc.baseline("same as base")[:1], cc.Run("lr", {"lr": 3e-4})])
    compare(tmp_path, data_dir, "--study", "one", "--epochs", "1")
    calls = []
    real_train = tc.train
    monkeypatch.setattr(tc, "train", lambda cfg, resume=None, data=None, ref_img_s=None:
                        calls.append(cfg) or real_train(cfg, resume, data, ref_img_s))
    compare(tmp_path, data_dir, "--study", "one", "other", "--epochs", "1")
    assert len(calls) == 1 and calls[0].lr == 3e-4  # only the new run trained
    assert "same run as one/'base', reused" in capsys.readouterr().out
    assert rows(tmp_path, "other")[0]["val_acc"] == rows(tmp_path, "one")[0]["val_acc"]
    compare(tmp_path, data_dir, "--study", "one", "other", "--epochs", "1")
    assert len(calls) == 1 and "every run is already done" in capsys.readouterr().out


@slow
def test_an_interrupted_study_keeps_its_rows_and_resumes(data_dir, tmp_path, monkeypatch,
                                                         fast_machine, capsys):
    tiny_study(monkeypatch, "three", [*cc.baseline("base"), cc.Run("lr", {"lr": 3e-4})])
    real_train = tc.train

    def interrupted_after_one_epoch(cfg, resume=None, data=None, ref_img_s=None):
        if cfg.seed == 1:  # Ctrl-C in the second run, after its first epoch
            real_train(cfg.replace(stop_at_epoch=1), resume, data, ref_img_s)
            raise SystemExit(130)
        return real_train(cfg, resume, data, ref_img_s)

    monkeypatch.setattr(tc, "train", interrupted_after_one_epoch)
    with pytest.raises(SystemExit) as e:
        compare(tmp_path, data_dir, "--study", "three", "--epochs", "2")
    assert e.value.code == 130 and "rerun the same command to continue" in capsys.readouterr().err
    assert [r["seed"] for r in rows(tmp_path, "three")] == [0]
    monkeypatch.setattr(tc, "train", real_train)
    compare(tmp_path, data_dir, "--study", "three", "--epochs", "2")
    assert "continuing 'base' from" in capsys.readouterr().out
    got = rows(tmp_path, "three")
    assert [(r["label"], r["seed"], r["epochs"]) for r in got] == [
        ("base", 0, 2), ("base", 1, 2), ("lr", 0, 2), ("base", 2, 2)]


def test_a_resumed_study_keeps_the_order_of_the_whole_study(data_dir, tmp_path, monkeypatch,
                                                             fake_training):
    """Baseline, change, change, baseline (hour_confirm's order): stopped after the first run,
    the rest keeps that order (the one baseline left does not jump to the front)."""
    tiny_study(monkeypatch, "s", [*cc.baseline("base", (0, 1)),
                                  *cc.seeded("lr", {"lr": 3e-4}, (0, 1))])
    make_row = cc.make_row

    def stop_after_the_first(*args):
        if len(fake_training) == 2:
            raise KeyboardInterrupt
        return make_row(*args)

    monkeypatch.setattr(cc, "make_row", stop_after_the_first)
    with pytest.raises(SystemExit):
        compare(tmp_path, data_dir, "--study", "s", "--epochs", "1")
    assert [r["seed"] for r in rows(tmp_path, "s")] == [0]
    monkeypatch.setattr(cc, "make_row", make_row)
    compare(tmp_path, data_dir, "--study", "s", "--epochs", "1")
    assert fake_training == [("s", "base", 0), ("s", "lr", 0),  # the second, interrupted
                             ("s", "lr", 0), ("s", "lr", 1), ("s", "base", 1)]


@slow
def test_budget_minutes_are_honoured(data_dir, tmp_path, monkeypatch, fast_machine):
    tiny_study(monkeypatch, "timed", cc.baseline("base")[:1])
    compare(tmp_path, data_dir, "--study", "timed", "--budget-min", "0.04")
    (r,) = rows(tmp_path, "timed")
    assert r["config"]["time_budget"] == 0.04 and r["config"]["epochs"] == 1000
    assert 0.04 <= r["minutes"] < 1.0 and 1 <= r["epochs"] < 1000  # stopped by the clock


@slow
def test_the_vit_and_the_cnn_see_the_same_images_in_the_same_order(data_dir, tmp_path, monkeypatch,
                                                                   fast_machine):
    runs = [r for r in cc.STUDIES["data"].runs if r.x == 0.5 and r.seed == 0]
    tiny_study(monkeypatch, "pair", runs, "lines")
    seen: dict[str, list[str]] = {}
    real_step = tc.Learner.step

    def record(self, x, target, lr):
        seen.setdefault(type(self.model).__name__, []).append(
            hashlib.sha1(x.numpy().tobytes()).hexdigest())
        return real_step(self, x, target, lr)

    monkeypatch.setattr(tc.Learner, "step", record)
    compare(tmp_path, data_dir, "--study", "pair", "--epochs", "2")
    assert set(seen) == {"VisionTransformer", "ResNetCIFAR"}
    assert seen["VisionTransformer"] == seen["ResNetCIFAR"] and len(seen["ResNetCIFAR"]) == 2 * 4
    assert (tmp_path / "fig" / "study_pair_epochs.png").is_file()


@slow
def test_rows_from_a_machine_of_another_speed_are_refused(data_dir, tmp_path, monkeypatch,
                                                          fast_machine, capsys):
    tiny_study(monkeypatch, "timed", cc.baseline("base")[:1])
    compare(tmp_path, data_dir, "--study", "timed", "--budget-min", "0.02")
    monkeypatch.setattr(cc, "reference_speed", lambda: 150.0)
    tiny_study(monkeypatch, "timed", cc.baseline("base"))
    with pytest.raises(SystemExit):
        compare(tmp_path, data_dir, "--study", "timed", "--budget-min", "0.02")
    err = capsys.readouterr().err
    assert "at a median 400 img/s" in err and "measuring 150 img/s" in err


@pytest.mark.parametrize("args, message", [
    (["--study", "nope", "--epochs", "1"], "invalid choice: 'nope'"),
    (["--study", "patch", "--budget-min", "0"], "--budget-min must be a positive number"),
    (["--study", "patch", "--budget-min", "-3"], "--budget-min must be a positive number"),
    (["--study", "patch", "--budget-min", "inf"], "--budget-min must be a positive number"),
    (["--study", "patch", "--budget-min", "nan"], "--budget-min must be a positive number"),
    (["--study", "patch"], "--budget-min M (equal time) or --epochs E"),
    (["--study", "patch", "--epochs", "0"], "--epochs must be at least 1"),
    (["--study", "patch", "--epochs", "1", "--budget-min", "2"], "not allowed with argument"),
    (["--study", "patch", "--epochs", "1", "--set", "colour=red"],
     "--set expects FIELD=VALUE with a field"),
    (["--study", "patch", "--epochs", "1", "--set", "lr=fast"],
     "--set lr: expected a float, got 'fast'"),
    (["--study", "patch", "--epochs", "1", "--set", "lr=-1"], "--lr must be positive"),
])
def test_bad_input_fails_clearly(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cc.main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_list_names_every_study_and_run(capsys):
    cc.main(["--list"])
    out = capsys.readouterr().out
    for s in cc.STUDIES.values():
        assert out.count(f"{s.name}: ") == 1
        assert all(r.label in out for r in s.runs)


# --------------------------------------------------------------------------------------------
# The results files and the output folders (runs "trained" at once by fake_training)
# --------------------------------------------------------------------------------------------

def fake_row(study: str, run: cc.Run, cfg: TrainConfig, machine: dict) -> dict:
    """A row as make_row writes it, with made-up numbers."""
    return {"study": study, "label": run.label, "seed": run.seed, "baseline": run.baseline,
            "line": run.line, "x": run.x, "key": cc.run_key(cfg),
            "config": dataclasses.asdict(cfg), "command": "python train_cifar10.py",
            "val_acc": 50.0 + run.seed, "test_acc": 49.0, "epochs": cfg.epochs, "minutes": 0.1,
            "images_per_sec": 100.0, "train_images": 400, "images_seen": 800, "params": 1000,
            "mflops": 1.0, "machine": machine, "date": "2025-01-01", "run_dir": "",
            "started": "2025-01-01T00:00:00+0000", "val_images": 8, "val_correct": "f0",
            "phases": {"train_s": 6.0, "eval_s": 1.0, "save_other_s": 0.5, "wall_s": 7.5,
                       "drop_img_s": 100.0, "full_img_s": 50.0, "full_token_share": 0.2}}


@pytest.fixture
def fake_training(monkeypatch, fast_machine) -> list[tuple[str, str, int]]:
    """Runs that finish at once with a made-up row; the list of (study, label, seed) trained."""
    trained: list[tuple[str, str, int]] = []

    def train_run(study, run, cfg, args, data, rows, ref):
        trained.append((study, run.label, run.seed))
        return Path(args.checkpoint_dir) / study / f"{study}-{cc.run_key(cfg)}"

    monkeypatch.setattr(cc, "train_run", train_run)
    monkeypatch.setattr(cc, "make_row", lambda study, run, cfg, run_dir, data, machine, started:
                        fake_row(study, run, cfg, machine))
    return trained


def a_row(label: str, lr: float = 1e-3) -> dict:
    run = cc.Run(label, {"lr": lr})
    return fake_row("s", run, cc.run_config(run, BUDGET, cc.BASE),
                    {"cpu": "test CPU", "ref_img_s": 400.0, "torch": "2"})


def test_two_writers_of_one_results_file_keep_every_row(tmp_path):
    """Before: no s.json. Two Results objects on it (two processes running studies into one
    --out) add rows in turn. After: s.json holds all three rows (unlocked whole-file writes kept
    only the last writer's own rows)."""
    a, b = cc.Results(tmp_path, "s"), cc.Results(tmp_path, "s")
    a.add(a_row("a1", 1e-3))
    b.add(a_row("b1", 2e-3))
    a.add(a_row("a2", 3e-3))
    on_disk = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["label"] for r in on_disk] == ["a1", "b1", "a2"]
    assert [r["label"] for r in cc.Results(tmp_path, "s").rows] == ["a1", "b1", "a2"]


def _add_rows(folder: str, who: str, n: int) -> None:
    res = cc.Results(Path(folder), "s")
    for i in range(n):
        res.add(a_row(f"{who}{i}", 1e-3 * (1 + i) + (0.5e-4 if who == "b" else 0)))


@slow
def test_two_processes_adding_rows_at_once_lose_none(tmp_path):
    """Before: no s.json. Two processes add 40 rows each to it at the same time. After: s.json
    holds all 80 rows, each once."""
    run_at_once(_add_rows, [(str(tmp_path), who, 40) for who in "ab"])
    labels = [r["label"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]]
    assert sorted(labels) == sorted(f"{who}{i}" for who in "ab" for i in range(40))


def _good_file() -> dict:
    return {"study": "two", "rows": [a_row("base")]}


def _without(key: str, inner: str = "") -> str:
    data = _good_file()
    del (data["rows"][0][inner] if inner else data["rows"][0])[key]
    return json.dumps(data)


@pytest.mark.parametrize("content", [
    "{not json", b"\xff\xfe binary", "[]", '{"study": "two"}', '{"study": "two", "rows": 3}',
    '{"study": "two", "rows": [3]}', _without("key"), _without("machine"),
    _without("ref_img_s", "machine"), _without("val_acc"), _without("time_budget", "config"),
    json.dumps({"study": "two", "rows": [{**a_row("base"), "val_acc": "high"}]}),
    # what the table and a fine-tuning read (these crashed after a run had trained)
    _without("classes", "config"), _without("warmup_frac", "config"), _without("run_dir"),
])
@pytest.mark.parametrize("whose", ["two", "other"])
def test_a_broken_results_file_is_refused_before_training_and_left_as_it_is(
        data_dir, tmp_path, monkeypatch, fake_training, capsys, content, whose):
    """Before: res/WHOSE.json is broken (the study's own file, or another study's whose rows
    could be reused). After: one line `error:` naming the file and what to do, nothing trained,
    the file byte for byte as it was."""
    tiny_study(monkeypatch, "two", cc.baseline("base"))
    path = tmp_path / "res" / f"{whose}_epochs.json"
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = path.read_bytes()
    with pytest.raises(SystemExit) as e:
        compare(tmp_path, data_dir, "--study", "two", "--epochs", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert str(path) in err and "move it away" in err
    assert fake_training == [] and path.read_bytes() == before


@pytest.mark.parametrize("setting, flag", [
    ("seed=5", "seeds are part of each study"), ("epochs=7", "--epochs"),
    ("time_budget=3", "--budget-min"), ("time-budget=3", "--budget-min"),
    ("data_dir=/tmp/x", "--data-dir"), ("download=true", "--download"),
    ("out_dir=/tmp/x", "--checkpoint-dir"), ("run_name=x", "named by their study"),
])
def test_settings_the_study_controls_are_refused_in_set(data_dir, tmp_path, monkeypatch,
                                                        fake_training, capsys, setting, flag):
    """Before: no res/. `--set` of a setting the study sets itself (it was silently overridden or
    ignored). After: one line `error: --set NAME: ...` naming the right flag, nothing trained, no
    res/ folder."""
    tiny_study(monkeypatch, "two", cc.baseline("base"))
    with pytest.raises(SystemExit) as e:
        compare(tmp_path, data_dir, "--study", "two", "--epochs", "1", "--set", setting)
    err = capsys.readouterr().err
    name = setting.split("=")[0].replace("-", "_")
    assert e.value.code == 2 and err.startswith(f"error: --set {name}: ") and flag in err
    assert fake_training == [] and not (tmp_path / "res").exists()


@pytest.mark.parametrize("studies, setting", [
    (["patch"], "patch_size=8"), (["posembed"], "pos_embed=none"),
    (["data"], "train_fraction=0.1"), (["data"], "model=vit_cifar_small"),
    (["classifier"], "lr=3e-4"), (["transfer"], "val_split=100"),
    (["patch", "size"], "embed_dim=64"),
])
def test_a_setting_the_study_varies_is_refused_in_set(data_dir, tmp_path, fake_training, capsys,
                                                      studies, setting):
    """Before: no res/. `--set` of a setting that a run of the study changes (it was accepted:
    `--study patch --set patch_size=8` trained the 'P=4 (baseline)' rows with P=8). After: one
    line `error: --set NAME:` naming the study, nothing trained, no res/ folder."""
    name = setting.split("=")[0]
    with pytest.raises(SystemExit) as e:
        cc.main(["--study", *studies, "--epochs", "1", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "res"), "--set", setting])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --set {name}: ") and err.count("\n") == 1
    assert f"the {studies[-1]} study varies it" in err
    assert fake_training == [] and not (tmp_path / "res").exists()


def test_a_vit_only_setting_stays_allowed_in_set_for_the_data_study(data_dir, tmp_path,
                                                                   fake_training):
    """`--set embed_dim=64` with the data study: the ViT runs train at D=64, the CNN runs undo it
    (as_cnn()); every run of the study trains."""
    tiny = [s for s in SMALL if not s.startswith(("embed_dim=", "val_split="))]
    cc.main(["--study", "data", "--epochs", "1", "--data-dir", str(data_dir), "--out",
             str(tmp_path / "res"), "--fig-dir", str(tmp_path / "fig"), "--checkpoint-dir",
             str(tmp_path / "ck"), "--set", *tiny, "embed_dim=64"])
    assert len(fake_training) == len(cc.STUDIES["data"].runs)
    got = {(r["config"]["model"], r["config"]["embed_dim"]) for r in rows(tmp_path, "data")}
    assert got == {("vit_cifar_tiny", 64), ("resnet_cifar", TrainConfig().embed_dim)}


@pytest.mark.parametrize("folder", ["res/two_epochs.json", "res/.two_epochs.json.lock",
                                    "res/two_epochs.md", "fig/study_two_epochs.png"])
def test_a_folder_where_an_output_file_goes_fails_before_the_first_run(
        data_dir, tmp_path, monkeypatch, fake_training, capsys, folder):
    """Before: FOLDER (where the study writes its rows, their lock file, its table or its plot)
    is an empty folder. After: one line `error:` naming it, nothing trained, no results file
    written, FOLDER still an empty folder (not failing after the first run, or after all of
    them). The rows' temporary file is named by the writing process, so no folder can stand in
    its way."""
    tiny_study(monkeypatch, "two", cc.baseline("base"))
    (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        compare(tmp_path, data_dir, "--study", "two", "--epochs", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert f"{tmp_path / folder} is a folder" in err
    assert fake_training == [] and list((tmp_path / folder).iterdir()) == []
    assert not (tmp_path / "res" / "two_epochs.json").is_file()
    assert not (tmp_path / "res" / "two_epochs.json.tmp").is_file()


@pytest.mark.parametrize("option", ["--out", "--fig-dir", "--checkpoint-dir"])
@pytest.mark.parametrize("where", ["file", "file/below"])
def test_an_output_folder_that_cannot_be_written_fails_before_the_first_run(
        data_dir, tmp_path, monkeypatch, fake_training, capsys, option, where):
    """Before: tmp/file is a file. OPTION points at it (or below it). After: one line `error:`
    naming the option, nothing trained, no results file written, tmp/file unchanged."""
    tiny_study(monkeypatch, "two", cc.baseline("base"))
    (tmp_path / "file").write_text("a file\n")
    with pytest.raises(SystemExit) as e:
        compare(tmp_path, data_dir, "--study", "two", "--epochs", "1",
                option, str(tmp_path / where))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {option} ") and err.count("\n") == 1
    assert fake_training == [] and not (tmp_path / "res" / "two_epochs.json").exists()
    assert (tmp_path / "file").read_text() == "a file\n"


def test_default_outputs_leave_the_committed_results_and_figures_alone(
        data_dir, tmp_path, monkeypatch, fake_training):
    """Before: results/two.json, results/two.md and figures/study_two.png as committed in the
    repository (here in a copy of its layout). A study run with the default --out and --fig-dir.
    After: those three files byte for byte as they were; the run's rows, table and plot in
    outputs/results/ and outputs/figures/."""
    tiny_study(monkeypatch, "two", cc.baseline("base"))
    monkeypatch.chdir(tmp_path)
    committed = {Path("results/two_epochs.json"): json.dumps(_good_file()).encode(),
                 Path("results/two_epochs.md"): b"the guide's table\n",
                 Path("figures/study_two_epochs.png"): b"the guide's plot"}
    for path, content in committed.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    cc.main(["--study", "two", "--epochs", "1", "--data-dir", str(data_dir),
             "--checkpoint-dir", "ck", "--set", *SMALL])
    assert {p: p.read_bytes() for p in committed} == committed
    assert fake_training == [("two", "base", 0), ("two", "base", 1), ("two", "base", 2)]
    assert len(json.loads(Path("outputs/results/two_epochs.json").read_text())["rows"]) == 3
    assert Path("outputs/results/two_epochs.md").is_file()
    assert Path("outputs/figures/study_two_epochs.png").is_file()
    args = cc.parse_args(["--study", "two", "--epochs", "1"])
    assert (args.out, args.fig_dir) == ("outputs/results", "outputs/figures")
    assert "--out results --fig-dir figures" in " ".join(cc.__doc__.split())


def test_the_committed_results_files_stay_readable(repo):
    """Before and after: results/*.json as committed; each reads as rows of its study."""
    for path in sorted((repo / "results").glob("*.json")):
        res = cc.Results(repo / "results", path.stem)
        study = path.stem.removesuffix("_epochs")
        assert res.rows and {r["study"] for r in res.rows} == {study}
        assert cc.table(cc.STUDIES[study], res).startswith(f"### {path.stem}")
        # each row's key as recorded, from its config as recorded (settings added since then
        # at their defaults): a resumed study finds all its rows
        for r in res.rows:
            assert cc.run_key(TrainConfig(**r["config"])) == r["key"], (path.name, r["label"])


@pytest.mark.slow
def test_the_transfer_study_fine_tunes_from_its_own_source_runs(data_dir, tmp_path, monkeypatch,
                                                                fast_machine):
    checked = ("ViT fine-tuned, 10%", "ResNet fine-tuned, 1%", "ViT fine-tuned at 48x48, 10%")
    runs = [dataclasses.replace(r, changes={**r.changes, "val_split": min(
        r.changes["val_split"], 20)}) for r in cc.STUDIES["transfer"].runs
        if r.baseline or "source" in r.label or r.label in checked]  # the sources before their use
    tiny_study(monkeypatch, "transfer", runs, "lines")
    without_val_split = [s for s in SMALL if not s.startswith("val_split=")]  # the study varies it
    cc.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "res"), "--fig-dir",
             str(tmp_path / "fig"), "--checkpoint-dir", str(tmp_path / "ck"), "--study",
             "transfer", "--epochs", "1", "--set", *without_val_split, "batch_size=4"])
    got = {r["label"]: r for r in rows(tmp_path, "transfer")}
    assert len(got) == len(runs) - 2  # the baseline's three seeds share a label
    source = load_checkpoint(Path(got["ViT source, 5 classes"]["run_dir"]) / "best.pt")
    assert source["classes"] == cc.SOURCE.split(",")
    for label, src in (("ViT fine-tuned, 10%", "ViT source, 5 classes"),
                       ("ResNet fine-tuned, 1%", "ResNet source, 5 classes")):
        ckpt = load_checkpoint(Path(got[label]["run_dir"]) / "last.pt")
        assert ckpt["classes"] == cc.TARGET.split(",")
        assert ckpt["config"]["init"] == str(Path(got[src]["run_dir"]) / "best.pt")
        assert got[label]["config"]["init"] == f"run:{src}"  # the row's key does not depend
    high = load_checkpoint(Path(got["ViT fine-tuned at 48x48, 10%"]["run_dir"]) / "last.pt")
    assert high["model_config"]["img_size"] == 48
    assert (tmp_path / "fig" / "study_transfer_epochs.png").is_file()


def test_a_run_of_another_baseline_is_refused_in_one_table(tmp_path):
    """A --set changes the baseline of every run and so their keys: such rows must not join a
    table of the plain baseline, where they would sit beside its other seeds unmarked."""
    patch = cc.STUDIES["patch"]
    machine = {"cpu": "test CPU", "ref_img_s": 400.0, "torch": "2"}
    res = cc.Results(tmp_path, "patch")
    res.add(fake_row("patch", patch.runs[0], cc.run_config(patch.runs[0], BUDGET, cc.BASE),
                     machine))
    p8 = patch.runs[-1]
    wider = cc.run_config(p8, BUDGET, {**cc.BASE, "batch_size": 256})
    with pytest.raises(ValueError, match=r"batch_size \(128 there, 256 here\)"):
        res.add(fake_row("patch", p8, wider, machine))
    res.add(fake_row("patch", p8, cc.run_config(p8, BUDGET, cc.BASE), machine))  # its own change
    assert [r["label"] for r in cc.Results(tmp_path, "patch").rows] == [patch.runs[0].label,
                                                                         p8.label]


def test_a_row_from_before_a_newer_setting_is_of_another_baseline_than_one_with_it_on(tmp_path):
    """A row recorded before --mimetic-init existed (its config lacks it) was trained without it:
    a run with --set mimetic_init=true must not join its table (the settings a row lacks were
    not compared, so both sat in one table under the same labels)."""
    patch = cc.STUDIES["patch"]
    machine = {"cpu": "test CPU", "ref_img_s": 400.0, "torch": "2"}
    old = fake_row("patch", patch.runs[0], cc.run_config(patch.runs[0], BUDGET, cc.BASE), machine)
    del old["config"]["mimetic_init"]
    res = cc.Results(tmp_path, "patch")
    res.add(old)
    mimetic = cc.run_config(patch.runs[1], BUDGET, {**cc.BASE, "mimetic_init": True})
    with pytest.raises(ValueError, match=r"mimetic_init \(False there, True here\)"):
        res.add(fake_row("patch", patch.runs[1], mimetic, machine))
    res.add(fake_row("patch", patch.runs[1], cc.run_config(patch.runs[1], BUDGET, cc.BASE),
                     machine))  # without it: the same baseline as the old row's
    assert len(cc.Results(tmp_path, "patch").rows) == 2


def test_a_set_of_another_baseline_than_the_rows_fails_before_the_first_run(
        data_dir, tmp_path, monkeypatch, fake_training, capsys):
    """Before: res/two_epochs.json holds the baseline's rows. A rerun with another --set (and a
    run still to do) used to train that run first and be refused only when adding its row.
    After: one line `error:`, nothing trained, the file as it was."""
    tiny_study(monkeypatch, "two", cc.baseline("base"))
    compare(tmp_path, data_dir, "--study", "two", "--epochs", "1")
    tiny_study(monkeypatch, "two", [*cc.baseline("base"), cc.Run("lower lr", {"lr": 3e-4})])
    path = tmp_path / "res" / "two_epochs.json"
    before, trained = path.read_bytes(), list(fake_training)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cc.main(["--study", "two", "--epochs", "1", "--data-dir", str(data_dir), "--out",
                 str(tmp_path / "res"), "--fig-dir", str(tmp_path / "fig"), "--checkpoint-dir",
                 str(tmp_path / "ck"), "--set", *SMALL, "weight_decay=0.01"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "one table, one baseline" in err and "weight_decay" in err
    assert fake_training == trained and path.read_bytes() == before


def test_a_study_resumed_without_its_measurements_fails_before_the_first_run(
        data_dir, tmp_path, monkeypatch, fake_training, capsys):
    """Before: res/two_epochs.json holds baseline rows measured with --set eval_train=20. A rerun
    that forgets the --set (measure-only: the run keys are the same) used to add rows without a
    gap curve. After: one line `error:` that names the --set to give, nothing trained, the file
    as it was; with the --set, the new run trains."""
    tiny_study(monkeypatch, "two", cc.baseline("base")[:1])
    compare(tmp_path, data_dir, "eval_train=20", "--study", "two", "--epochs", "1")
    tiny_study(monkeypatch, "two", [*cc.baseline("base")[:1], cc.Run("lower lr", {"lr": 3e-4})])
    path = tmp_path / "res" / "two_epochs.json"
    before, trained = path.read_bytes(), list(fake_training)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        compare(tmp_path, data_dir, "--study", "two", "--epochs", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "one table, one set of measurements" in err
    assert "`--set eval_train=20`" in err
    assert fake_training == trained and path.read_bytes() == before
    compare(tmp_path, data_dir, "eval_train=20", "--study", "two", "--epochs", "1")
    assert fake_training == [*trained, ("two", "lower lr", 0)]
    assert [cc.measured(r["config"]) for r in rows(tmp_path, "two")] == [(("eval_train", 20),)] * 2


def test_an_interrupted_run_continues_only_with_the_measurements_it_started_with(
        data_dir, tmp_path, monkeypatch, fake_training, capsys):
    """No row yet, but the first run was interrupted with --set eval_train=20 (its last.pt
    says so): a rerun without the --set is refused before training (it would continue the run
    and record a row with eval_train=0 over a curve that has the gap for its first epochs)."""
    tiny_study(monkeypatch, "two", cc.baseline("base")[:1])
    cfg = cc.run_config(cc.STUDIES["two"].runs[0], {"time_budget": 0.0, "epochs": 1},
                        {**cc.BASE, **cc.parse_settings(SMALL)})
    last = cc.run_folder(str(tmp_path / "ck"), "two", cfg) / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"config": dataclasses.asdict(cfg.replace(eval_train=20))}, last)
    with pytest.raises(SystemExit) as e:
        compare(tmp_path, data_dir, "--study", "two", "--epochs", "1")
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "last.pt (interrupted) holds runs measured with eval_train=20" in err
    assert fake_training == []
    compare(tmp_path, data_dir, "eval_train=20", "--study", "two", "--epochs", "1")
    assert fake_training == [("two", "base", 0)]


def test_a_file_whose_rows_measure_in_different_ways_is_named_as_such():
    """Rows added before the check existed may disagree among themselves: the message says so
    (a `--set` matching one of them would not help) instead of naming one row's setting."""
    plain, measuring = a_row("plain"), a_row("measuring", lr=3e-4)
    measuring["config"]["eval_train"] = 20
    with pytest.raises(ValueError, match=r"measured in different ways \(eval_train=0: 'plain' "
                                         r"\(seed 0\); eval_train=20: 'measuring' \(seed 0\)\)"):
        cc.check_measures([plain, measuring], plain["config"], "s.json")
    del plain["config"]["eval_train"]  # a row from before the setting: measured the default
    cc.check_measures([plain], {**plain["config"], "eval_train": 0}, "s.json")
    with pytest.raises(ValueError, match=r"leave out the --set of eval_train"):
        cc.check_measures([plain], {**plain["config"], "eval_train": 20}, "s.json")


def test_a_row_measured_otherwise_is_not_reused_in_another_study(data_dir, tmp_path,
                                                                  monkeypatch, fake_training,
                                                                  capsys):
    """The same run (one key: eval_train trains nothing) finished in a study without
    --eval-train is trained again for a study with it, whose rows all carry the gap curve;
    one measured alike is reused."""
    tiny_study(monkeypatch, "one", cc.baseline("base")[:1])
    tiny_study(monkeypatch, "other", cc.baseline("same as base")[:1])
    tiny_study(monkeypatch, "third", cc.baseline("again")[:1])
    compare(tmp_path, data_dir, "--study", "one", "--epochs", "1")
    compare(tmp_path, data_dir, "eval_train=20", "--study", "other", "--epochs", "1")
    compare(tmp_path, data_dir, "eval_train=20", "--study", "third", "--epochs", "1")
    assert fake_training == [("one", "base", 0), ("other", "same as base", 0)]
    out = capsys.readouterr().out
    assert "same run as one/'base', but measured with eval_train=0: trained again" in out
    assert "[third] again: same run as other/'same as base', reused" in out
    assert rows(tmp_path, "one")[0]["key"] == rows(tmp_path, "other")[0]["key"]
    assert rows(tmp_path, "third")[0]["config"]["eval_train"] == 20


def test_report_leaves_out_rows_that_are_no_run_of_the_study(tmp_path, capsys):
    """A row whose label the study no longer has (a run renamed since) is left out of the table
    with a line naming it; a file of such rows only is refused (it crashed on an empty table)."""
    out, base = tmp_path / "res", cc.STUDIES["hour"].runs[0]
    out.mkdir()
    keep = {**hand_row(base.label, 60.0, [True] * 8, 0, True), "study": "hour"}
    gone = {**hand_row("an old name", 50.0, [False] * 8), "study": "hour"}
    argv = ["--out", str(out), "--fig-dir", str(tmp_path / "fig"), "--study", "hour",
            "--report", "--budget-min", "4"]
    (out / "hour.json").write_text(json.dumps({"rows": [gone]}))
    with pytest.raises(SystemExit):
        cc.main(argv)
    assert ("none of its rows is a run of the study now: 'an old name' (seed 0), no run of the "
            "hour study now") in capsys.readouterr().err
    assert not (out / "hour.md").exists()
    (out / "hour.json").write_text(json.dumps({"rows": [keep, gone]}))
    (out / "hour_epochs.json").write_text(json.dumps({"rows": [gone]}))  # the other budget's
    cc.main(argv)
    assert ("left out of the table and plots: 'an old name' (seed 0), no run of the hour study "
            "now") in capsys.readouterr().err
    text = (out / "hour.md").read_text()
    assert f"| {base.label} | 0 | 60.00% |" in text and "an old name" not in text
    # no views plot beside a file without rows of the study (it crashed on an empty plot)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["study_hour.png"]


def test_a_renamed_run_gets_its_row_back_under_its_new_label_without_training(
        data_dir, tmp_path, monkeypatch, fake_training, capsys):
    """A run renamed in the study (same settings, so the same key) was counted as finished
    while the table left its row out as no run of the study: now its row is reused under the
    new label, and the old one is named as left out."""
    tiny_study(monkeypatch, "s", [*cc.baseline("base")[:1], cc.Run("lr", {"lr": 3e-4})])
    compare(tmp_path, data_dir, "--study", "s", "--epochs", "1")
    trained = list(fake_training)
    tiny_study(monkeypatch, "s", [*cc.baseline("base")[:1], cc.Run("lower lr", {"lr": 3e-4})])
    compare(tmp_path, data_dir, "--study", "s", "--epochs", "1")
    out = capsys.readouterr()
    assert fake_training == trained and "same run as s/'lr', reused" in out.out
    assert "left out of the table and plots: 'lr' (seed 0)" in out.err
    got = {r["label"]: r for r in rows(tmp_path, "s")}
    assert got["lower lr"]["key"] == got["lr"]["key"]
    assert got["lower lr"]["val_acc"] == got["lr"]["val_acc"]
    assert "| lower lr |" in (tmp_path / "res" / "s_epochs.md").read_text()


@pytest.mark.parametrize("setting", [{}, {"embed_dim": 64}, {"weight_decay": 0.01}])
def test_the_runs_of_one_study_share_one_baseline_and_a_vit_only_set_is_another(setting):
    """Every run of a study (the CNN's, which undo ViT-only settings, and the fine-tuned, with
    their source's architecture, included) passes check_base beside the others under one --set;
    a ViT row with `--set embed_dim=64` is refused beside the plain baseline's (it passed: the
    CNN runs' reset of embed_dim counted as something the data study varies)."""
    for study in cc.STUDIES.values():
        configs = [dataclasses.asdict(cc.run_config(r, BUDGET, {**cc.BASE, **setting}))
                   for r in study.runs]
        for config in configs:
            cc.check_base([{"config": c} for c in configs], config, study, study.name)
    data = cc.STUDIES["data"]
    plain = dataclasses.asdict(cc.run_config(data.runs[0], BUDGET, cc.BASE))
    wide = dataclasses.asdict(cc.run_config(data.runs[3], BUDGET, {**cc.BASE, "embed_dim": 64}))
    with pytest.raises(ValueError, match=r"embed_dim \(None there, 64 here\)"):
        cc.check_base([{"config": plain}], wide, data, "data.json")
