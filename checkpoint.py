"""Checkpoint files of train_cifar10.py: written atomically, read with weights_only, and turned back
into the model they describe. The figures and the trainer both use this module; it knows nothing of
training.

A checkpoint is a dict of tensors and plain values: `model_config` (a ViTConfig as a dict, or a
ResNetConfig with arch "resnet" for the CNN baseline), `model`
and `ema` (state dicts), `classes`, `normalize` ({"mean", "std"} of the inputs), and, for resuming,
the training state (`config`, `optimizer`, `scaler`, `epoch`, `step`, `best_acc`, `history`, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cnn_model import ResNetCIFAR, ResNetConfig
from data import CIFAR10_MEAN, CIFAR10_STD, normalize
from vit_model import VisionTransformer, ViTConfig, load_state_dict_checked

# The trained model that ships with the repository (weights only, half precision) and its card.
SHIPPED_MODEL = Path(__file__).resolve().parent / "checkpoints" / "vit_cifar_tiny_cpu.pt"


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project."""


def _crash_point(path: Path, stage: str) -> None:
    """Crash-consistency tests: VIT_CRASH_AT=NAME:STAGE:N (e.g. best.pt:tmp:2) ends the process
    abruptly, like kill -9, at the N-th save of NAME, after the temporary file is written (tmp) or
    after it replaced NAME (done)."""
    spec = os.environ.get("VIT_CRASH_AT")
    if not spec or spec.split(":")[0] != path.name:
        return
    name, at, n = spec.split(":")
    if stage == "tmp":
        _SAVES[name] = _SAVES.get(name, 0) + 1
    if stage == at and _SAVES[name] == int(n):
        os._exit(99)


_SAVES: dict[str, int] = {}  # saves per file name in this process, for VIT_CRASH_AT


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    _crash_point(path, "tmp")
    os.replace(tmp, path)
    _crash_point(path, "done")


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (meaning its last.pt)."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}" + (" (it is a folder)" if p.is_dir() else ""))
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = ("model_config", "model")) -> dict[str, Any]:
    """Load a checkpoint with weights_only (no code runs from the file), checking that it is one of
    ours: a dict with the `required` entries. Anything else is a CheckpointError naming the file."""
    p = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # zero-byte, truncated, text, pickles with code: each raises its own type
        raise CheckpointError(f"cannot read checkpoint {p} ({p.stat().st_size:,} bytes): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    missing = [k for k in required if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise CheckpointError(f"{p} is not a checkpoint of train_cifar10.py: it has no {missing} "
                              f"(found {type(ckpt).__name__}"
                              + (f" with keys {sorted(ckpt)[:8]})" if isinstance(ckpt, dict) else ")"))
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> VisionTransformer | ResNetCIFAR:
    """Rebuild the model a checkpoint describes and load its (EMA, if present) weights."""
    try:
        mc = ckpt["model_config"]
        model = ResNetCIFAR(ResNetConfig(**mc)) if mc.get("arch") == "resnet" else VisionTransformer(ViTConfig(**mc))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model_config does not describe a model: {e}") from e
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    load_state_dict_checked(model, state)
    return model


def input_normalization(ckpt: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the checkpoint's model was trained with (CIFAR-10's for files that predate
    the `normalize` entry, all of which were trained on CIFAR-10)."""
    norm = ckpt.get("normalize") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    return tuple(norm["mean"]), tuple(norm["std"])


def find_latest_checkpoint(root: str | Path = "checkpoints") -> Path | None:
    """The newest best.pt under root/*/, else the newest checkpoint of any name, else None."""
    found = sorted(Path(root).glob("*/*.pt"), key=lambda p: p.stat().st_mtime)
    best = [p for p in found if p.name == "best.pt"]
    return (best or found or [None])[-1]


@torch.inference_mode()
def top_k(model: VisionTransformer, images: Tensor, mean: tuple, std: tuple, classes: list[str] | None,
          k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each uint8 image (B, 3, H, W) with their softmax probabilities."""
    return top_classes(model(normalize(images, mean, std)), classes, k)


def top_classes(logits: Tensor, classes: list[str] | None, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each row of logits (B, num_classes), with their probabilities."""
    probs = logits.float().softmax(-1)  # (B, num_classes)
    p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    name = (lambda c: classes[c]) if classes else str
    return [[(name(int(c)), float(q)) for q, c in zip(pr, ix, strict=True)] for pr, ix in zip(p, i, strict=True)]


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(weights: str | Path) -> Path:
    """The JSON card that describes a shipped weights file: same name, .json."""
    return Path(weights).with_suffix(".json")


def export_weights(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write what inference needs, nothing for resuming: the (EMA, if present) weights in half
    precision, the model config, classes, normalisation and the training config. Returns the
    written dict."""
    state = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    out = {"model_config": ckpt["model_config"],
           "model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
           "classes": ckpt.get("classes"), "normalize": ckpt.get("normalize"), "config": ckpt.get("config")}
    atomic_save(out, Path(path))
    return out


def load_pretrained_cifar(path: str | Path = SHIPPED_MODEL, check_hash: bool = True) -> VisionTransformer:
    """The shipped CIFAR-10 model, in eval mode, in one line:

        model = load_pretrained_cifar()  # model.pretrained_cfg: classes, mean, std, card

    It expects images scaled to [0, 1] and normalised with model.pretrained_cfg's mean and std
    (data.normalize does both for uint8 images). With check_hash the file must match its card's
    sha256.
    """
    path = Path(path)
    card_file = card_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path} (the repository ships one as checkpoints/{SHIPPED_MODEL.name})")
    card = json.loads(card_file.read_text()) if card_file.is_file() else None
    if check_hash:
        if card is None:
            raise FileNotFoundError(f"no card {card_file} next to {path} to check its sha256 against")
        if sha256_of(path) != card["sha256"]:
            raise CheckpointError(f"{path} does not match the sha256 in {card_file.name}: the file was changed "
                                  f"or damaged")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).eval()
    mean, std = input_normalization(ckpt)
    model.pretrained_cfg = {"classes": list(ckpt["classes"]), "mean": mean, "std": std, "card": card}
    return model
