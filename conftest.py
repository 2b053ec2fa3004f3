"""Shared test material: small data sets the tests make themselves (a user's clone has no
CIFAR-10), the settings of a tiny training run, one finished tiny run for the tests that only need
"a checkpoint", a random tiny ViT's checkpoint with two image files (visualize_attention.py's
tests), and the shape trace and parameter table that `python test_model.py` prints and
test_docs.py checks against the guide.

`python -m pytest -q` runs everything; `python -m pytest -q -m "not slow"` leaves out the tests
that train for several epochs or start another process (the edit-test loop)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_cifar10 as tc
from checkpoint import atomic_save
from config import TrainConfig
from vit_model import (
    CIFAR_PRESETS,
    VisionTransformer,
    ViTConfig,
    vit_base,
    vit_cifar,
    vit_huge,
    vit_large,
)

HERE = Path(__file__).resolve().parent
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# A tiny run: 500 images, 10 steps an epoch, D=32, 2 blocks; about a second an epoch on 2 cores.
TINY = dict(epochs=1, batch_size=50, embed_dim=32, depth=2, num_heads=2, wandb="off", log_every=2,
            eval_batch_size=100, measure_speed=False)
FAST = ["--epochs", "1", "--batch-size", "50", "--embed-dim", "32", "--depth", "2",
        "--num-heads", "2", "--wandb", "off", "--log-every", "2", "--eval-batch-size", "100",
        "--no-measure-speed"]


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
    """The easy task in CIFAR-10's Python format (cifar-10-batches-py)."""
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
    """The easy task as an ImageFolder tree of PNG files, train/CLASS/ and test/CLASS/."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = easy_images(n, seed)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:04d}.png")
    return root


def write_tiny_checkpoint(folder: Path, **changes) -> tuple[Path, list[str]]:
    """A random tiny ViT (32x32 input, patch 8: a 4x4 grid; 3 layers of 2 heads, [CLS] unless
    changes say classifier="gap") saved as a run's folder/ckpts/run/best.pt, normalisation mean
    0.5 and std 0.25; and two random 40x50 image files in folder."""
    torch.manual_seed(0)
    cfg = ViTConfig(**{**dict(img_size=32, patch_size=8, num_classes=10, embed_dim=24, depth=3,
                              num_heads=2), **changes})
    model = VisionTransformer(cfg)
    torch.nn.init.normal_(model.head.weight)  # the paper's zero head would tie every class
    path = folder / "ckpts" / "run" / "best.pt"
    path.parent.mkdir(parents=True)
    atomic_save({"model_config": cfg.to_dict(), "model": model.state_dict(), "ema": None,
                 "config": {}, "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}, path)
    images = []
    for i in range(2):
        p = folder / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255)
                        .astype(np.uint8)).save(p)
        images.append(str(p))
    return path, images


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def repo() -> Path:
    return HERE


@pytest.fixture(scope="session")
def classes() -> tuple[str, ...]:
    return CLASSES


@pytest.fixture(scope="session")
def fast() -> list[str]:
    """The command-line flags of a tiny run."""
    return list(FAST)


@pytest.fixture(scope="session")
def make_batches() -> Callable[..., Path]:
    return write_batches_py


@pytest.fixture(scope="session")
def make_image_folder() -> Callable[..., Path]:
    return write_image_folder


@pytest.fixture(scope="session")
def make_easy_images() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return easy_images


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> tuple[Path, list[str]]:
    """A random tiny ViT with a [CLS] token as a run's best.pt, and two 40x50 image files."""
    return write_tiny_checkpoint(tmp_path)


@pytest.fixture(scope="session")
def make_tiny_checkpoint() -> Callable[..., tuple[Path, list[str]]]:
    return write_tiny_checkpoint


@pytest.fixture(scope="session")
def batches_dir(tmp_path_factory) -> Path:
    """500 training and 200 test images of the easy task (never written to by the tests)."""
    return write_batches_py(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def tiny(batches_dir: Path, tmp_path: Path) -> Callable[..., TrainConfig]:
    """tiny(**changes): the config of a tiny run on batches_dir, writing under tmp_path."""
    def make(**changes) -> TrainConfig:
        return TrainConfig(**{**TINY, "data_dir": str(batches_dir), "out_dir": str(tmp_path),
                              **changes}).replace()
    return make


def run_at_once(target: Callable[..., None], args: list[tuple]) -> None:
    """Run target(*a) for each a in its own forked process, all at the same time; each must exit
    cleanly within a minute (concurrent writers of one file)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=a) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


@pytest.fixture(scope="session")
def trained_run(batches_dir: Path, tmp_path_factory) -> Path:
    """One finished tiny run (last.pt and best.pt of 1 epoch); copy it before changing it."""
    out = tmp_path_factory.mktemp("runs")
    tc.train(TrainConfig(**TINY, data_dir=str(batches_dir), out_dir=str(out), run_name="tiny"))
    return out / "tiny"


# --------------------------------------------------------------------------------------------
# What `python test_model.py` prints and test_docs.py checks against the guide
# --------------------------------------------------------------------------------------------

def shape_trace(model: VisionTransformer, x: torch.Tensor
                ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, description, shape) after each stage of one forward pass, read from the real
    forward."""
    trace = [("input", "input image", tuple(x.shape))]

    def after(key: str, text: str):
        return lambda m, i, o: trace.append(
            (key, text, tuple((o[0] if isinstance(o, tuple) else o).shape)))

    def before(key: str, text: str):
        return lambda m, i: trace.append((key, text, tuple(i[0].shape)))

    hooks = [model.patch_embed.proj.register_forward_hook(
                 after("patch_embed.proj", "Conv2d, kernel = stride = P")),
             model.patch_embed.register_forward_hook(
                 after("patch_embed", "flatten + transpose (Eq. 1)")),
             model.blocks[0].register_forward_pre_hook(
                 before("z0", "+ [CLS], + pos_embed (Eq. 1)"))]
    hooks += [blk.register_forward_hook(after(f"blocks.{j}", "Eq. 2-3"))
              for j, blk in enumerate(model.blocks)]
    hooks += [model.norm.register_forward_hook(after("norm", "final LayerNorm")),
              model.head.register_forward_pre_hook(
                  before("pool", f"{model.config.classifier} pooling (Eq. 4)")),
              model.head.register_forward_hook(after("head", "logits"))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return trace


def parameter_table() -> list[tuple[str, ViTConfig, int]]:
    """(name, config, parameters) of the paper's models (Table 1) and the CIFAR presets."""
    rows = []
    with torch.device("meta"):
        for name, model in (("ViT-B/16", vit_base()), ("ViT-L/16", vit_large()),
                            ("ViT-H/14", vit_huge())):
            rows.append((name, model.config, sum(p.numel() for p in model.parameters())))
    for name in CIFAR_PRESETS:
        model = vit_cifar(name)
        rows.append((name, model.config, sum(p.numel() for p in model.parameters())))
    return rows


@pytest.fixture(name="shape_trace", scope="session")
def shape_trace_fixture() -> Callable[..., list[tuple[str, str, tuple[int, ...]]]]:
    return shape_trace


@pytest.fixture(name="parameter_table", scope="session")
def parameter_table_fixture() -> Callable[[], list[tuple[str, ViTConfig, int]]]:
    return parameter_table
