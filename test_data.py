"""Tests for data.py: loading both CIFAR-10 formats, augmentation against torchvision and
hand-built cases, and the batches' order, on small data sets the tests make themselves."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch

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


def test_both_formats_load_the_same_images(tmp_path, make_batches, make_image_folder, classes):
    a = load_dataset(make_batches(tmp_path / "a"), download=False)
    b = load_dataset(make_image_folder(tmp_path / "b", 500, 200), download=False)
    assert a.train_x.shape == (500, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert b.classes == classes
    # ImageFolder lists files class by class; compare as sets of (image, label) via sorting by label
    order = torch.argsort(a.train_y, stable=True)
    assert torch.equal(a.train_y[order], b.train_y)
    assert torch.equal(a.train_x[order], b.train_x)


def test_missing_data_offline_names_both_options(tmp_path):
    with pytest.raises(DataNotFoundError,
                       match="cifar-10-batches-py.*ImageFolder tree with 'train/' and 'test/'"):
        load_dataset(tmp_path, download=False)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's str, as in the real CIFAR-10 files (protocol 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data if len(data) < 256
                   else pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str


def test_python2_batches_as_cifar10_ships_them_load(tmp_path, batches_dir):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in (batches_dir / "cifar-10-batches-py").iterdir():
        with open(f, "rb") as src, open(folder / f.name, "wb") as dst:
            d = pickle.load(src)
            out = io.BytesIO()
            _Py2Pickler(out, protocol=2).dump({b"batch_label": b"x", b"labels": d["labels"],
                                               b"data": d["data"]})
            # Python 2's numpy named its array reconstruction numpy.core.multiarray._reconstruct
            dst.write(out.getvalue().replace(b"numpy._core.", b"numpy.core."))
    a, b = load_dataset(tmp_path, download=False), load_dataset(batches_dir, download=False)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)


class _Payload:
    """Unpickling this runs a shell command, as a crafted data_batch_1 could."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_batch_file_cannot_run_code(tmp_path, make_batches):
    root = make_batches(tmp_path / "data")
    marker = tmp_path / "pwned"
    path = root / "cifar-10-batches-py" / "data_batch_1"
    data = np.zeros((100, 3072), np.uint8)
    path.write_bytes(pickle.dumps({"data": data, "labels": [0] * 100, "x": _Payload(marker)}))
    with pytest.raises(ValueError, match=f"{path}.*{os.system.__module__}.system"):
        load_dataset(root, download=False)
    assert not marker.exists()


def _bad_batches() -> dict[str, tuple[object, str]]:
    """name: (contents of data_batch_1, as bytes or a dict to pickle; expected message)."""
    x = np.zeros((100, 3072), np.uint8)
    y = [0] * 100
    nan = np.full((100, 3072), np.nan)
    good = pickle.dumps({"data": x, "labels": y})
    return {
        "no data": ({"labels": y}, "no 'data'"),
        "no labels": ({"data": x}, "no 'labels'"),
        "not a dict": ([x, y], "no 'data'"),
        "truncated": (good[: len(good) // 2], "truncated|Ran out of input"),
        "empty": (b"", "Ran out of input"),
        "not a pickle": (b"hello, not a pickle", "not a CIFAR-10 batch"),
        "wrong shape": ({"data": x[:, :3000], "labels": y}, r"uint8 \(N, 3072\)"),
        "4-d data": ({"data": x.reshape(100, 3, 32, 32), "labels": y}, r"\(N, 3072\)"),
        "float data": ({"data": nan, "labels": y}, "float64"),
        "label 10": ({"data": x, "labels": [10] * 100}, r"0\.\.9"),
        "label -1": ({"data": x, "labels": [-1] * 100}, r"0\.\.9"),
        "float labels": ({"data": x, "labels": [0.5] * 100}, r"0\.\.9"),
        "fewer labels": ({"data": x, "labels": y[:99]}, r"100 integers.*\(99,\)"),
        "ragged labels": ({"data": x, "labels": [0, [1, 2]] * 50}, "not a CIFAR-10 batch"),
    }


@pytest.mark.parametrize("case", list(_bad_batches()))
def test_a_malformed_batch_file_is_one_error_naming_it(tmp_path, make_batches, case):
    contents, message = _bad_batches()[case]
    root = make_batches(tmp_path / "data")
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(contents if isinstance(contents, bytes) else pickle.dumps(contents))
    with pytest.raises((ValueError, DataNotFoundError)) as info:
        load_dataset(root, download=False)
    assert str(path) in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_a_missing_batch_file_is_named(tmp_path, make_batches):
    root = make_batches(tmp_path / "data")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3 is missing"):
        load_dataset(root, download=False)


@pytest.mark.parametrize("script", ["train", "benchmark"])
def test_scripts_report_a_bad_batch_file_in_one_line(tmp_path, make_batches, fast, capsys,
                                                     script):
    import benchmark
    import train_cifar10

    root = make_batches(tmp_path / "data")
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": np.zeros((10, 3072)), "labels": [0] * 10}))
    with pytest.raises(SystemExit) as info:
        if script == "train":
            train_cifar10.main([*fast, "--data-dir", str(root), "--out-dir", str(tmp_path)])
        else:
            benchmark.main(["data", "--data-dir", str(root)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err, err


def test_crop_and_flip_are_drawn_per_sample():
    torch.manual_seed(0)
    img = torch.arange(3 * 8 * 8, dtype=torch.int64).view(1, 3, 8, 8).to(torch.uint8)
    x = img.expand(64, 3, 8, 8)
    out = random_crop_flip(x, pad=2, flip=True)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))[0]
    windows = {(dy, dx, f): (padded[:, dy:dy + 8, dx:dx + 8].flip(-1) if f
                             else padded[:, dy:dy + 8, dx:dx + 8])
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
    # torchvision's functions, as its RandAugment calls them, with v the signed magnitude
    reference = {
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
                # one image at a time
                theirs = torch.stack([fn(im[None], v)[0] for im in img]).int()
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
    # each output is some single operation, with some sign, of its own input
    for i in range(len(x)):
        candidates = [(name, sign) for name, (max_v, signed, _) in RANDAUG_OPS.items()
                      for sign in ((1, -1) if signed else (1,))
                      if torch.equal(out[i:i + 1],
                                     apply_randaug_op(x[i:i + 1], name, sign * max_v * 9 / 30))]
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


def test_normalize_matches_the_formula():
    from data import CIFAR10_MEAN, CIFAR10_STD, normalize

    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, CIFAR10_MEAN, CIFAR10_STD),
                               (x.float() / 255 - mean) / std)


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
            expected = (img[:, :, y, x + s] if 0 <= x + s < 5
                        else torch.zeros(2, 1, dtype=torch.uint8))
            assert torch.equal(sheared[:, :, y, x], expected)
    rot90 = apply_randaug_op(img, "Rotate", 90.0)
    assert any(torch.equal(rot90, torch.rot90(img, k=k, dims=(2, 3))) for k in (1, -1))


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
    aug = Augment(10, (0.5,) * 3, (0.25,) * 3, crop_pad=4, flip=True, randaug_n=2, randaug_m=9,
                  erase_prob=0.25, label_smoothing=0.1, mixup=0.8, cutmix=1.0)
    x, target = aug(torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta"),
                    torch.empty(8, dtype=torch.long, device="meta"))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and target.shape == (8, 10)
    # the CPU path reads counts on the host, and the check sees it
    with pytest.raises(NotImplementedError):
        rand_augment(torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta"), 2, 9,
                     host_sync=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augmentation_does_not_synchronise():
    aug = Augment(10, (0.5,) * 3, (0.25,) * 3, randaug_n=2, erase_prob=0.25, label_smoothing=0.1,
                  mixup=0.8, cutmix=1.0)
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
    shards = [TrainBatches(x, y, bs, lambda a, b: (a, b), seed=3, rank=r, world=world)
              for r in range(world)]
    assert len(shards[0]) == n // bs
    for epoch in (0, 1):
        steps = [[labels for _, labels in s.epoch(epoch)] for s in shards]
        for a, b in zip(*steps, strict=True):  # per step: two disjoint halves of one global batch
            assert len(a) == len(b) == bs // world and not set(a.tolist()) & set(b.tolist())
        seen = torch.cat([t for per_rank in steps for t in per_rank])
        # each sample at most once, 3 dropped
        assert len(seen) == len(set(seen.tolist())) == (n // bs) * bs
    again = TrainBatches(x, y, bs, lambda a, b: (a, b), seed=3, rank=0, world=world)
    assert torch.equal(again.indices(1), shards[0].indices(1))  # same seed and epoch: same order
    assert not torch.equal(shards[0].indices(0), shards[0].indices(1))  # a new order each epoch
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        TrainBatches(x, y, bs, lambda a, b: (a, b), world=3)


def test_every_allowed_seed_draws_batches():
    x, y = torch.zeros(20, 3, 4, 4, dtype=torch.uint8), torch.arange(20)
    for seed in (0, 2**32 - 1):  # the range config.validate allows for --seed
        batches = TrainBatches(x, y, 10, lambda a, b: (a, b), seed=seed)
        assert [len(b) for _, b in batches.epoch(12_345)] == [10, 10]
