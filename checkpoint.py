"""Checkpoint files of train_cifar10.py: written atomically, read with weights_only, and turned back
into the model they describe. The figures and the trainer both use this module; it knows nothing of
training.

A checkpoint is a dict of tensors and plain values: `model_config` (a ViTConfig as a dict), `model`
and `ema` (state dicts), `classes`, `normalize` ({"mean", "std"} of the inputs), and, for resuming,
the training state (`config`, `optimizer`, `scaler`, `epoch`, `step`, `best_acc`, `history`, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from data import CIFAR10_MEAN, CIFAR10_STD
from vit_model import VisionTransformer, ViTConfig, load_state_dict_checked


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (meaning its last.pt)."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(resolve_checkpoint_path(path), map_location=map_location, weights_only=True)


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> VisionTransformer:
    """Rebuild the model a checkpoint describes and load its (EMA, if present) weights."""
    model = VisionTransformer(ViTConfig(**ckpt["model_config"]))
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
