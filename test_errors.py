"""Bad input and crashes: every entry point answers a mistake with one line `error: ...` and exit
code 2 (never a traceback, never a changed checkpoint), and no crash leaves last.pt and best.pt
disagreeing. Each case of the 'broken' list (wrong results or silent loss) has its own test."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

import benchmark
import checkpoint
import train_cifar10 as tc
import visualize_attention as va
from checkpoint import card_path
from config import TrainConfig
from data import BUNDLED_SAMPLES, DataNotFoundError, image_files, load_dataset, read_image
from inference import SHIPPED_MODEL
from vit_model import (
    VisionTransformer,
    ViTConfig,
    load_jax_npz,
    load_state_dict_checked,
    model_config,
    vit_cifar,
)

# ---------------------------------------------------------------------------------------------
# Shared material: a small data set, one finished run, files of the wrong kind
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, batches_dir, trained_run, make_image_folder, classes
          ) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("errors")
    w = {"data": batches_dir, "root": root}
    shutil.copytree(trained_run, root / "runs" / "good")
    w["last"], w["best"] = root / "runs" / "good" / "last.pt", root / "runs" / "good" / "best.pt"
    (root / "zero.pt").write_bytes(b"")
    (root / "text.pt").write_text("this is not a checkpoint\n")
    (root / "truncated.pt").write_bytes(w["last"].read_bytes()[:5000])
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    torch.save(torch.zeros(3), root / "tensor.pt")
    good = torch.load(w["last"], weights_only=True)
    torch.save({"model_config": good["model_config"], "model": good["model"]},
               root / "weights_only.pt")
    two = ViTConfig(**{**good["model_config"], "num_classes": 2})
    torch.save({"model_config": two.to_dict(), "model": VisionTransformer(two).state_dict(),
                "classes": ["airplane", "automobile"]}, root / "two_classes.pt")
    (root / "a_file").write_text("x")
    (root / "runs" / "lastdir" / "last.pt").mkdir(parents=True)
    shapes = root / "shapes"  # an ImageFolder set of two other classes
    for split in ("train", "test"):
        for k, name in enumerate(("circle", "square")):
            (shapes / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((32, 32, 3), 60 * k + i, np.uint8)).save(
                    shapes / split / name / f"{i}.png")
    w["shapes"] = shapes
    for name, broken in (("empty_train", "train/cat"), ("empty_test", "test/dog")):
        tree = make_image_folder(root / name, 40, 20)
        for f in (tree / broken).iterdir():
            f.unlink()
        w[name] = tree
    all_empty = root / "all_empty"
    for split in ("train", "test"):
        for c in classes:
            (all_empty / split / c).mkdir(parents=True)
    w["all_empty"] = all_empty
    no_classes = root / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "test").mkdir()
    w["no_classes"] = no_classes
    bad_img = make_image_folder(root / "bad_img", 20, 10)
    (bad_img / "train" / "cat" / "zz_broken.jpg").write_text("not an image")
    w["bad_img"] = bad_img
    img = root / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(img)
    w["img"] = img
    np.savez(root / "other.npz", a=np.zeros(3))
    np.save(root / "single.npy", np.zeros(3))
    # damaged checkpoints: a model_config that is no dict, a normalize that is no mean/std
    torch.save({"model_config": "vit_cifar_tiny", "model": good["model"]}, root / "bad_config.pt")
    torch.save({**good, "normalize": {"mean": "grey"}}, root / "bad_norm.pt")
    # an exported model with its card: intact, with a flipped bit, with a broken or foreign card
    for name in ("shipped", "flipped", "badcard", "listcard"):
        shutil.copy(SHIPPED_MODEL, root / f"{name}.pt")
        shutil.copy(card_path(SHIPPED_MODEL), root / f"{name}.json")
    blob = bytearray((root / "flipped.pt").read_bytes())
    blob[len(blob) // 2] ^= 1
    (root / "flipped.pt").write_bytes(bytes(blob))
    (root / "badcard.json").write_text('{"sha256": ')
    shutil.copy(w["last"], root / "runcopy.pt")
    (root / "adir.pt").mkdir()
    shutil.copy(SHIPPED_MODEL, root / "cardfolder.pt")
    (root / "cardfolder.json").mkdir()
    (root / "listcard.json").write_text("[1, 2]")
    # a folder where a file should go: the confusion matrix, a figure
    (root / "runs" / "pngdir").mkdir()
    shutil.copy(w["best"], root / "runs" / "pngdir" / "best.pt")
    (root / "runs" / "pngdir" / "confusion_matrix.png").mkdir()
    (root / "figs_blocked" / "fig7_embedding_filters.png").mkdir(parents=True)
    return w


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of a command-line entry point, run in this process."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.pt")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The table: (entry point, arguments with {placeholders}, part of the message)
# ---------------------------------------------------------------------------------------------

TRAIN = ["{fast}", "--data-dir", "{data}", "--out-dir", "{root}/runs", "--run-name", "new"]
CASES = [
    # training: numeric flags, choices, data and output paths
    ("train", [*TRAIN, "--lr", "0"], "--lr must be positive"),
    ("train", [*TRAIN, "--lr=-1e-3"], "--lr must be positive"),
    ("train", [*TRAIN, "--lr", "nan"], "--lr must be positive"),
    ("train", [*TRAIN, "--patch-size", "0"], "--patch-size must be at least 1"),
    ("train", [*TRAIN, "--patch-size", "3"], "must be divisible by patch_size"),
    ("train", [*TRAIN, "--batch-size", "0"], "--batch-size must be at least 1"),
    ("train", [*TRAIN, "--batch-size", "-4"], "--batch-size must be at least 1"),
    ("train", [*TRAIN, "--batch-size", "1000"], "larger than the 500 training images"),
    ("train", [*TRAIN, "--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    ("train", [*TRAIN, "--num-heads", "0"], "--num-heads must be at least 1"),
    ("train", [*TRAIN, "--num-heads", "3"], "must be divisible by num_heads"),
    ("train", [*TRAIN, "--embed-dim", "0"], "--embed-dim must be at least 1"),
    ("train", [*TRAIN, "--depth", "0"], "--depth must be at least 1"),
    ("train", [*TRAIN, "--mlp-ratio", "0"], "--mlp-ratio must be positive"),
    ("train", [*TRAIN, "--epochs", "0"], "--epochs must be at least 1"),
    ("train", [*TRAIN, "--log-every", "0"], "--log-every must be at least 1"),
    ("train", [*TRAIN, "--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more"),
    ("train", [*TRAIN, "--ema", "1"], "--ema must be in [0, 1)"),
    ("train", [*TRAIN, "--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    ("train", [*TRAIN, "--randaug-m", "31"], "--randaug-m must be in [0, 30]"),
    ("train", [*TRAIN, "--dropout", "1"], "drop_rate must be in [0, 1)"),
    ("train", [*TRAIN, "--patch-drop", "-0.1"], "patch_drop_rate must be in [0, 1)"),
    ("train", [*TRAIN, "--time-budget", "-5"],
     "--time-budget must be 0 (off) or a positive number"),
    ("train", [*TRAIN, "--val-split", "999999"], "--val-split must be in"),
    ("train", [*TRAIN, "--eval-subset", "200"], "--eval-subset must be in [0, 200)"),
    ("train", [*TRAIN, "--model", "vit_giant"], "--model must be one of"),
    ("train", [*TRAIN, "--wandb", "maybe"], "--wandb must be one of"),
    ("train", [*TRAIN, "--amp", "fp16", "--device", "cpu"], "--amp fp16 needs CUDA"),
    ("train", [*TRAIN, "--data-dir", "{root}/nothing", "--no-download"],
     "no CIFAR-10 found ... `python visualize_attention.py` needs no data"),
    ("train", [*TRAIN, "--export", "{root}/w.pt"], "--export needs --eval-only"),
    ("train", [*TRAIN, "--data-dir", "{empty_train}"], "train/cat holds no images"),
    ("train", [*TRAIN, "--data-dir", "{empty_test}"], "test/dog holds no images"),
    ("train", [*TRAIN, "--data-dir", "{all_empty}"], "holds no images"),
    ("train", [*TRAIN, "--data-dir", "{no_classes}"], "has no class folders"),
    ("train", [*TRAIN, "--data-dir", "{bad_img}"], "cannot read image ... zz_broken.jpg"),
    ("train", [*TRAIN, "--out-dir", "{root}/a_file/runs"], "cannot write to"),
    ("train", [*TRAIN, "--out-dir", "{root}", "--run-name", "a_file"], "cannot write to"),
    ("train", [*TRAIN, "--run-name", "lastdir"], "last.pt is a folder"),
    ("train", [*TRAIN, "--out-dir", "/proc/vit_runs"], "cannot write to /proc/vit_runs"),
    # resume: the effective config is validated too, and the file must be one of ours
    ("train", ["--resume", "{last}", "--epochs", "-5"], "--epochs must be at least 1"),
    ("train", ["--resume", "{last}", "--epochs", "0"], "--epochs must be at least 1"),
    ("train", ["--resume", "{last}", "--lr", "0"], "--lr must be positive"),
    ("train", ["--resume", "{last}", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("train", ["--resume", "{last}", "--eval-batch-size", "-1"],
     "--eval-batch-size must be at least 1"),
    ("train", ["--resume", "{last}", "--embed-dim", "64"], "another model config"),
    ("train", ["--resume", "{last}", "--preset", "cpu"], "--preset cannot be combined"),
    ("train", ["--resume", "{last}", "--data-dir", "{shapes}"],
     "not the ones the checkpoint was trained on"),
    ("train", ["--resume", "{root}/zero.pt"], "cannot read checkpoint ... zero.pt"),
    ("train", ["--resume", "{root}/truncated.pt"], "cannot read checkpoint ... truncated.pt"),
    ("train", ["--resume", "{root}/text.pt"], "cannot read checkpoint ... text.pt"),
    ("train", ["--resume", "{root}/foreign.pt"],
     "foreign.pt is not a checkpoint of train_cifar10.py"),
    ("train", ["--resume", "{root}/tensor.pt"],
     "tensor.pt is not a checkpoint of train_cifar10.py"),
    ("train", ["--resume", "{root}/weights_only.pt"], "no ['config', 'optimizer'"),
    ("train", ["--resume", "{root}/missing.pt"], "no checkpoint at"),
    # evaluation of a checkpoint
    ("train", ["--eval-only", "{root}/zero.pt", "--data-dir", "{data}"], "cannot read checkpoint"),
    ("train", ["--eval-only", "{root}/text.pt", "--data-dir", "{data}"], "cannot read checkpoint"),
    ("train", ["--eval-only", "{root}/foreign.pt", "--data-dir", "{data}"], "is not a checkpoint"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--eval-batch-size", "0"],
     "--eval-batch-size must be at least 1"),
    ("train", ["--eval-only", "{root}/two_classes.pt", "--data-dir", "{data}"],
     "not the ones the checkpoint"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{shapes}"], "not the ones the checkpoint"),
    # figures
    ("figures", ["--checkpoint", "{root}/zero.pt", "--images", "{img}"], "cannot read checkpoint"),
    ("figures", ["--checkpoint", "{root}/foreign.pt", "--images", "{img}"], "is not a checkpoint"),
    ("figures", ["--checkpoint", "{best}", "--images", "{root}/text.pt"], "cannot read image"),
    ("figures", ["--checkpoint", "{best}", "--images", "{root}/missing.jpg"], "cannot read image"),
    ("figures", ["--checkpoint", "{best}", "--images", "{img}", "--layers", "7"],
     "--layers [7] out of range"),
    ("figures", ["--checkpoint", "{best}", "--images", "{img}", "--num-images", "0"],
     "--num-images must be at least"),
    ("figures", ["--checkpoint", "{best}", "--images", "{img}", "--show", "0"],
     "--show must be at least 1"),
    ("figures", ["--checkpoint", "{best}", "--images", "{img}", "--out-dir", "{root}/a_file/figs"],
     "cannot create the output folder"),
    ("figures", ["--npz", "{root}/text.pt", "--images", "{img}"],
     "cannot read ... as an .npz file"),
    ("figures", ["--npz", "{root}/other.npz", "--images", "{img}"],
     "is not a Google ViT checkpoint"),
    ("figures", ["--npz", "{root}/single.npy", "--images", "{img}"], "is a single array"),
    # training: settings that contradict each other, numbers out of range
    ("train", [*TRAIN, "--min-lr", "0.1", "--lr", "0.01"], "--min-lr must not exceed --lr"),
    ("train", [*TRAIN, "--seed", "-1"], "--seed must be in [0, 2^32)"),
    ("train", [*TRAIN, "--seed", "123456789012345678901234567890"], "--seed must be in [0, 2^32)"),
    # a saved run is never replaced or moved by a new command
    ("train", ["{fast}", "--data-dir", "{data}", "--out-dir", "{root}/runs", "--run-name", "good"],
     "already holds a run ... --resume ... --overwrite"),
    ("train", ["--resume", "{last}", "--out-dir", "{root}/elsewhere"],
     "--out-dir cannot be given with --resume"),
    ("train", ["--resume", "{last}", "--run-name", "other"], "--run-name cannot be given"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export", "{last}"],
     "are the names of a training run's checkpoints"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export", "{best}"],
     "are the names of a training run's checkpoints"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export", "{root}/runcopy.pt",
               "--overwrite"], "is a training run's checkpoint"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export", "{root}/shipped.pt"],
     "shipped.pt exists; ... --overwrite"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export", "{root}/adir.pt"],
     "adir.pt is a folder"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export", "{root}/model.json"],
     "name a .pt file"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export",
               "{root}/runs/good/last.fp16"], "name a .pt file"),
    ("train", ["--eval-only", "{best}", "--data-dir", "{data}", "--export", "{root}/new/best.pt"],
     "the names of a training run's checkpoints"),
    ("train", [*TRAIN[:-2], "--run-name", "../escaped"], "--run-name must be a folder name"),
    ("train", [*TRAIN[:-2], "--run-name", ".."], "--run-name must be a folder name"),
    # damaged files: checkpoints, model cards, a folder where a file goes
    ("train", ["--eval-only", "{root}/bad_config.pt", "--data-dir", "{data}"],
     "bad_config.pt is damaged"),
    ("train", ["--eval-only", "{root}/bad_norm.pt", "--data-dir", "{data}"],
     "bad_norm.pt is damaged"),
    ("train", ["--eval-only", "{root}/flipped.pt", "--data-dir", "{data}"],
     "does not match the sha256 in flipped.json"),
    ("train", ["--eval-only", "{root}/runs/pngdir/best.pt", "--data-dir", "{data}"],
     "confusion_matrix.png"),
    ("figures", ["--checkpoint", "{root}/bad_norm.pt", "--images", "{img}"], "is damaged"),
    ("figures", ["--checkpoint", "{root}/flipped.pt", "--images", "{img}"],
     "does not match the sha256"),
    ("figures", ["--checkpoint", "{root}/badcard.pt", "--images", "{img}"],
     "cannot read the model card ... badcard.json"),
    ("figures", ["--checkpoint", "{root}/listcard.pt", "--images", "{img}"],
     "listcard.json is not a model card"),
    ("figures", ["--checkpoint", "{root}/cardfolder.pt", "--images", "{img}"],
     "cannot read the model card ... cardfolder.json"),
    ("figures", ["--checkpoint", "{best}", "--images", "{img}", "--out-dir", "{root}/figs_blocked"],
     "fig7_embedding_filters.png"),
    # benchmark.py
    ("bench", ["model", "--rounds", "0"], "--rounds must be positive"),
    ("bench", ["model", "--batch-cifar", "-1"], "--batch-cifar must be positive"),
    ("bench", ["data", "--batch-size", "0"], "--batch-size must be positive"),
    ("bench", ["data", "--workers", "-1"], "--workers must be 0 or more"),
    ("bench", ["data", "--data-dir", "{root}/nothing"], "no CIFAR-10 found"),
    ("bench", ["recipe", "--data-dir", "{data}", "--minutes", "0"], "--minutes must be positive"),
    ("bench", ["recipe", "--data-dir", "{root}/nothing"], "no CIFAR-10 found"),
]


@pytest.mark.parametrize("entry, argv, message", CASES,
                         ids=[f"{e}:{' '.join(a[-2:])}" for e, a, _ in CASES])
def test_bad_input_is_one_clear_line(world, fast, tmp_path, capsys, entry, argv, message):
    argv = [b for a in argv for b in (fast if a == "{fast}" else
                                      [a.format(**{k: str(v) for k, v in world.items()})])]
    if "--out-dir" not in argv and entry == "figures":
        argv += ["--out-dir", str(tmp_path / "figs")]
    before = fingerprint(world["root"])
    code, err = run_cli({"train": tc.main, "figures": va.main, "bench": benchmark.main}[entry],
                        argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(".*".join(re.escape(part) for part in message.split(" ... ")),
                     lines[0]), lines[0]
    assert fingerprint(world["root"]) == before  # no checkpoint was written or changed


def test_export_writes_half_precision_weights_and_a_true_card(world, tmp_path, capsys):
    out = tmp_path / "shipped" / "tiny.pt"
    tc.main(["--eval-only", str(world["best"]), "--data-dir", str(world["data"]),
             "--export", str(out)])
    card = json.loads(out.with_suffix(".json").read_text())
    shipped, full = torch.load(out, weights_only=True), torch.load(world["best"], weights_only=True)
    assert (card["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
            and card["bytes"] == out.stat().st_size)
    # nothing for resuming
    assert set(shipped) == {"model_config", "model", "classes", "normalize", "config"}
    assert shipped["model"].keys() == full["model"].keys()
    for k, v in shipped["model"].items():
        assert v.dtype == torch.float16 and torch.equal(v, full["model"][k].half())
    assert card["parameters"] == sum(v.numel() for v in full["model"].values())
    assert card["command"].startswith("python train_cifar10.py") and card["epochs"] == full["epoch"]
    acc = card["test_accuracy"]
    # the run's own final evaluation
    assert acc["checkpoint_fp32"] == round(100 * full["best_acc"], 2)
    # a tiny model, a few test images
    assert abs(acc["shipped_fp16"] - acc["checkpoint_fp32"]) <= 5.0
    assert [s["file"] for s in card["samples"]] == [f"assets/samples/{f.name}"
                                                    for f in image_files(BUNDLED_SAMPLES)]
    assert f"exported {out}" in capsys.readouterr().out


def test_no_checkpoint_and_no_shipped_model_is_one_line(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(va, "SHIPPED_MODEL", tmp_path / "gone.pt")
    code, err = run_cli(va.main, ["--checkpoint-dir", str(world["root"] / "nothing"),
                                  "--images", str(world["img"]),
                                  "--out-dir", str(tmp_path / "figs")], capsys)
    assert (code == 2 and err.count("\n") == 1 and "no checkpoint found" in err
            and "no shipped model" in err), err


def test_decompression_bombs_are_refused_by_name(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 400)  # the 40x40 image counts as a bomb
    code, err = run_cli(va.main, ["--checkpoint", str(world["best"]), "--images", str(world["img"]),
                                  "--out-dir", str(tmp_path)], capsys)
    assert (code == 2 and err.count("\n") == 1 and "img.png" in err
            and "decompression bomb" in err), err


def test_no_network_for_pretrained_weights_is_one_line(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    code, err = run_cli(va.main, ["--torchvision-weights", "vit_b_16", "--out-dir", str(tmp_path)],
                        capsys)
    assert code == 2 and err.count("\n") == 1 and "could not download vit_b_16" in err, err


def test_debug_shows_the_traceback(world, fast):
    with pytest.raises(ValueError, match="--lr must be positive"):
        tc.main([*fast, "--data-dir", str(world["data"]), "--lr", "0", "--debug"])


MODEL_CASES = [
    (lambda: ViTConfig(embed_dim=0), "embed_dim must be a positive integer"),
    (lambda: ViTConfig(num_heads=0), "num_heads must be a positive integer"),
    (lambda: ViTConfig(patch_size=0), "patch_size must be a positive integer"),
    (lambda: ViTConfig(depth=-1), "depth must be a positive integer"),
    (lambda: ViTConfig(mlp_ratio=0), "mlp_ratio must be positive"),
    (lambda: ViTConfig(embed_dim=30, num_heads=4), "divisible by num_heads"),
    (lambda: vit_cifar("vit_nope"), "unknown CIFAR preset"),
    (lambda: model_config("vit_nope"), "unknown model"),
    (lambda: load_state_dict_checked(vit_cifar("vit_cifar_tiny", classifier="gap"),
                                     vit_cifar("vit_cifar_tiny").state_dict()),
     r"weights are of a model with a \[CLS\] token .*this model uses global average pooling"),
    (lambda: load_state_dict_checked(vit_cifar("vit_cifar_tiny"), [1, 2]), "expected a state dict"),
    (lambda: vit_cifar("vit_cifar_tiny")(torch.zeros(1, 3, 24, 24)),
     "expected images of 32x32, got 24x24"),
]


@pytest.mark.parametrize("call, message", MODEL_CASES, ids=[m[:30] for _, m in MODEL_CASES])
def test_model_api_errors_say_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_npz_of_the_wrong_kind(world):
    with pytest.raises(ValueError, match="is not a Google ViT checkpoint: it has no array"):
        load_jax_npz(str(world["root"] / "other.npz"))
    with pytest.raises(ValueError, match="cannot read .* as an .npz file"):
        load_jax_npz(str(world["root"] / "text.pt"))


# ---------------------------------------------------------------------------------------------
# The broken cases: each one wrong or lost silently before
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checkpoint_classes_are_matched_by_name(tiny, tmp_path, capsys, make_image_folder):
    root = make_image_folder(tmp_path / "data", 600, 200)
    tc.train(tiny(epochs=6, lr=3e-3, warmup_epochs=1, crop_pad=0, flip=False, patch_size=8,
                  data_dir=str(root), run_name="r"))
    ckpt = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    # the same model with its classes listed in another order (head rows permuted to match)
    order = list(range(10))[::-1]
    for key in ("model", "ema"):
        if ckpt[key] is not None:
            ckpt[key]["head.weight"] = ckpt[key]["head.weight"][order]
            ckpt[key]["head.bias"] = ckpt[key]["head.bias"][order]
    ckpt["classes"] = [ckpt["classes"][i] for i in order]
    torch.save(ckpt, tmp_path / "r" / "reordered.pt")
    accs = []
    for name in ("best.pt", "reordered.pt"):
        capsys.readouterr()
        tc.main(["--eval-only", str(tmp_path / "r" / name), "--data-dir", str(root)])
        accs.append(capsys.readouterr().out.split("test accuracy ")[1].split("%")[0])
    assert float(accs[0]) > 50 and accs[0] == accs[1], accs


def test_empty_class_folders_are_named(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", 40, 20)
    for f in (root / "test" / "frog").iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError, match=r"class folder .*test/frog holds no images"):
        load_dataset(root, download=False)


def test_16_bit_images_keep_their_range(tmp_path):
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    x = read_image(tmp_path / "deep.png")
    expected = torch.from_numpy(np.round(ramp / 65535 * 255).astype(np.uint8))
    assert torch.equal(x[0], expected) and torch.equal(x[1], expected)
    assert (x == 255).float().mean() < 0.01  # PIL's own convert("RGB") clips 99.6% of these pixels


def test_a_depth_1_model_gets_figures_without_layer_flags(tmp_path):
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    path = tmp_path / "ck" / "run" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model_config": cfg.to_dict(), "model": VisionTransformer(cfg).state_dict()}, path)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    files = va.main(["--checkpoint", str(path), "--images", str(img),
                     "--out-dir", str(tmp_path / "f")])
    assert all(f.exists() for f in files.values())
    assert (va.default_layers(1) == [0] and va.default_layers(2) == [0, 1]
            and va.default_layers(6) == [0, 2, 5])


def test_set_image_size_keeps_training_the_position_embedding():
    torch.manual_seed(0)
    model = vit_cifar("vit_cifar_tiny", img_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pos = model.pos_embed
    model.set_image_size(48)  # after the optimiser was built: the same Parameter, resized in place
    assert model.pos_embed is pos and pos.shape == (1, 1 + 12 * 12, 128)
    before = pos.detach().clone()
    model(torch.randn(2, 3, 48, 48)).sum().backward()
    opt.step()
    assert not torch.equal(pos.detach(), before)  # the optimiser still trains it


def test_resume_validates_flags_like_a_new_run(world, capsys):
    code, err = run_cli(tc.main, ["--resume", str(world["last"]), "--epochs", "-5"], capsys)
    assert code == 2 and "--epochs must be at least 1, got -5" in err


# ---------------------------------------------------------------------------------------------
# Crash consistency: a kill at every write point leaves last.pt and best.pt in agreement
# ---------------------------------------------------------------------------------------------

class Crash(BaseException):
    """Stands for kill -9: no handler of the trainer catches it, nothing after it is written."""


def crash_at(monkeypatch, name: str, stage: str, n: int) -> None:
    """The n-th save of NAME dies after the temporary file is written (tmp) or after it replaced
    NAME (done)."""
    real, saves = checkpoint.atomic_save, {}

    def save(obj, path: Path) -> None:
        if path.name == name:
            saves[name] = saves.get(name, 0) + 1
            if stage == "tmp" and saves[name] == n:
                torch.save(obj, path.with_suffix(path.suffix + ".tmp"))
                raise Crash
        real(obj, path)
        if path.name == name and stage == "done" and saves[name] == n:
            raise Crash

    monkeypatch.setattr(checkpoint, "atomic_save", save)


def three_epochs(tiny) -> TrainConfig:
    """A run whose epoch 2 is a new best (a second save of best.pt): see the test below."""
    return tiny(epochs=3, lr=3e-3, warmup_epochs=0, crop_pad=0, flip=False, patch_size=8,
                run_name="run")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["last.pt:tmp:2", "last.pt:done:2", "best.pt:tmp:2",
                                   "best.pt:done:2"])
def test_a_crash_at_any_write_point_leaves_consistent_checkpoints(tiny, tmp_path, monkeypatch,
                                                                  point):
    name, stage, n = point.split(":")
    crash_at(monkeypatch, name, stage, int(n))
    with pytest.raises(Crash):
        tc.train(three_epochs(tiny))
    monkeypatch.undo()
    last, best = tmp_path / "run" / "last.pt", tmp_path / "run" / "best.pt"
    tc.main(["--resume", str(last)])
    a, b = (torch.load(p, weights_only=True) for p in (last, best))
    full = [h for h in a["history"] if h.get("eval_images") == 200]
    assert a["epoch"] == 3 and a["best_acc"] == b["best_acc"] == max(h["eval_acc"] for h in full)
    assert b["history"][-1]["eval_acc"] == b["best_acc"]  # best.pt holds the model it reports
    reference = torch.load(best, weights_only=True)
    shutil.rmtree(tmp_path / "run")
    tc.train(three_epochs(tiny))  # the same run without a crash
    assert torch.load(best, weights_only=True)["best_acc"] == reference["best_acc"]


@pytest.mark.slow
def test_epoch_2_of_the_crash_run_is_a_new_best(tiny):
    # the crash test above relies on a second save of best.pt, in epoch 2
    accs = [h["eval_acc"] for h in tc.train(three_epochs(tiny))["history"]]
    assert accs[1] > accs[0], accs


# ---------------------------------------------------------------------------------------------
# A saved run is never destroyed: existing folders, two processes, a full disk, export targets
# ---------------------------------------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tiny, tmp_path, monkeypatch,
                                                               capsys):
    tc.train(tiny(epochs=2, run_name="full", stop_at_epoch=1))
    before = (tmp_path / "full" / "last.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs "
                           "8192: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    code, err = run_cli(tc.main, ["--resume", str(tmp_path / "full" / "last.pt")], capsys)
    assert code == 2 and err.count("\n") == 1 and "file write failed" in err, err
    assert "last.pt" in err and "its previous version is unchanged" in err
    assert (tmp_path / "full" / "last.pt").read_bytes() == before  # epoch 1, resumable
    assert not list((tmp_path / "full").glob("*.tmp"))


def test_two_processes_cannot_write_one_run(tiny, tmp_path, capsys):
    import fcntl

    folder = tmp_path / "busy"
    folder.mkdir()
    with open(folder / ".lock", "w") as held:  # another training process holds the run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match="in use by another training process"):
            tc.train(tiny(run_name="busy"))
    assert not (folder / "last.pt").exists()
    tc.train(tiny(run_name="busy"))  # released (as when that process ends, however it ends)
    assert (folder / "last.pt").exists()


def test_default_run_names_never_collide(tmp_path):
    a = checkpoint.new_run_dir(tmp_path, "", "vit_cifar_tiny-20261202-120000")
    b = checkpoint.new_run_dir(tmp_path, "", "vit_cifar_tiny-20261202-120000")
    assert a != b and a.is_dir() and b.is_dir() and b.name.endswith("-2")


def test_overwrite_replaces_a_run_only_when_asked(trained_run, tiny, tmp_path):
    shutil.copytree(trained_run, tmp_path / "again")
    before = (tmp_path / "again" / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        tc.train(tiny(run_name="again"))
    assert (tmp_path / "again" / "last.pt").read_bytes() == before
    tc.train(tiny(run_name="again", overwrite=True, seed=1))
    assert (tmp_path / "again" / "last.pt").read_bytes() != before


def test_an_interrupt_in_the_first_epoch_says_nothing_was_saved(tiny, tmp_path, monkeypatch,
                                                                capsys):
    def interrupted(self, x, target, lr):
        raise KeyboardInterrupt

    monkeypatch.setattr(tc.Learner, "step", interrupted)
    with pytest.raises(SystemExit) as e:
        tc.train(tiny(run_name="early"))
    err = capsys.readouterr().err
    assert e.value.code == 130 and "nothing was saved" in err and "--resume" not in err


def test_a_resumed_run_records_the_folder_it_is_in(trained_run, tmp_path):
    moved = tmp_path / "moved" / "run"
    shutil.copytree(trained_run, moved)
    tc.main(["--resume", str(moved / "last.pt"), "--epochs", "2"])
    config = torch.load(moved / "last.pt", weights_only=True)["config"]
    assert (config["out_dir"], config["run_name"]) == (str(moved.parent), "run")


def test_figures_refuse_a_damaged_shipped_model(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(va, "SHIPPED_MODEL", world["root"] / "flipped.pt")
    code, err = run_cli(va.main, ["--checkpoint-dir", str(tmp_path / "none"), "--images",
                                  str(world["img"]), "--out-dir", str(tmp_path / "f")], capsys)
    assert code == 2 and "does not match the sha256 in flipped.json" in err, err
    assert not (tmp_path / "f").exists() or not list((tmp_path / "f").glob("*.png"))


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(repo, world):
    import subprocess
    import sys

    cmd = (f"{sys.executable} visualize_attention.py --images {world['img']} --out-dir "
           f"{world['root'] / 'pipe_figs'} | head -1")
    proc = subprocess.run(cmd, shell=True, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("model: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "error: the output was closed" in proc.stderr


def test_resuming_an_earlier_file_never_discards_later_epochs(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = torch.load(run / "last.pt", weights_only=True)
    torch.save({**last, "epoch": 5}, run / "last.pt")  # last.pt is 4 epochs ahead of best.pt
    before = (run / "last.pt").read_bytes()
    code, err = run_cli(tc.main, ["--resume", str(run / "best.pt"), "--epochs", "8"], capsys)
    assert code == 2 and "holds a later epoch (5)" in err, err
    assert (run / "last.pt").read_bytes() == before


def test_the_run_folder_is_held_before_the_checkpoint_is_read(trained_run, tmp_path,
                                                               monkeypatch):
    import fcntl

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    held_while_reading = []
    real = tc.load_checkpoint

    def spy(path, *args, **kwargs):
        if kwargs.get("mmap"):  # the look at the file's kind, before its folder is touched
            return real(path, *args, **kwargs)
        with open(run / ".lock", "a") as other:  # another process trying to take the run
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held_while_reading.append(False)
            except BlockingIOError:
                held_while_reading.append(True)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tc, "load_checkpoint", spy)
    tc.train(TrainConfig(**torch.load(run / "last.pt", weights_only=True)["config"]).replace(
        epochs=2), resume=run / "last.pt")
    assert held_while_reading and all(held_while_reading)


def test_an_interrupted_export_keeps_the_earlier_one(world, tmp_path):
    out = tmp_path / "model.pt"
    ckpt = torch.load(world["best"], weights_only=True)
    checkpoint.export(ckpt, out, lambda shipped: {"note": "first"})
    before = (out.read_bytes(), card_path(out).read_bytes())

    def interrupted(shipped):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.export(ckpt, out, interrupted, overwrite=True)
    assert (out.read_bytes(), card_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]


def test_overwrite_replaces_the_old_run_only_when_the_new_one_saves(trained_run, tiny, tmp_path,
                                                                     monkeypatch, capsys):
    shutil.copytree(trained_run, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").glob("*.pt")}

    def interrupted(self, x, target, lr):
        raise KeyboardInterrupt

    monkeypatch.setattr(tc.Learner, "step", interrupted)
    with pytest.raises(SystemExit):
        tc.train(tiny(run_name="old", overwrite=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").glob("*.pt")} == before


def test_a_run_that_fails_before_saving_leaves_no_folder(tiny, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise DataNotFoundError("no CIFAR-10 found: test")

    monkeypatch.setattr(tc, "load_dataset", no_data)
    with pytest.raises(DataNotFoundError):
        tc.train(tiny(run_name="never"))
    assert not (tmp_path / "never").exists()


def test_ctrl_c_outside_the_training_loop_is_one_line(world, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tc, "load_dataset", interrupted)
    code, err = run_cli(tc.main, ["--eval-only", str(world["best"]), "--data-dir",
                                  str(world["data"])], capsys)
    assert code == 130 and err.strip() == "interrupted" and "Traceback" not in err
