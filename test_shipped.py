"""The model that ships with the repository, and a fresh clone with no data and no network:
the file matches its card, its predictions on the bundled photos match the card, and
`python visualize_attention.py` draws every figure from the two alone."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visualize_attention as va
from checkpoint import card_path, load_checkpoint, sha256_of
from data import BUNDLED_SAMPLES, CIFAR10_CLASSES, image_files, read_image
from inference import SHIPPED_MODEL, load_pretrained_cifar, top_k
from vit_model import ViTConfig, model_config

HERE = Path(__file__).resolve().parent
CARD = json.loads(card_path(SHIPPED_MODEL).read_text())


def test_shipped_file_matches_its_card():
    assert SHIPPED_MODEL.stat().st_size == CARD["bytes"] <= 4 * 2**20
    assert sha256_of(SHIPPED_MODEL) == CARD["sha256"]
    ckpt = load_checkpoint(SHIPPED_MODEL)  # weights_only
    assert ckpt["model_config"] == CARD["model_config"]
    assert ViTConfig(**ckpt["model_config"]) == model_config("vit_cifar_tiny", classifier="gap",
                                                             patch_drop_rate=0.6)
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values())
    assert sum(v.numel() for v in ckpt["model"].values()) == CARD["parameters"] == 810_890
    assert ckpt["classes"] == CARD["classes"] == list(CIFAR10_CLASSES)
    assert CARD["command"].startswith("python train_cifar10.py --preset cpu")
    acc = CARD["test_accuracy"]
    assert abs(acc["shipped_fp16"] - acc["checkpoint_fp32"]) <= 0.05  # half precision costs nothing


def test_one_line_loader_and_its_hash_check(tmp_path):
    model = load_pretrained_cifar()
    assert not model.training and model.pretrained_cfg["classes"] == list(CIFAR10_CLASSES)
    assert next(model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in memory
    damaged = tmp_path / SHIPPED_MODEL.name
    shutil.copy(SHIPPED_MODEL, damaged)
    shutil.copy(card_path(SHIPPED_MODEL), card_path(damaged))
    with open(damaged, "r+b") as f:  # flip one byte of a weight, deep inside the file
        f.seek(CARD["bytes"] // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_pretrained_cifar(damaged)
    load_pretrained_cifar(damaged, check_hash=False)  # still a readable file


def test_predictions_on_the_bundled_photos_match_the_card():
    model = load_pretrained_cifar()
    cfg = model.pretrained_cfg
    files = image_files(BUNDLED_SAMPLES)
    assert [f"assets/samples/{f.name}" for f in files] == [s["file"] for s in CARD["samples"]]
    x = torch.stack([read_image(f, 32) for f in files])
    for top, stated in zip(top_k(model, x, cfg["mean"], cfg["std"], cfg["classes"]),
                           CARD["samples"], strict=True):
        assert [c for c, _ in top] == [c for c, _ in stated["top3"]], stated["file"]
        assert [p for _, p in top] == pytest.approx([p for _, p in stated["top3"]], abs=1e-3)
    cat = next(s for s in CARD["samples"] if s["label"] == "cat")
    assert cat["top3"][0][0] == "cat"  # the one photo of a CIFAR-10 class is recognised


def test_uniform_attention_distance_by_hand():
    # 2x2 grid: from any patch, the others are at 1, 1 and sqrt(2) (itself at 0)
    assert va.uniform_attention_distance(2, 1) == pytest.approx((0 + 1 + 1 + math.sqrt(2)) / 4)
    # 3x3 grid: the mean over all 81 ordered pairs, by plain loops
    cells = [(r, c) for r in range(3) for c in range(3)]
    mean = sum(math.dist(a, b) for a in cells for b in cells) / 81
    assert va.uniform_attention_distance(3, 10) == pytest.approx(10 * mean)
    # and it is what mean_attention_distance measures for a head with uniform attention
    attn = torch.full((2, 1, 10, 10), 0.1)  # [CLS] + 3x3 patches
    assert va.mean_attention_distance([attn], 3, 10, 1).item() == pytest.approx(10 * mean, rel=1e-6)


def test_plot_heads_uses_one_scale_per_colour_bar(tmp_path):
    torch.manual_seed(0)
    # heads on different scales
    attn = [torch.rand(1, 3, 10, 10).softmax(-1) * s for s in (1.0, 5.0)]
    fig = va.plot_heads(torch.zeros(3, 32, 32, dtype=torch.uint8), attn, [0, 1], 1, 3,
                        tmp_path / "h.png", "test")
    for row, a in enumerate(attn):
        images = [ax.images[0] for ax in fig.axes[row * 4 + 1: row * 4 + 4]]  # heads of this row
        heads = a[0, :, 0, 1:]  # (h, N): [CLS] -> patch, what each panel shows
        assert len(set(heads.amax(1).tolist())) == 3  # each head alone would get its own scale
        assert [im.get_clim() for im in images] == [(0.0, pytest.approx(heads.max().item()))] * 3
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 2


def fresh_clone(dest: Path) -> Path:
    """The files a clone of this repository would have (tracked or not ignored), copied to dest."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                                cwd=HERE, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git to list the repository's files")
    for name in listed:
        if (HERE / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / name, dest / name)
    return dest


def git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=clone,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_fresh_clone_offline_draws_every_figure(tmp_path, batches_dir, fast):
    clone = fresh_clone(tmp_path / "clone")
    git(clone, "init", "-q")
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "clone")
    assert not (clone / "data").exists() and not list((clone / "checkpoints").glob("*/*.pt"))
    committed = {p.name: p.read_bytes() for p in (clone / "figures").glob("*.png")}
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "PYTHONDONTWRITEBYTECODE": "1"}  # any download attempt fails at once
    run = subprocess.run([sys.executable, "visualize_attention.py"], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "shipped model checkpoints/vit_cifar_tiny_cpu.pt" in run.stdout
    assert "4 bundled sample photos" in run.stdout and "cat: cat" in run.stdout
    pngs = {p.name for p in (clone / "outputs" / "figures").glob("*.png")}
    assert {"fig7_embedding_filters.png", "fig7_position_similarity.png",
            "fig7_attention_distance.png", "fig6_attention_rollout.png",
            "attention_heads.png"} == pngs
    # the guide's own figures are untouched: the quick start writes to the untracked outputs/
    assert {p.name: p.read_bytes() for p in (clone / "figures").glob("*.png")} == committed
    # the rest of the quick start (training on a small stand-in for CIFAR-10) leaves `git status`
    # clean: every output goes to an ignored folder
    # check_exercise.py ends with 1 on the unsolved exercise (make_figures.py needs CIFAR-10 and
    # reads every input before writing: test_visualize.py)
    for command, code in ((["visualize_attention.py", "--html"], 0), (["check_exercise.py"], 1),
                          (["train_cifar10.py", "--preset", "cpu", "--eval-subset", "0",
                            "--data-dir", str(batches_dir), *fast], 0)):
        done = subprocess.run([sys.executable, *command], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == code, (command, done.stdout[-1000:], done.stderr[-2000:])
    assert (clone / "outputs" / "explorer.html").is_file()
    assert list((clone / "checkpoints").glob("*/last.pt")), "the training run did not run"
    assert git(clone, "status", "--porcelain") == ""
