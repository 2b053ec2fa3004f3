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


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> VisionTransformer:
    """Rebuild the model a checkpoint describes and load its (EMA, if present) weights."""
    try:
        model = VisionTransformer(ViTConfig(**ckpt["model_config"]))
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
