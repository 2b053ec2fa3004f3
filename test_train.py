"""Tests for train_cifar10.py: the schedule with a fake clock, the optimisers, evaluation, and
whole tiny runs (exact resume, time budget, evaluation subsets, DDP, Ctrl-C), on small data sets
the tests make themselves. Whole runs and other processes are marked slow."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_cifar10 as tc
from checkpoint import input_normalization, load_checkpoint, model_from_checkpoint
from config import (
    PRESETS,
    TrainConfig,
    build_model,
    build_parser,
    check_same_model,
    config_command,
    config_from_args,
    model_config_of,
    preset,
    resolution_stages,
)
from data import load_dataset
from vit_model import vit_cifar

slow = pytest.mark.slow


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# The schedule: learning rate, time budget, full-token epochs (no training)
# ---------------------------------------------------------------------------------------------

def test_lr_at_warms_up_then_follows_the_cosine():
    lr, min_lr = 1e-3, 1e-5
    assert [tc.lr_at(s, 0.0, 4, lr, min_lr) for s in range(4)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3])
    for p in (0.0, 0.25, 0.5, 1.0, 1.5):
        expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
        assert tc.lr_at(10, p, 4, lr, min_lr) == pytest.approx(expected)


def test_linear_decay_reaches_min_lr_in_a_straight_line():
    lrs = [tc.lr_at(10, p, 4, 1e-3, 0.0, "linear") for p in (0.0, 0.25, 1.0)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 0.0])


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def budget_config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 100, "warmup_epochs": 1.0, "patch_drop": 0.5,
                          "full_token_epochs": 1, **kw})


def test_time_budget_rules_with_a_fake_clock():
    clock = FakeClock()
    s = tc.Schedule(budget_config(time_budget=10.0), steps_per_epoch=5, clock=clock)  # 600 s
    assert s.warmup_steps == 5 and s.progress(3) == 0.0  # warmup: by steps
    clock.t += 60
    s.read(4)
    assert s.warmup_end_s is None  # still in the warmup
    s.read(5)
    assert s.progress(5) == 0.0 and s.warmup_end_s == 60  # the decay starts when the warmup ends
    clock.t += 270
    assert s.progress(50) == 0.0  # the clock is only seen when read
    s.read(50)
    assert s.progress(50) == pytest.approx(0.5) and not s.spent
    assert s.progress(50) == s.progress(50)  # asking twice changes nothing
    # full-token phase: epochs with dropout took 20 s, so a full-token epoch costs 40 s
    history = [{"epoch_time": 20.0, "patch_drop": 0.5}] * 3
    clock.t = 1000 + 559
    assert not s.full_tokens(10, 60, history)  # 41 s left
    clock.t = 1000 + 560
    assert s.full_tokens(10, 60, history)  # 40 s left
    assert not s.is_last(10)
    clock.t = 1000 + 600
    s.read(99)
    assert s.spent and s.is_last(10) and s.progress(99) == pytest.approx(1.0)
    assert s.lr(99) == pytest.approx(TrainConfig().min_lr)


def test_time_budget_carries_elapsed_time_over_a_resume_and_replans():
    clock = FakeClock()
    s = tc.Schedule(budget_config(time_budget=20.0), 5, elapsed_s=600.0, warmup_end_s=60.0,
                    clock=clock)
    assert s.read(100) == 600.0 and not s.spent  # a 10-minute run resumed with 20 minutes
    assert s.progress(100) == pytest.approx((600 - 60) / (1200 - 60))  # now ends at 20 minutes
    assert list(s.remaining_epochs(7, 100)) == list(range(7, 100))
    spent = tc.Schedule(budget_config(time_budget=10.0), 5, elapsed_s=600.0, clock=clock)
    assert list(spent.remaining_epochs(7, 100)) == []  # resumed with its time spent: nothing to do
    steps = tc.Schedule(budget_config(epochs=30), 10, clock=clock)
    assert steps.progress(10 + 145) == pytest.approx(0.5)  # 290 post-warmup steps in 30 epochs
    assert not steps.full_tokens(28, 0, []) and steps.full_tokens(29, 0, [])  # the last, by count
    assert steps.is_last(29) and not steps.is_last(28)
    stopping = tc.Schedule(budget_config(epochs=30, stop_at_epoch=4), 10)
    assert list(stopping.remaining_epochs(1, 10)) == [1, 2, 3]


def simulate(cfg: TrainConfig, step_s: float, steps_per_epoch: int = 50, eval_s: float = 0.0
             ) -> dict[str, float]:
    """A run of cfg with a fake clock, as train() drives the Schedule: `step_s` a step with patch
    dropout, step_s / (1 - patch_drop) without, `eval_s` for each epoch's evaluation (paused);
    returns when (as a fraction of the training time) the warmup ended and the full-token phase
    began, the training and the wall time."""
    clock = FakeClock()
    s = tc.Schedule(cfg, steps_per_epoch, clock=clock)
    step, warm_end, full_start, trained = 0, None, None, 0.0
    for _ in s.remaining_epochs(0, 0):
        for i in range(steps_per_epoch):
            if s.reads_every_step:
                s.read(step)
            lr = s.lr(step)
            if warm_end is None and (lr >= cfg.lr * (1 - 1e-9) or s.progress(step) > 0):
                warm_end = trained
            full = s.full_tokens_at(step)
            if full and full_start is None:
                full_start = trained
            dt = step_s / (1 - cfg.patch_drop) if full else step_s
            clock.t += dt
            trained += dt
            step += 1
            if (i + 1) % cfg.log_every == 0 or i + 1 == steps_per_epoch:
                s.read(step)
                if s.spent:
                    break
        with s.paused():
            clock.t += eval_s
        s.read(step)
        if s.spent:
            break
    return {"warmup": warm_end / trained, "full": full_start / trained, "train_s": trained,
            "elapsed_s": s.read(step), "wall_s": s.wall_s, "steps": step}


@pytest.mark.parametrize("clock", ["train", "wall"])
def test_warmup_and_full_token_phase_are_the_same_share_of_every_run(clock):
    """--warmup-frac and --full-token-frac: a run 4x slower (a bigger model) spends the same
    share of its time warming up and training with all tokens, by time and by steps."""
    cfg = budget_config(time_budget=5.0, warmup_frac=0.1, full_token_frac=0.2, log_every=5,
                        clock=clock)
    fast, slow = simulate(cfg, 0.25), simulate(cfg, 1.0)
    for run in (fast, slow):  # within one log interval of 5 steps (full-token steps cost 2x)
        assert run["warmup"] == pytest.approx(0.1, abs=10 / run["train_s"] + 0.01)
        assert run["full"] == pytest.approx(0.8, abs=10 / run["train_s"])
    assert fast["steps"] > 3 * slow["steps"]  # the same shares of very different runs
    by_steps = budget_config(epochs=10, warmup_frac=0.1, full_token_frac=0.2)
    s = tc.Schedule(by_steps, 50)
    assert s.warmup_steps == 50 and s.lr(49) == pytest.approx(by_steps.lr)
    assert [s.full_tokens_at(st) for st in (399, 400)] == [False, True]  # 80% of 500 steps


def test_mixing_stops_for_the_last_share_of_the_run():
    """--mix-off-frac 0.2: mixup / cutmix stop at 80% of the steps, or of the time."""
    s = tc.Schedule(budget_config(epochs=10, mix_off_frac=0.2), 50)
    assert [s.mixes_at(st) for st in (0, 399, 400, 499)] == [True, True, False, False]
    # whole steps, as the warmup: 18 of 100 steps unmixed (0.82 < 1 - 0.18 in floating point)
    s = tc.Schedule(budget_config(epochs=2, mix_off_frac=0.18, full_token_frac=0.18), 50)
    assert [s.mixes_at(st) for st in (81, 82)] == [True, False]
    assert [s.full_tokens_at(st) for st in (81, 82)] == [False, True]
    clock = FakeClock()
    s = tc.Schedule(budget_config(time_budget=5.0, mix_off_frac=0.2), 50, clock=clock)
    assert s.reads_every_step
    mixes = []
    for t in (0.0, 239.0, 241.0, 299.0):
        clock.t = 1000.0 + t
        s.read(0)
        mixes.append(s.mixes_at(0))
    assert mixes == [True, True, False, False]


def test_a_re_planned_resume_keeps_the_warmup_it_has_done():
    """Resuming with a longer plan (--epochs 10 -> 30, --time-budget 10 -> 30) does not move a
    run that has finished its warmup (a share of the old plan) back into a longer one."""
    by_steps = budget_config(epochs=30, warmup_frac=0.1)
    fresh = tc.Schedule(budget_config(epochs=10, warmup_frac=0.1), 50)
    resumed = tc.Schedule(by_steps, 50, warmup_steps=fresh.state_dict()["warmup_steps"])
    assert (fresh.warmup_steps, resumed.warmup_steps) == (50, 50)
    assert resumed.lr(200) == pytest.approx(tc.lr_at(200, 150 / 1450, 50, 1e-3, 1e-5))
    clock = FakeClock()
    by_time = budget_config(time_budget=30.0, warmup_frac=0.1)
    s = tc.Schedule(by_time, 50, elapsed_s=120.0, warmup_end_s=60.0, clock=clock)
    s.read(400)
    assert s.lr(400) == pytest.approx(tc.lr_at(400, 60 / 1740, 0, 1e-3, 1e-5))  # decaying


def test_the_training_clock_leaves_out_evaluation():
    """--clock train: a 5-minute budget is 5 minutes of training whatever the evaluations cost
    (here 30 s after each epoch); --clock wall counts them too."""
    kw = dict(time_budget=5.0, warmup_frac=0.1, full_token_frac=0.2, log_every=5)
    train = simulate(budget_config(clock="train", **kw), 0.5, eval_s=30.0)
    wall = simulate(budget_config(clock="wall", **kw), 0.5, eval_s=30.0)
    assert train["elapsed_s"] == pytest.approx(train["train_s"])
    assert 300 <= train["train_s"] <= 300 + 5 * 1.25 and train["wall_s"] > train["train_s"] + 90
    assert wall["elapsed_s"] == pytest.approx(wall["wall_s"])
    assert wall["train_s"] < 300 - 90  # the evaluations took their share of the budget


def test_the_cpu_preset_ends_within_its_hour_on_a_slow_machine():
    # A slow 2-core machine: 400 img/s with patch dropout (0.32 s a step), 2.5x slower without
    # it; the clock read every --log-every steps and by the full-token rule, as in train(). The
    # budget (57 min) leaves 3 minutes of the hour for start-up and the final evaluation.
    cfg = preset("cpu")
    t_drop = cfg.batch_size / 400
    t_full = t_drop / (1 - cfg.patch_drop)
    clock = FakeClock()
    steps_per_epoch = 50_000 // cfg.batch_size
    s = tc.Schedule(cfg, steps_per_epoch, clock=clock)
    step, history = 0, []
    for epoch in s.remaining_epochs(0, 0):
        full = s.full_tokens(epoch, step, history)
        t0 = clock.t
        for i in range(steps_per_epoch):
            lr = s.lr(step)
            clock.t += t_full if full else t_drop
            step += 1
            if (i + 1) % cfg.log_every == 0:
                s.read(step)
                if s.spent:
                    break
        history.append({"epoch_time": clock.t - t0, "patch_drop": 0.0 if full else cfg.patch_drop})
        if s.is_last(epoch):
            break
    elapsed_min = s.read(step) / 60
    assert s.spent and 57.0 <= elapsed_min <= 57.0 + cfg.log_every * t_full / 60 + 1e-9
    assert history[-1]["patch_drop"] == 0.0 and history[0]["patch_drop"] == cfg.patch_drop
    assert lr < 0.02 * cfg.lr  # the last step ran close to min_lr
    assert s.lr(step) == pytest.approx(cfg.min_lr)


def test_progressive_resolution_sizes_follow_the_decay():
    assert resolution_stages("16:0.3,24:0.6") == [(16, 0.3), (24, 0.6)]
    cfg = TrainConfig(res_schedule="16:0.3,24:0.6", epochs=10, warmup_epochs=0)
    s = tc.Schedule(cfg, steps_per_epoch=10)  # progress = step / 100
    assert [s.image_size(step, 32) for step in (0, 29, 30, 59, 60, 100)] == [16, 16, 24, 24, 32, 32]


def test_the_shortest_command_reproduces_a_config():
    cfg = preset("cpu", seed=3, data_dir="/somewhere", run_name="x")
    assert config_command(cfg) == "python train_cifar10.py --preset cpu --seed 3"
    assert config_command(TrainConfig(flip=False)) == "python train_cifar10.py --no-flip"
    assert set(PRESETS) == {"cpu", "gpu", "finetune"}


def test_mimetic_init_is_an_option_kept_in_the_checkpoint(tmp_path):
    parser = build_parser("test")
    assert config_from_args(parser.parse_args([])).mimetic_init is False  # off: the paper's model
    assert not any(preset(name).mimetic_init for name in PRESETS)
    cfg = config_from_args(parser.parse_args(
        ["--mimetic-init", "--embed-dim", "32", "--depth", "2", "--num-heads", "2"]))
    assert cfg.mimetic_init and "--mimetic-init" in config_command(cfg)
    mcfg = model_config_of(cfg, num_classes=10)
    assert mcfg.mimetic_init
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    path = tmp_path / "mimetic.pt"
    torch.save({"config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(),
                "model": model.state_dict()}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["model_config"]["mimetic_init"] is True and ckpt["config"]["mimetic_init"] is True
    torch.manual_seed(1)  # another seed: the saved weights come back, not a new mimetic draw
    again = model_from_checkpoint(ckpt).eval()
    assert again.config == mcfg
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # part of the model a run resumes: it cannot be switched, also for a checkpoint saved before
    # the option existed (which had it off)
    check_same_model(cfg, ckpt["model_config"])
    with pytest.raises(ValueError, match="mimetic_init"):
        check_same_model(cfg.replace(mimetic_init=False), ckpt["model_config"])
    older = {k: v for k, v in ckpt["model_config"].items() if k != "mimetic_init"}
    check_same_model(cfg.replace(mimetic_init=False), older)
    with pytest.raises(ValueError, match="mimetic_init"):
        check_same_model(cfg, older)
    # a ViT setting, and pre-trained weights (--init) would replace it
    with pytest.raises(ValueError, match="--model resnet_cifar: --mimetic-init apply to ViT"):
        preset(model="resnet_cifar", mimetic_init=True)
    with pytest.raises(ValueError, match="--mimetic-init would do nothing"):
        preset(init="some.pt", mimetic_init=True)


# ---------------------------------------------------------------------------------------------
# Optimisers and evaluation (no training)
# ---------------------------------------------------------------------------------------------

def test_muon_takes_the_blocks_matrices():
    cfg = TrainConfig(optimizer="muon", muon_lr=2e-3)
    model = vit_cifar("vit_cifar_tiny")
    (adamw, a_scale), (muon, m_scale) = tc.build_optimizers(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    blocks = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert in_muon == blocks and len(in_muon) == 4 * 6 and (a_scale, m_scale) == (1.0, 2.0)
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == set(names.values()) - in_muon  # everything else, once


def test_flip_averaging_evaluates_both_views():
    torch.manual_seed(0)
    model = vit_cifar("vit_cifar_tiny", num_classes=3, embed_dim=16, num_heads=2, depth=1)
    torch.nn.init.normal_(model.head.weight)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 3, (40,))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    with torch.no_grad():
        xn = (x.float() / 255 - 0.5) / 0.25
        logits = (model.eval()(xn) + model(xn.flip(-1))) / 2
    res = tc.evaluate(model, x, y, mean, std, 16, tta_flip=True)
    assert res["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    assert res["loss"] == pytest.approx(loss, rel=1e-5)


def test_dynamic_image_size_interpolates_the_position_embedding():
    torch.manual_seed(0)
    model = vit_cifar("vit_cifar_tiny", dynamic_img_size=True).eval()
    torch.nn.init.normal_(model.pos_embed)
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 16, 16)
    fixed = vit_cifar("vit_cifar_tiny").eval()  # the same weights, resized once (Sec. 3.2)
    fixed.load_state_dict(model.state_dict())
    fixed.set_image_size(16)
    torch.testing.assert_close(model(x), fixed(x))
    model.train()
    model(x).sum().backward()
    assert model.pos_embed.grad.abs().sum() > 0  # the interpolation is differentiable
    with pytest.raises(ValueError, match="expected images of 32x32"):
        vit_cifar("vit_cifar_tiny")(x)  # without dynamic_img_size the size is checked


def test_figures_import_nothing_from_the_trainer(repo):
    code = "import sys, visualize_attention; print('train_cifar10' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# The shared tiny run, and the command line before any training
# ---------------------------------------------------------------------------------------------

def test_a_finished_run_holds_what_resuming_needs(trained_run):
    ckpt = load(trained_run / "last.pt")
    for key in ("config", "model_config", "model", "optimizer", "scaler", "ema", "epoch", "step",
                "wandb_run_id", "history", "time_budget", "classes", "normalize"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["step"] == 10 and ckpt["model_config"]["embed_dim"] == 32
    assert (trained_run / "best.pt").is_file() and (trained_run / "accuracy_curve.png").is_file()


def test_eval_only_reports_per_class_accuracy_and_confusion_png(trained_run, batches_dir,
                                                                 tmp_path, capsys):
    best = tmp_path / "best.pt"
    best.write_bytes((trained_run / "best.pt").read_bytes())
    tc.main(["--eval-only", str(best), "--data-dir", str(batches_dir)])
    out = capsys.readouterr().out
    assert "test accuracy" in out and "airplane" in out and "truck" in out
    expected = 100 * load(best)["best_acc"]  # the run's own evaluation of all 200 images
    assert f"test accuracy {expected:.2f}%" in out
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 10000


def test_resume_with_another_model_is_refused_and_loses_nothing(trained_run, capsys):
    ckpt = trained_run / "last.pt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:
        tc.main(["--resume", str(ckpt), "--embed-dim", "64"])
    assert e.value.code == 2
    assert "another model config" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--wandb", "maybe"], "--wandb must be one of"),
    (["--model", "vit_giant"], "--model must be one of"),
    (["--embed-dim", "30", "--num-heads", "4"], "must be divisible by num_heads"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--val-split", "999999"], "--val-split must be in"),
    (["--eval-subset", "200"], "--eval-subset must be in [0, 200)"),
    (["--time-budget", "-5"], "--time-budget must be 0 (off) or a positive number"),
])
def test_bad_flag_values_fail_clearly(batches_dir, fast, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        tc.main([*fast, "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.pt"))


def test_missing_data_without_network_fails_clearly(fast, tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit):
        tc.main([*fast, "--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "download" in err and "cifar-10-batches-py" in err and "ImageFolder" in err


def test_nan_loss_stops_with_a_clear_message(tiny, tmp_path):
    with pytest.raises(FloatingPointError, match="loss became (nan|inf)"):
        tc.train(tiny(run_name="nan", lr=1e30, warmup_epochs=0, clip_grad=0, log_every=1))
    assert not (tmp_path / "nan" / "last.pt").exists()


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------

@slow
def test_smoke_run_writes_offline_wandb(tiny, tmp_path):
    tc.train(tiny(run_name="smoke", wandb="offline", ema=0.9))
    run = tmp_path / "smoke"
    ckpt = load(run / "last.pt")
    assert ckpt["ema"] is not None
    # the offline run: its records (a protobuf stream) name every logged metric
    records = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 1, list(run.rglob("*"))
    assert ckpt["wandb_run_id"] in records[0].name
    blob = records[0].read_bytes()
    for key in (b"train/loss", b"train/acc", b"test/acc", b"test/loss", b"test/images", b"lr",
                b"images_per_sec", b"epoch_time"):
        assert key in blob, key


@slow
def test_learns_an_easy_task_from_image_folder(tiny, tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", 600, 200)
    res = tc.train(tiny(epochs=6, lr=3e-3, warmup_epochs=1, crop_pad=0, flip=False,  # the place
                        data_dir=str(root), run_name="easy", patch_size=8))      # is the class
    assert res["best_acc"] > 0.5, res["history"]  # chance is 0.1


def split_and_resume(tiny, tmp_path: Path, **settings) -> tuple[dict, dict]:
    """The same 2-epoch run straight through, and stopped after epoch 1 then resumed."""
    tc.train(tiny(epochs=2, run_name="straight", **settings))
    tc.train(tiny(epochs=2, run_name="split", stop_at_epoch=1, **settings))
    assert load(tmp_path / "split" / "last.pt")["epoch"] == 1
    tc.main(["--resume", str(tmp_path / "split" / "last.pt")])  # the command line's resume
    return load(tmp_path / "straight" / "last.pt"), load(tmp_path / "split" / "last.pt")


@slow
def test_resume_continues_exactly(tiny, tmp_path):
    # every random draw of a step: dropout, stochastic depth, patch dropout, augmentation; and
    # the EMA and the full-token last epoch, which follow from the plan
    a, b = split_and_resume(tiny, tmp_path, dropout=0.1, drop_path=0.1, patch_drop=0.5,
                            full_token_epochs=1, ema=0.9, mixup=0.8, cutmix=1.0, randaug_n=1,
                            erase_prob=0.25)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert [h["patch_drop"] for h in b["history"]] == [0.5, 0.0]
    assert a["step"] == b["step"] == 20
    assert [h["eval_acc"] for h in a["history"]] == [h["eval_acc"] for h in b["history"]]


@slow
def test_muon_resumes_exactly(tiny, tmp_path):
    a, b = split_and_resume(tiny, tmp_path, optimizer="muon", muon_lr=2e-3)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(b["optimizer"]) == 2 and "momentum_buffer" in b["optimizer"][1]["state"][0]


@slow
def test_time_budget_stops_on_time_with_the_decay_done(tiny, tmp_path, monkeypatch):
    # a fake clock that only steps move: 0.75 s a step, whatever the machine is doing
    now = [0.0]
    learner_step = tc.Learner.step

    def timed_step(self, x, target, lr):
        now[0] += 0.75
        return learner_step(self, x, target, lr)

    class FakeTimeSchedule(tc.Schedule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, clock=lambda: now[0])

    monkeypatch.setattr(tc.Learner, "step", timed_step)
    monkeypatch.setattr(tc, "Schedule", FakeTimeSchedule)
    cfg = tiny(epochs=1000, time_budget=0.25, warmup_epochs=1, lr=1e-3, min_lr=1e-5,
               run_name="budget", eval_subset=50)
    hist = tc.train(cfg)["history"]
    # 15 s: epoch 1 (10 steps, 7.5 s, the warmup), then epoch 2 decays to min_lr and is the last
    # (the full-token rule is checked with a fake clock in test_time_budget_rules_with_a_fake_clock)
    assert len(hist) == 2 and hist[0]["lr"] == 1e-3
    assert [h["eval_images"] for h in hist] == [50, 200]  # all images at the end
    assert hist[-1]["elapsed_min"] * 60 == 15.0
    assert hist[-1]["lr"] == pytest.approx(1e-5)  # the cosine decay ended with the time
    monkeypatch.undo()  # the real clock: the saved 15 s are the whole budget
    tc.main(["--resume", str(tmp_path / "budget" / "last.pt")])  # nothing left to do
    assert load(tmp_path / "budget" / "last.pt")["history"] == hist


@slow
def test_eval_subset_between_epochs_and_all_images_at_the_end(tiny, tmp_path, batches_dir):
    tc.train(tiny(epochs=2, run_name="sub", eval_subset=50, stop_at_epoch=1))
    ck1 = load(tmp_path / "sub" / "last.pt")
    assert ck1["history"][0]["eval_images"] == 50
    assert not (tmp_path / "sub" / "best.pt").exists()  # best.pt is chosen on all images only
    # by hand: 50 evenly spaced of the 200 test images are every 4th one
    data = load_dataset(str(batches_dir), download=False)
    res = tc.evaluate(model_from_checkpoint(ck1), data.test_x[::4], data.test_y[::4], data.mean,
                      data.std, 100)
    assert res["acc"] == ck1["history"][0]["eval_acc"]
    tc.main(["--resume", str(tmp_path / "sub" / "last.pt")])
    ck2 = load(tmp_path / "sub" / "best.pt")
    assert ck2["epoch"] == 2 and ck2["history"][-1]["eval_images"] == 200
    assert ck2["best_acc"] == ck2["history"][-1]["eval_acc"]


@slow
def test_flip_averaging_only_in_the_full_evaluations(tiny, monkeypatch):
    calls = []
    evaluate = tc.evaluate

    def spy(model, x, y, *args):
        calls.append((len(x), args[-1]))  # (images, tta_flip)
        return evaluate(model, x, y, *args)

    monkeypatch.setattr(tc, "evaluate", spy)
    tc.train(tiny(epochs=3, eval_subset=50, tta_flip=True, run_name="tta"))
    assert calls == [(50, False), (50, False), (200, True)]  # subsets, then all 200 at the end


@slow
def test_resume_with_more_epochs_replans_the_learning_rate(tiny, tmp_path, monkeypatch):
    lrs: dict[str, list[float]] = {}
    original = tc.Learner.step

    def recording_step(self, x, target, lr):
        lrs.setdefault(self.cfg.run_name, []).append(lr)
        return original(self, x, target, lr)

    monkeypatch.setattr(tc.Learner, "step", recording_step)
    tc.train(tiny(epochs=3, warmup_epochs=1, run_name="planned"))
    tc.train(tiny(epochs=1, warmup_epochs=1, run_name="extended"))
    tc.main(["--resume", str(tmp_path / "extended" / "last.pt"), "--epochs", "3"])
    planned, extended = lrs["planned"], lrs["extended"]
    assert len(planned) == len(extended) == 30
    assert extended[10:] == planned[10:]  # from the resume on: the schedule of a 3-epoch run
    assert extended[10] > 0.5 * 1e-3  # not stuck at the old plan's end (min_lr)
    assert load(tmp_path / "extended" / "last.pt")["epoch"] == 3


@slow
def test_mix_off_phase_trains_the_last_steps_on_real_images(tiny, monkeypatch):
    """Every batch before 75% of the 40 steps is mixed (some target row has two classes), none
    after: the batch of step k is drawn after step k-1 decided."""
    mixed: list[bool] = []
    original = tc.Learner.step

    def recording_step(self, x, target, lr):
        mixed.append(bool(((target > target.min(1, keepdim=True).values + 1e-6).sum(1) > 1)
                          .any()))
        return original(self, x, target, lr)

    monkeypatch.setattr(tc.Learner, "step", recording_step)
    tc.train(tiny(epochs=4, mixup=0.8, cutmix=1.0, mix_off_frac=0.25, run_name="mix"))
    assert mixed == [True] * 30 + [False] * 10


@slow
def test_eval_train_follows_the_training_images_as_they_are(tiny, tmp_path):
    """--eval-train 120: each epoch's train_eval_acc is the saved model's accuracy on 120 evenly
    spaced training images without augmentation; it changes nothing that is trained."""
    hist = tc.train(tiny(epochs=2, eval_train=120, run_name="gap"))["history"]
    plain = tc.train(tiny(epochs=2, run_name="plain"))["history"]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in plain]
    ckpt = load_checkpoint(tmp_path / "gap" / "last.pt")
    data = load_dataset(tiny().data_dir)
    idx = torch.arange(120) * len(data.train_x) // 120
    acc = tc.evaluate(model_from_checkpoint(ckpt), data.train_x[idx], data.train_y[idx],
                      *input_normalization(ckpt), 100)["acc"]
    assert [("train_eval_acc" in h) for h in hist + plain] == [True, True, False, False]
    assert hist[-1]["train_eval_acc"] == pytest.approx(acc)


@slow
def test_progressive_resolution_trains_small_images_first(tiny, tmp_path):
    hist = tc.train(tiny(epochs=4, warmup_epochs=0, res_schedule="16:0.5", run_name="pr"))
    sizes = [h.get("downscaled", 32) for h in hist["history"]]
    assert sizes == [16, 16, 32, 32]  # progress 0, 1/4, 1/2, 3/4
    ckpt = load(tmp_path / "pr" / "last.pt")
    assert ckpt["model"]["pos_embed"].shape == (1, 65, 32)  # the 8x8 grid, interpolated


@slow
def test_non_cifar_image_folder_gets_its_own_normalisation(tiny, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    images = {}
    for split, n in (("train", 12), ("test", 4)):
        for k, name in enumerate(("circle", "square")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(40 * k, 120 + 60 * k, size=(32, 32, 3), dtype=np.uint8)
                img[..., 2] //= 3  # a blue channel unlike CIFAR-10's
                Image.fromarray(img).save(d / f"{i}.png")
                images.setdefault(split, []).append(img)
    data = load_dataset(root, download=False)
    pixels = np.stack(images["train"]).astype(np.float64) / 255  # (N, H, W, 3)
    np.testing.assert_allclose(data.mean, pixels.mean((0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(data.std, pixels.std((0, 1, 2)), atol=1e-4)
    tc.train(tiny(batch_size=8, embed_dim=16, depth=1, data_dir=str(root), run_name="own",
                  eval_batch_size=1000))
    ckpt = load(tmp_path / "own" / "last.pt")
    assert ckpt["normalize"] == {"mean": list(data.mean), "std": list(data.std)}
    assert ckpt["classes"] == ["circle", "square"] and ckpt["model_config"]["num_classes"] == 2
    assert input_normalization(ckpt) == (data.mean, data.std)


def _spawn(repo: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@slow
def test_ctrl_c_saves_and_the_run_resumes(repo, fast, batches_dir, tmp_path):
    proc = _spawn(repo, ["train_cifar10.py", *fast, "--epochs", "200", "--data-dir",
                         str(batches_dir), "--out-dir", str(tmp_path), "--run-name", "int"])
    last = tmp_path / "int" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "--resume" in out
    epoch = load(last)["epoch"]
    assert 1 <= epoch < 200
    tc.main(["--resume", str(last), "--epochs", str(epoch + 1)])
    assert load(last)["epoch"] == epoch + 1


@slow
def test_ddp_with_two_cpu_processes(repo, fast, batches_dir, tmp_path):
    proc = _spawn(repo, ["-m", "torch.distributed.run", "--nproc_per_node=2",
                         "--master_port=29533", "train_cifar10.py", *fast, "--epochs", "2",
                         "--data-dir", str(batches_dir), "--out-dir", str(tmp_path),
                         "--run-name", "ddp", "--device", "cpu"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    ckpt = load(tmp_path / "ddp" / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 20  # 500 images, global batch 50
    assert out.count("starting run") == 1  # only rank 0 logs
    assert 0 <= ckpt["history"][-1]["eval_acc"] <= 1


@slow
def test_a_budget_spent_during_an_evaluation_still_ends_with_a_full_one(tiny, monkeypatch):
    # one step an epoch and a fake clock that only the evaluations move: the budget runs out
    # while an epoch is evaluated on the subset, after that epoch's last clock reading
    now = [0.0]
    evaluate = tc.evaluate

    def slow_evaluation(*args, **kwargs):
        now[0] += 4.0
        return evaluate(*args, **kwargs)

    class FakeTimeSchedule(tc.Schedule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, clock=lambda: now[0])

    monkeypatch.setattr(tc, "evaluate", slow_evaluation)
    monkeypatch.setattr(tc, "Schedule", FakeTimeSchedule)
    res = tc.train(tiny(epochs=1000, time_budget=0.125, batch_size=250, warmup_epochs=0,
                        eval_subset=50, run_name="late"))  # 7.5 s: two evaluations
    hist = res["history"]
    assert hist[-1]["eval_images"] == 200 and res["best_acc"] == hist[-1]["eval_acc"]
    assert [h["eval_images"] for h in hist] == [50, 50, 200]
