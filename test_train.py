"""Tests for train_cifar10.py and data.py, on small data sets the tests make themselves."""

from __future__ import annotations

import math
import os
import pickle
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
from data import (
    RANDAUG_OPS,
    Augment,
    DataNotFoundError,
    TrainBatches,
    apply_randaug_op,
    load_dataset,
    mixup_cutmix,
    rand_augment,
    random_crop_flip,
    random_erasing,
)
from vit_model import vit_cifar

HERE = Path(__file__).resolve().parent
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def easy_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An easy 10-class task: class k is a noisy image with a bright square at place k."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 90, size=(n, 3, 32, 32), dtype=np.uint8)
    for i, k in enumerate(y):
        r, c = divmod(int(k), 5)
        x[i, :, 4 + 14 * r: 14 + 14 * r, 1 + 6 * c: 7 + 6 * c] = 230
    return x, y.astype(np.int64)


def write_batches_py(root: Path, n_train: int = 500, n_test: int = 200) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = easy_images(n_train, 0)
    parts = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(parts, start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x[idx].reshape(len(idx), -1), "labels": y[idx].tolist()}, f)
    xt, yt = easy_images(n_test, 1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": xt.reshape(n_test, -1), "labels": yt.tolist()}, f)
    return root


def write_image_folder(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = easy_images(n, seed)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def batches_dir(tmp_path_factory) -> Path:
    return write_batches_py(tmp_path_factory.mktemp("cifar"))


FAST = ["--epochs", "1", "--batch-size", "50", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--wandb", "off", "--log-every", "2", "--eval-batch-size", "100"]


def run_main(args: list[str]) -> None:
    tc.main(args)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def test_both_formats_load_the_same_images(tmp_path):
    a = load_dataset(write_batches_py(tmp_path / "a"), download=False)
    b = load_dataset(write_image_folder(tmp_path / "b", 500, 200), download=False)
    assert a.train_x.shape == (500, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert b.classes == CLASSES
    # ImageFolder lists files class by class; compare as sets of (image, label) via sorting by label
    order = torch.argsort(a.train_y, stable=True)
    assert torch.equal(a.train_y[order], b.train_y)
    assert torch.equal(a.train_x[order], b.train_x)


def test_missing_data_offline_names_both_options(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py.*ImageFolder tree with 'train/' and 'test/'"):
        load_dataset(tmp_path, download=False)


def test_crop_and_flip_are_drawn_per_sample():
    torch.manual_seed(0)
    img = torch.arange(3 * 8 * 8, dtype=torch.int64).view(1, 3, 8, 8).to(torch.uint8)
    x = img.expand(64, 3, 8, 8)
    out = random_crop_flip(x, pad=2, flip=True)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))[0]
    windows = {(dy, dx, f): (padded[:, dy:dy + 8, dx:dx + 8].flip(-1) if f else padded[:, dy:dy + 8, dx:dx + 8])
               for dy in range(5) for dx in range(5) for f in (0, 1)}
    draws = []
    for o in out:  # every output is one crop (and maybe flip) of the padded image
        match = [k for k, w in windows.items() if torch.equal(o, w)]
        assert len(match) == 1
        draws.append(match[0])
    assert len(set(draws)) > 20  # many different draws in one batch
    assert 16 < sum(f for _, _, f in draws) < 48  # about half flipped


def test_randaug_colour_ops_match_torchvision():
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    img = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    img[0] = 255  # saturated and dark images as edge cases
    img[1] //= 8
    reference = {  # torchvision's functions, as its RandAugment calls them, with v the signed magnitude
        "Brightness": lambda im, v: TF.adjust_brightness(im, 1 + v),
        "Color": lambda im, v: TF.adjust_saturation(im, 1 + v),
        "Contrast": lambda im, v: TF.adjust_contrast(im, 1 + v),
        "Sharpness": lambda im, v: TF.adjust_sharpness(im, 1 + v),
        "Posterize": lambda im, v: TF.posterize(im, 8 - int(round(v))),
        "Solarize": lambda im, v: TF.solarize(im, 255.0 - v),
        "AutoContrast": lambda im, v: TF.autocontrast(im),
        "Equalize": lambda im, v: TF.equalize(im),
    }
    for name, fn in reference.items():
        max_v, signed, family = RANDAUG_OPS[name]
        for magnitude in (9, 30):
            for sign in (1, -1) if signed else (1,):
                v = sign * max_v * magnitude / 30
                ours = apply_randaug_op(img, name, v).int()
                theirs = torch.stack([fn(im[None], v)[0] for im in img]).int()  # one image at a time
                diff = (ours - theirs).abs()
                if family == "blend":  # float rounding may differ across CPUs (fused multiply-add)
                    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (name, v)
                else:
                    assert diff.max() == 0, (name, v)


def test_rand_augment_draws_one_op_per_sample():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8)
    out = rand_augment(x, num_ops=1, magnitude=9)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    drawn = []
    for i in range(len(x)):  # each output is some single operation, with some sign, of its own input
        candidates = [(name, sign) for name, (max_v, signed, _) in RANDAUG_OPS.items()
                      for sign in ((1, -1) if signed else (1,))
                      if torch.equal(out[i:i + 1], apply_randaug_op(x[i:i + 1], name, sign * max_v * 9 / 30))]
        assert candidates, f"sample {i} is no single RandAugment operation of its input"
        drawn.append(candidates[0])
    assert len(set(drawn)) > 12  # operations and signs vary within the batch


def test_cutmix_targets_match_pixel_areas():
    torch.manual_seed(0)
    B = 16
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 8, 8).clone()
    y = torch.nn.functional.one_hot(torch.arange(B) % 4, 4).float()
    out, target = mixup_cutmix(x, y, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0)
    torch.testing.assert_close(target.sum(1), torch.ones(B))
    for i in range(B):
        own = (out[i] == i).float().mean()  # fraction of pixels still from sample i
        expected = own * y[i] + (1 - own) * y[B - 1 - i]
        torch.testing.assert_close(target[i], expected)


def test_mixup_blends_images_and_targets_by_the_same_ratio():
    torch.manual_seed(0)
    B = 8
    x = torch.zeros(B, 3, 4, 4)
    x[: B // 2] = 1.0  # first half ones, second half zeros: partner (B-1-i) is the other half
    y = torch.nn.functional.one_hot(torch.tensor([0] * 4 + [1] * 4), 2).float()
    out, target = mixup_cutmix(x, y, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = out[:, 0, 0, 0]
    assert torch.allclose(out, lam.view(B, 1, 1, 1).expand_as(out))  # uniform blend per sample
    torch.testing.assert_close(target[:4, 0], lam[:4])
    torch.testing.assert_close(target[4:, 1], 1 - lam[4:])
    assert len(set(lam.tolist())) > 4  # its own ratio per sample


def test_random_erasing_probability():
    torch.manual_seed(0)
    x = torch.zeros(200, 3, 16, 16)
    assert torch.equal(random_erasing(x, prob=0.0), x)
    erased = (random_erasing(x, prob=1.0) != 0).flatten(1).any(1)
    assert erased.all()
    some = (random_erasing(x, prob=0.3) != 0).flatten(1).any(1).float().mean()
    assert 0.15 < some < 0.45


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------

def test_smoke_run_writes_checkpoints_and_offline_wandb(batches_dir, tmp_path):
    run_main([*FAST, "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), "--run-name", "smoke",
              "--wandb", "offline", "--ema", "0.9"])
    run = tmp_path / "smoke"
    assert (run / "last.pt").exists() and (run / "best.pt").exists() and (run / "accuracy_curve.png").exists()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for key in ("config", "model_config", "model", "optimizer", "scaler", "ema", "epoch", "step", "rng_states",
                "wandb_run_id", "history", "time_budget", "classes", "normalize"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["step"] == 10 and ckpt["model_config"]["embed_dim"] == 32
    # the offline run: its records (a protobuf stream) name every logged metric
    records = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 1, list(run.rglob("*"))
    assert ckpt["wandb_run_id"] in records[0].name
    blob = records[0].read_bytes()
    for key in (b"train/loss", b"train/acc", b"test/acc", b"test/loss", b"test/images", b"lr", b"images_per_sec",
                b"epoch_time"):
        assert key in blob, key


def test_learns_an_easy_task_from_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "data", 600, 200)
    res = tc.train(tc.parse_args([*FAST, "--epochs", "6", "--lr", "3e-3", "--warmup-epochs", "1",
                                  "--crop-pad", "0", "--no-flip",  # the class is the square's place
                                  "--data-dir", str(root), "--out-dir", str(tmp_path / "ck"),
                                  "--run-name", "easy", "--patch-size", "8"]))
    assert res["best_acc"] > 0.5, res["history"]  # chance is 0.1


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def test_resume_continues_exactly(batches_dir, tmp_path):
    common = [*FAST, "--epochs", "2", "--data-dir", str(batches_dir), "--out-dir", str(tmp_path),
              "--dropout", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--randaug-n", "1"]
    run_main([*common, "--run-name", "straight"])
    run_main([*common, "--run-name", "split", "--stop-at-epoch", "1"])
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1
    run_main(["--resume", str(tmp_path / "split" / "last.pt")])
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    cb = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 20
    assert [h["eval_acc"] for h in ca["history"]] == [h["eval_acc"] for h in cb["history"]]


def test_time_budget_stops_on_time_with_the_decay_done(batches_dir, tmp_path):
    args = [*FAST, "--epochs", "1000", "--time-budget", "0.1", "--patch-drop", "0.5", "--full-token-epochs", "1",
            "--lr", "1e-3", "--min-lr", "1e-5", "--data-dir", str(batches_dir), "--out-dir", str(tmp_path),
            "--run-name", "budget", "--eval-subset", "50"]
    hist = tc.train(tc.parse_args(args))["history"]
    assert 2 < len(hist) < 1000
    assert [h["eval_images"] for h in hist] == [50] * (len(hist) - 1) + [200]  # all images at the end
    assert 6.0 <= hist[-1]["elapsed_min"] * 60 < 6.0 + 5.0  # 0.1 min, then one evaluation
    assert hist[-1]["lr"] == pytest.approx(1e-5)  # the cosine decay ended with the time
    lrs = [h["lr"] for h in hist[1:]]
    assert lrs == sorted(lrs, reverse=True)
    drops = [h["patch_drop"] for h in hist]  # patch dropout first, all tokens at the end
    assert drops[0] == 0.5 and drops[-1] == 0.0 and drops == sorted(drops, reverse=True)
    run_main(["--resume", str(tmp_path / "budget" / "last.pt")])  # nothing left to do
    assert torch.load(tmp_path / "budget" / "last.pt", weights_only=True)["history"] == hist


def test_eval_subset_between_epochs_and_all_images_at_the_end(batches_dir, tmp_path):
    common = [*FAST, "--epochs", "2", "--data-dir", str(batches_dir), "--out-dir", str(tmp_path),
              "--run-name", "sub", "--eval-subset", "50"]
    run_main([*common, "--stop-at-epoch", "1"])
    ck1 = torch.load(tmp_path / "sub" / "last.pt", weights_only=True)
    assert ck1["history"][0]["eval_images"] == 50
    assert not (tmp_path / "sub" / "best.pt").exists()  # best.pt is chosen on all images only
    # by hand: 50 evenly spaced of the 200 test images are every 4th one
    data = load_dataset(str(batches_dir), download=False)
    res = tc.evaluate(tc.model_from_checkpoint(ck1), data.test_x[::4], data.test_y[::4], data.mean, data.std, 100)
    assert res["acc"] == ck1["history"][0]["eval_acc"]
    run_main(["--resume", str(tmp_path / "sub" / "last.pt")])
    ck2 = torch.load(tmp_path / "sub" / "best.pt", weights_only=True)
    assert ck2["epoch"] == 2 and ck2["history"][-1]["eval_images"] == 200
    assert ck2["best_acc"] == ck2["history"][-1]["eval_acc"]


def test_resume_with_another_model_is_refused_and_loses_nothing(batches_dir, tmp_path, capsys):
    run_main([*FAST, "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), "--run-name", "r"])
    ckpt = tmp_path / "r" / "last.pt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:
        run_main(["--resume", str(ckpt), "--embed-dim", "64"])
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
def test_bad_flag_values_fail_clearly(batches_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run_main([*FAST, "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_without_network_fails_clearly(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit):
        run_main([*FAST, "--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "download" in err and "cifar-10-batches-py" in err and "ImageFolder" in err


def test_nan_loss_stops_with_a_clear_message(batches_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main([*FAST, "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), "--run-name", "nan",
                  "--lr", "1e30", "--warmup-epochs", "0", "--clip-grad", "0", "--log-every", "1"])
    err = capsys.readouterr().err
    assert "loss became nan" in err or "loss became inf" in err
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_eval_only_reports_per_class_accuracy_and_confusion_png(batches_dir, tmp_path, capsys):
    run_main([*FAST, "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), "--run-name", "ev"])
    capsys.readouterr()
    run_main(["--eval-only", str(tmp_path / "ev" / "best.pt"), "--data-dir", str(batches_dir)])
    out = capsys.readouterr().out
    assert "test accuracy" in out and "airplane" in out and "truck" in out
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 10000


def _spawn(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_ctrl_c_saves_and_the_run_resumes(batches_dir, tmp_path):
    proc = _spawn(["train_cifar10.py", *FAST, "--epochs", "200", "--data-dir", str(batches_dir),
                   "--out-dir", str(tmp_path), "--run-name", "int"])
    last = tmp_path / "int" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "--resume" in out
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= epoch < 200
    run_main(["--resume", str(last), "--epochs", str(epoch + 1)])
    assert torch.load(last, weights_only=True)["epoch"] == epoch + 1


def test_ddp_with_two_cpu_processes(batches_dir, tmp_path):
    proc = _spawn(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                   "train_cifar10.py", *FAST, "--epochs", "2", "--data-dir", str(batches_dir),
                   "--out-dir", str(tmp_path), "--run-name", "ddp", "--device", "cpu"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 20  # 500 images, global batch 50
    assert len(ckpt["rng_states"]) == 2  # one per process, for exact resume
    assert out.count("starting run") == 1  # only rank 0 logs
    assert 0 <= ckpt["history"][-1]["eval_acc"] <= 1


def test_normalize_matches_the_formula():
    from data import CIFAR10_MEAN, CIFAR10_STD, normalize

    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, CIFAR10_MEAN, CIFAR10_STD), (x.float() / 255 - mean) / std)


def test_warp_translates_shears_and_rotates_exactly():
    from data import warp

    img = torch.arange(2 * 1 * 5 * 5).view(2, 1, 5, 5).to(torch.uint8)
    assert torch.equal(warp(img), img)  # identity
    shifted = warp(img, c=1, fill=0)  # output (x, y) reads input (x + 1, y)
    assert torch.equal(shifted[..., :4], img[..., 1:]) and (shifted[..., 4] == 0).all()
    sheared = warp(img, b=1.0, fill=0)  # row y (from the centre row) moves by y - 2
    for y in range(5):
        s = y - 2
        for x in range(5):
            expected = img[:, :, y, x + s] if 0 <= x + s < 5 else torch.zeros(2, 1, dtype=torch.uint8)
            assert torch.equal(sheared[:, :, y, x], expected)
    rot90 = apply_randaug_op(img, "Rotate", 90.0)
    assert any(torch.equal(rot90, torch.rot90(img, k=k, dims=(2, 3))) for k in (1, -1))


# ---------------------------------------------------------------------------------------------
# The pieces of the training loop, each on its own
# ---------------------------------------------------------------------------------------------

def test_sync_free_rand_augment_equals_the_grouped_one():
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    for seed in range(3):
        torch.manual_seed(seed)
        grouped = rand_augment(x, 2, 9 + 5 * seed, host_sync=True)
        torch.manual_seed(seed)
        assert torch.equal(rand_augment(x, 2, 9 + 5 * seed, host_sync=False), grouped)


def test_gpu_augmentation_needs_no_host_synchronisation():
    # Meta tensors have shapes but no values: any operation that reads a value on the host
    # (.item(), .tolist(), nonzero, unique, bincount) raises on them. The GPU recipe's whole
    # transform runs on them, so on CUDA it never waits for the device.
    aug = Augment(10, (0.5,) * 3, (0.25,) * 3, crop_pad=4, flip=True, randaug_n=2, randaug_m=9, erase_prob=0.25,
                  label_smoothing=0.1, mixup=0.8, cutmix=1.0)
    x, target = aug(torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta"),
                    torch.empty(8, dtype=torch.long, device="meta"))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and target.shape == (8, 10)
    with pytest.raises(NotImplementedError):  # the CPU path reads counts on the host, and the check sees it
        rand_augment(torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta"), 2, 9, host_sync=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augmentation_does_not_synchronise():
    aug = Augment(10, (0.5,) * 3, (0.25,) * 3, randaug_n=2, erase_prob=0.25, label_smoothing=0.1, mixup=0.8,
                  cutmix=1.0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    aug(x, y)  # warm-up: caches the operation table on the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_batches_give_each_sample_once_with_disjoint_shards():
    n, bs, world = 103, 10, 2
    x = torch.arange(n).view(n, 1, 1, 1).to(torch.uint8)
    y = torch.arange(n)
    shards = [TrainBatches(x, y, bs, lambda a, b: (a, b), seed=3, rank=r, world=world) for r in range(world)]
    assert len(shards[0]) == n // bs
    for epoch in (0, 1):
        steps = [[labels for _, labels in s.epoch(epoch)] for s in shards]
        for a, b in zip(*steps, strict=True):  # per step: two disjoint halves of one global batch
            assert len(a) == len(b) == bs // world and not set(a.tolist()) & set(b.tolist())
        seen = torch.cat([t for per_rank in steps for t in per_rank])
        assert len(seen) == len(set(seen.tolist())) == (n // bs) * bs  # each sample at most once, 3 dropped
    again = TrainBatches(x, y, bs, lambda a, b: (a, b), seed=3, rank=0, world=world)
    assert torch.equal(again.indices(1), shards[0].indices(1))  # same seed and epoch: same order
    assert not torch.equal(shards[0].indices(0), shards[0].indices(1))  # a new order each epoch
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        TrainBatches(x, y, bs, lambda a, b: (a, b), world=3)


def test_lr_at_warms_up_then_follows_the_cosine():
    lr, min_lr = 1e-3, 1e-5
    assert [tc.lr_at(s, 0.0, 4, lr, min_lr) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    for p in (0.0, 0.25, 0.5, 1.0, 1.5):
        expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
        assert tc.lr_at(10, p, 4, lr, min_lr) == pytest.approx(expected)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def budget_config(**kw) -> tc.TrainConfig:
    return tc.TrainConfig(**{"epochs": 100, "warmup_epochs": 1.0, "patch_drop": 0.5, "full_token_epochs": 1, **kw})


def test_time_budget_rules_with_a_fake_clock():
    clock = FakeClock()
    b = tc.TimeBudget(budget_config(time_budget=10.0), steps_per_epoch=5, clock=clock)  # 600 s, warmup 5 steps
    assert b.warmup_steps == 5 and b.progress(3) == 0.0  # warmup: by steps
    clock.t += 60
    b.read()
    assert b.progress(5) == 0.0 and b.warmup_end_s == 60  # the decay starts when the warmup ends
    clock.t += 270
    assert b.progress(50) == 0.0  # the clock is only seen when read
    b.read()
    assert b.progress(50) == pytest.approx(0.5) and not b.spent
    # full-token phase: epochs with dropout took 20 s, so a full-token epoch costs 40 s
    history = [{"epoch_time": 20.0, "patch_drop": 0.5}] * 3
    clock.t = 1000 + 559
    assert not b.full_tokens(10, history)  # 41 s left
    clock.t = 1000 + 560
    assert b.full_tokens(10, history)  # 40 s left
    clock.t = 1000 + 600
    b.read()
    assert b.spent and b.progress(99) == pytest.approx(1.0)


def test_time_budget_carries_elapsed_time_over_a_resume_and_replans():
    clock = FakeClock()
    b = tc.TimeBudget(budget_config(time_budget=20.0), 5, elapsed_s=600.0, warmup_end_s=60.0, clock=clock)
    assert b.read() == 600.0 and not b.spent  # a 10-minute run resumed with 20 minutes
    assert b.progress(100) == pytest.approx((600 - 60) / (1200 - 60))  # the decay now ends at 20 minutes
    steps = tc.TimeBudget(budget_config(epochs=30), 10, clock=clock)
    assert steps.progress(10 + 145) == pytest.approx(0.5)  # by steps: 290 post-warmup steps in 30 epochs
    assert not steps.full_tokens(28, []) and steps.full_tokens(29, [])  # the last epoch, by count


def test_resume_with_more_epochs_replans_the_learning_rate(batches_dir, tmp_path, monkeypatch):
    lrs: dict[str, list[float]] = {}
    original = tc.Learner.step

    def recording_step(self, x, target, lr):
        lrs.setdefault(self.cfg.run_name, []).append(lr)
        return original(self, x, target, lr)

    monkeypatch.setattr(tc.Learner, "step", recording_step)
    common = [*FAST, "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), "--warmup-epochs", "1"]
    run_main([*common, "--epochs", "3", "--run-name", "planned"])
    run_main([*common, "--epochs", "1", "--run-name", "extended"])
    run_main(["--resume", str(tmp_path / "extended" / "last.pt"), "--epochs", "3"])
    planned, extended = lrs["planned"], lrs["extended"]
    assert len(planned) == len(extended) == 30
    assert extended[10:] == planned[10:]  # from the resume on: the schedule of a 3-epoch run
    assert extended[10] > 0.5 * 1e-3  # not stuck at the old plan's end (min_lr)
    assert torch.load(tmp_path / "extended" / "last.pt", weights_only=True)["epoch"] == 3


def test_non_cifar_image_folder_gets_its_own_normalisation(tmp_path):
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
    run_main(["--epochs", "1", "--batch-size", "8", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
              "--wandb", "off", "--data-dir", str(root), "--out-dir", str(tmp_path), "--run-name", "own"])
    ckpt = torch.load(tmp_path / "own" / "last.pt", weights_only=True)
    assert ckpt["normalize"] == {"mean": list(data.mean), "std": list(data.std)}
    assert ckpt["classes"] == ["circle", "square"] and ckpt["model_config"]["num_classes"] == 2
    from checkpoint import input_normalization
    assert input_normalization(ckpt) == (data.mean, data.std)


def test_figures_import_nothing_from_the_trainer():
    code = "import sys, visualize_attention; print('train_cifar10' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_muon_takes_the_blocks_matrices_and_resumes_exactly(batches_dir, tmp_path):
    cfg = tc.TrainConfig(optimizer="muon", muon_lr=2e-3)
    model = vit_cifar("vit_cifar_tiny")
    (adamw, a_scale), (muon, m_scale) = tc.build_optimizers(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert len(in_muon) == 4 * 6 and (a_scale, m_scale) == (1.0, 2.0)
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == set(names.values()) - in_muon  # everything else, once
    common = [*FAST, "--epochs", "2", "--data-dir", str(batches_dir), "--out-dir", str(tmp_path),
              "--optimizer", "muon", "--muon-lr", "2e-3"]
    run_main([*common, "--run-name", "straight"])
    run_main([*common, "--run-name", "split", "--stop-at-epoch", "1"])
    run_main(["--resume", str(tmp_path / "split" / "last.pt")])
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert len(first["optimizer"]) == 2 and "momentum_buffer" in str(first["optimizer"][1]["state"][0].keys())


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
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_flip_averaging_only_in_the_full_evaluations(batches_dir, tmp_path, monkeypatch):
    calls = []
    evaluate = tc.evaluate

    def spy(model, x, y, *args):
        calls.append((len(x), args[-1]))  # (images, tta_flip)
        return evaluate(model, x, y, *args)

    monkeypatch.setattr(tc, "evaluate", spy)
    tc.train(tc.parse_args([*FAST, "--epochs", "3", "--eval-subset", "50", "--tta-flip", "--data-dir",
                            str(batches_dir), "--out-dir", str(tmp_path), "--run-name", "tta"]))
    assert calls == [(50, False), (50, False), (200, True)]  # subsets between epochs, all 200 at the end


def test_linear_decay_reaches_min_lr_in_a_straight_line():
    assert [tc.lr_at(10, p, 4, 1e-3, 0.0, "linear") for p in (0.0, 0.25, 1.0)] == pytest.approx([1e-3, 7.5e-4, 0.0])


def test_the_cpu_preset_ends_within_its_hour_on_a_slow_machine():
    # A slow 2-core machine: 400 img/s with patch dropout (0.32 s a step), 2.5x slower without it;
    # the clock read every --log-every steps, as train_epoch does. The budget (57 min) leaves 3
    # minutes of the hour for start-up and the final evaluation on all images.
    cfg = tc.TrainConfig(**tc.PRESETS["cpu"])
    t_drop = cfg.batch_size / 400
    t_full = t_drop / (1 - cfg.patch_drop)
    clock = FakeClock()
    steps_per_epoch = 50_000 // cfg.batch_size
    budget = tc.TimeBudget(cfg, steps_per_epoch, clock=clock)
    step, epoch, history = 0, 0, []
    while not budget.spent and epoch < cfg.epochs:
        full = budget.full_tokens(epoch, history)
        t0 = clock.t
        for i in range(steps_per_epoch):
            lr = tc.lr_at(step, budget.progress(step), budget.warmup_steps, cfg.lr, cfg.min_lr)
            clock.t += t_full if full else t_drop
            step += 1
            if (i + 1) % cfg.log_every == 0:
                budget.read()
                if budget.spent:
                    break
        history.append({"epoch_time": clock.t - t0, "patch_drop": 0.0 if full else cfg.patch_drop})
        epoch += 1
    elapsed_min = budget.read() / 60
    assert budget.spent and 57.0 <= elapsed_min <= 57.0 + cfg.log_every * t_full / 60 + 1e-9
    assert history[-1]["patch_drop"] == 0.0 and history[0]["patch_drop"] == cfg.patch_drop
    assert lr < 0.02 * cfg.lr  # the last step ran close to min_lr
    assert tc.lr_at(step, budget.progress(step), budget.warmup_steps, cfg.lr, cfg.min_lr) == pytest.approx(cfg.min_lr)


def test_progressive_resolution_trains_small_images_first(batches_dir, tmp_path):
    stages = tc.resolution_stages("16:0.3,24:0.6")
    cfg = tc.TrainConfig(res_schedule="16:0.3,24:0.6")
    assert stages == [(16, 0.3), (24, 0.6)]
    assert [tc.image_size_at(cfg, 32, p) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)] == [16, 16, 24, 24, 32, 32]
    hist = tc.train(tc.parse_args([*FAST, "--epochs", "4", "--warmup-epochs", "0", "--res-schedule", "16:0.5",
                                   "--data-dir", str(batches_dir), "--out-dir", str(tmp_path), "--run-name", "pr"]))
    assert [h.get("downscaled", 32) for h in hist["history"]] == [16, 16, 32, 32]  # progress 0, 1/4, 1/2, 3/4
    ckpt = torch.load(tmp_path / "pr" / "last.pt", weights_only=True)
    assert ckpt["model"]["pos_embed"].shape == (1, 65, 32)  # the 8x8 grid is kept, interpolated when smaller


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
