"""Checkpoint files: the format of a run's checkpoint and what resuming needs, atomic writes,
weights-only reads, repair after a crash, and export of a model for inference with its card.
The figures and the trainer both use this module; it imports nothing of the trainer.

A run's checkpoint (`last.pt`, `best.pt`) is a dict of tensors and plain values:
- `model_config` (a ViTConfig as a dict, or a ResNetConfig with arch "resnet" for the CNN
  baseline), `model` and `ema` (state dicts), `classes`, `normalize` ({"mean", "std"} of the
  inputs): all that inference needs;
- for resuming: `config` (the TrainConfig), `optimizer` (one state per optimiser), `scaler`,
  `time_budget` (the schedule's state) and the RunState fields (`epoch`, `step`, `best_acc`,
  `history`, `wandb_run_id`).
Older files also hold `rng_states`; they are no longer needed, since every batch reseeds the
random generators from (seed, rank, epoch, step) (data.TrainBatches), and are ignored.
An exported file holds only the inference part, in half precision, with a JSON card beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from config import build_model
from data import CIFAR10_MEAN, CIFAR10_STD
from vit_model import (
    VisionTransformer,
    config_from_state_dict,
    convert_torchvision_state_dict,
    load_jax_npz,
    load_state_dict_checked,
    load_torchvision_pretrained,
)

# The number of heads of torchvision's ViTs (Table 1), which a state dict's shapes cannot tell.
TORCHVISION_HEADS = {"vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 16, "vit_l_32": 16, "vit_h_14": 16}

RESUME_KEYS = ("config", "model_config", "model", "optimizer", "scaler", "epoch", "step",
               "best_acc", "history")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this project."""


@dataclass
class RunState:
    """Where a run stands after its finished epochs; saved in every checkpoint, restored by
    --resume."""

    epoch: int = 0  # finished epochs
    step: int = 0
    best_acc: float = 0.0  # best accuracy on all evaluation images
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    wandb_run_id: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | None) -> RunState:
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)}) if ckpt else cls()


def run_checkpoint(config: dict[str, Any], model_config: dict[str, Any],
                   trained: dict[str, Any], run: RunState, schedule: dict[str, Any],
                   classes: list[str], mean: tuple[float, ...], std: tuple[float, ...]
                   ) -> dict[str, Any]:
    """A run's checkpoint; `trained` holds model, ema, optimizer and scaler (Learner.state_dict)."""
    return {"config": config, "model_config": model_config, **trained, **dataclasses.asdict(run),
            "time_budget": schedule,  # the Schedule's state, under its first name (older files)
            "classes": classes,
            "normalize": {"mean": list(mean), "std": list(std)}}


# --------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    """Write data to a temporary file of this process beside `path` (concurrent writers never
    share it), flush it to disk, then rename: readers see the old file or the new one, never
    half; a failed write removes the temporary file and leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint,
    and a failed write (a full disk) removes its temporary file and leaves `path` as it was."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        reason = " ".join(str(e).split()) or type(e).__name__
        kept = "its previous version is unchanged" if path.exists() else "nothing was written"
        raise CheckpointError(f"cannot write {path} ({reason}); {kept}") from e


def save_run(state: dict[str, Any], run_dir: Path, is_best: bool, first: bool = False) -> None:
    """last.pt after every epoch, then best.pt when the epoch is the best so far (a crash between
    the two is mended by repair_best on resume). A new run's first save also removes a best.pt
    of the earlier run it replaces (--overwrite)."""
    atomic_save(state, run_dir / "last.pt")
    if is_best:
        atomic_save(state, run_dir / "best.pt")
    elif first:
        (run_dir / "best.pt").unlink(missing_ok=True)


def check_writable(folder: Path, files: tuple[str, ...] = ()) -> None:
    """Create the folder and check that files can be written there (before the first step)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            if (folder / name).is_dir():
                raise IsADirectoryError(f"{folder / name} is a folder")
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to {folder}: {e}") from e


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (meaning its last.pt)."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        folder = " (it is a folder)" if p.is_dir() else ""
        raise FileNotFoundError(f"no checkpoint at {p}{folder}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: tuple[str, ...] = ("model_config", "model"), mmap: bool = False,
                    check_card: bool = True) -> dict[str, Any]:
    """Load a checkpoint with weights_only (no code runs from the file), checking that it is one
    of ours: a dict with the `required` entries; a file with a card beside it (an exported
    model, the shipped one included) must match the card's sha256. Anything else is a
    CheckpointError naming the file. mmap: tensors are read from the file when used (a quick look
    at the settings)."""
    p = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # zero-byte, truncated, text, pickles with code: each its own type
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {p} ({p.stat().st_size:,} bytes): "
                              f"{type(e).__name__}: {first}") from e
    missing = [k for k in required if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        keys = f" with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else ""
        raise CheckpointError(f"{p} is not a checkpoint of train_cifar10.py: it has no {missing} "
                              f"(found {type(ckpt).__name__}{keys})")
    norm = ckpt.get("normalize")
    if not isinstance(ckpt.get("model_config", {}), dict) or not (norm is None or (
            isinstance(norm, dict) and all(_numbers(norm.get(k)) for k in ("mean", "std")))):
        raise CheckpointError(f"{p} is damaged: its model_config must be a dict and its "
                              f"normalize a dict of 'mean' and 'std' lists of numbers")
    if check_card and (card_path(p).exists() or card_path(p).is_symlink()):
        verify_card(p)
    return ckpt


def _numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, (int, float)) for v in value)


def repair_best(run_dir: Path, ckpt: dict[str, Any]) -> None:
    """last.pt is written before best.pt, so a crash between the two can leave last.pt recording
    a new best epoch that best.pt does not hold; last.pt then holds that epoch's weights itself,
    and best.pt is rebuilt from it."""
    best = run_dir / "best.pt"
    hist = ckpt["history"]
    if not (hist and hist[-1].get("eval_acc") == ckpt["best_acc"] and ckpt["best_acc"] > 0):
        return  # the last epoch was not the best: best.pt was not due to change
    held = load_checkpoint(best).get("best_acc") if best.is_file() else None
    if held != ckpt["best_acc"]:
        atomic_save(ckpt, best)
        print(f"repaired {best}: it now holds epoch {ckpt['epoch']} "
              f"({100 * ckpt['best_acc']:.2f}%), the best epoch recorded in last.pt (its write had "
              f"been interrupted)", file=sys.stderr)


def new_run_dir(out_dir: str | Path, run_name: str, default: str) -> Path:
    """The folder of a new run: OUT_DIR/RUN_NAME, or OUT_DIR/DEFAULT (then DEFAULT-2, -3, ...,
    created here, so that two runs started in the same second never share a folder)."""
    if run_name:
        return Path(out_dir) / run_name
    check_writable(Path(out_dir))
    for n in range(1, 1000):
        folder = Path(out_dir) / (default if n == 1 else f"{default}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ValueError(f"no free run folder {default}-N in {out_dir}; pass --run-name")


def hold_run_dir(run_dir: Path, new_run: bool, overwrite: bool = False) -> IO[str]:
    """Before anything is read or written: the run folder is writable and held by this process
    alone (a lock on RUN/.lock, released when the process ends, however it ends), and a new run
    refuses a folder that holds an earlier run's checkpoints unless `overwrite` (they are then
    replaced by the new run's first save). Returns the lock: keep it open while the run writes."""
    check_writable(run_dir, ("last.pt", "best.pt"))
    try:  # O_NOFOLLOW: a planted symlink cannot make the lock truncate another file
        fd = os.open(run_dir / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ValueError(f"cannot create the lock file {run_dir / '.lock'}: {e.strerror}") from e
    lock = os.fdopen(fd, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"{run_dir} is in use by another training process (it holds "
                         f"{run_dir / '.lock'}); wait for it to end or choose another "
                         f"--run-name") from None
    saved = [run_dir / name for name in ("last.pt", "best.pt") if (run_dir / name).exists()]
    if new_run and saved and not overwrite:
        lock.close()
        resume = run_dir / "last.pt" if (run_dir / "last.pt").exists() else saved[0]
        raise ValueError(f"{run_dir} already holds a run ({', '.join(p.name for p in saved)}); "
                         f"continue it with `python train_cifar10.py --resume {resume}`, choose "
                         f"another --run-name, or pass --overwrite to replace it")
    return lock


def release_run_dir(run_dir: Path) -> None:
    """After the lock is closed: a run folder left with nothing but its lock (a run that failed
    before its first save) is removed; any other folder keeps its lock file."""
    with contextlib.suppress(OSError):
        if [p.name for p in run_dir.iterdir()] == [".lock"]:
            (run_dir / ".lock").unlink()
            run_dir.rmdir()


def check_resume_point(path: Path, ckpt: dict[str, Any]) -> None:
    """Resuming from a file other than the folder's last.pt (best.pt, say) must not throw away
    the later epochs that last.pt holds."""
    last = path.parent / "last.pt"
    if path.name == "last.pt" or not last.is_file():
        return
    later = load_checkpoint(last, mmap=True, check_card=False).get("epoch", 0)
    if later > ckpt["epoch"]:
        raise ValueError(f"--resume {path}: {last} holds a later epoch ({later}) than this file "
                         f"({ckpt['epoch']}), and continuing from this file would replace it; "
                         f"resume {last}, or copy {path.name} into a new folder to branch from it")


# --------------------------------------------------------------------------------------------
# The model a checkpoint describes
# --------------------------------------------------------------------------------------------

def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its (EMA, if present) weights."""
    try:
        model = build_model(ckpt["model_config"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's model_config does not describe a model: "
                              f"{e}") from e
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    load_state_dict_checked(model, state)
    return model


# --------------------------------------------------------------------------------------------
# Pre-trained weights for fine-tuning (--init)
# --------------------------------------------------------------------------------------------

def _state_dict_file(path: str) -> dict[str, Tensor]:
    """A saved state dict (name -> tensor), also inside a {"state_dict": ...} or {"model": ...}."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no state dict file at {path}") from None
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a state dict: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not (isinstance(sd, dict) and sd and all(isinstance(v, Tensor) for v in sd.values())):
        raise CheckpointError(f"{path} is not a state dict (parameter name -> tensor)")
    return sd


def load_pretrained(source: str, num_heads: int | None = None
                    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """--init SOURCE: the model config (as a dict) and the weights of pre-trained weights.
    SOURCE is a checkpoint of ours (its EMA weights if it has them), a Google PATH.npz,
    torchvision:ARCH (downloaded), torchvision:ARCH=PATH (a saved torchvision state dict of that
    ViT; num_heads for another architecture) or timm:PATH (a timm state dict, whose names are
    ours; num_heads must be given: the shapes cannot tell it)."""
    kind, sep, rest = source.partition(":")
    if sep and kind == "torchvision":
        arch, _, path = rest.partition("=")
        if not path:
            model = load_torchvision_pretrained(arch)
            return model.config.to_dict(), model.state_dict()
        heads = num_heads or TORCHVISION_HEADS.get(arch)
        if heads is None:
            raise ValueError(f"--init torchvision:{arch}=...: {arch!r} is not one of "
                             f"torchvision's ViTs {sorted(TORCHVISION_HEADS)}; for another "
                             f"architecture give its number of heads with --num-heads")
        try:
            sd = convert_torchvision_state_dict(_state_dict_file(path))
        except KeyError as e:
            raise CheckpointError(f"{path} is not a torchvision ViT state dict: it has no "
                                  f"{e}") from e
        return config_from_state_dict(sd, num_heads=heads).to_dict(), sd
    if sep and kind == "timm":
        if not num_heads:
            raise ValueError("--init timm:PATH: a state dict's shapes cannot tell the number of "
                             "heads; give it with --num-heads")
        sd = _state_dict_file(rest)
        try:
            return config_from_state_dict(sd, num_heads=num_heads).to_dict(), sd
        except KeyError as e:
            raise CheckpointError(f"{rest} is not a timm ViT state dict: it has no {e}") from e
    if source.endswith(".npz"):
        model = load_jax_npz(source)
        return model.config.to_dict(), model.state_dict()
    ckpt = load_checkpoint(source)
    return ckpt["model_config"], ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]


def init_from_pretrained(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Sec. 3.2: every pre-trained weight but the prediction head (and its pre-logits layer) is
    loaded, the position embedding resized to the model's grid; the new head is zero."""
    kept = {k: v for k, v in state.items() if not k.startswith(("head.", "pre_logits."))}
    if isinstance(model, VisionTransformer):
        load_state_dict_checked(model, kept, skip_head=True)
    else:
        missing, unexpected = model.load_state_dict(kept, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise ValueError(f"the weights do not fit the model: missing {missing}, unexpected "
                             f"{unexpected}")
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)


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


# --------------------------------------------------------------------------------------------
# Export for inference, and its card
# --------------------------------------------------------------------------------------------

def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(weights: str | Path) -> Path:
    """The JSON card that describes a shipped weights file: same name, .json."""
    return Path(weights).with_suffix(".json")


def read_card(weights: str | Path) -> dict[str, Any]:
    """The card of an exported weights file, or a CheckpointError that names the card."""
    card = card_path(weights)
    try:
        data = json.loads(card.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read the model card {card}: {e}") from e
    if not (isinstance(data, dict) and isinstance(data.get("sha256"), str)):
        raise CheckpointError(f"{card} is not a model card: it has no sha256 of {card.stem}.pt")
    return data


def verify_card(weights: str | Path) -> dict[str, Any]:
    """The card of `weights`, checked: the file must have the sha256 the card states."""
    card = read_card(weights)
    if sha256_of(weights) != card["sha256"]:
        raise CheckpointError(f"{weights} does not match the sha256 in {card_path(weights).name}: "
                              f"the file was changed or damaged")
    return card


def export_weights(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Write what inference needs, nothing for resuming: the (EMA, if present) weights in half
    precision, the model config, classes, normalisation and the training config. Returns the
    written dict."""
    state = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    out = {"model_config": ckpt["model_config"],
           "model": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
           "classes": ckpt.get("classes"), "normalize": ckpt.get("normalize"),
           "config": ckpt.get("config")}
    atomic_save(out, Path(path))
    return out


def check_export_path(path: Path, overwrite: bool = False) -> None:
    """An export may write a new file, or replace an earlier export if `overwrite`; never a
    training run's checkpoint, a folder, or a place that cannot be written."""
    if path.suffix != ".pt":  # its card is PATH.json: never the file itself, nor another's card
        raise ValueError(f"--export {path}: name a .pt file (its card is written beside it as "
                         f"{path.stem}.json)")
    if path.name in ("last.pt", "best.pt"):
        raise ValueError(f"--export {path}: last.pt and best.pt are the names of a training "
                         f"run's checkpoints; choose another name")
    check_writable(path.parent)
    for target in (path, card_path(path)):
        if target.is_dir():
            raise ValueError(f"--export {path}: {target} is a folder")
    if path.is_file():
        try:
            is_run = "optimizer" in torch.load(path, map_location="cpu", weights_only=True,
                                               mmap=True)
        except Exception:  # not a checkpoint at all: an ordinary file, --overwrite decides
            is_run = False
        if is_run:
            raise ValueError(f"--export {path} is a training run's checkpoint: export writes a "
                             f"new file for inference; choose another path")
    if not overwrite and (path.exists() or card_path(path).exists()):
        raise ValueError(f"--export {path}: {path if path.exists() else card_path(path)} exists; "
                         f"choose another path or pass --overwrite to replace it")


def export(ckpt: dict[str, Any], path: Path, measure: Callable[[dict[str, Any]], dict[str, Any]],
           overwrite: bool = False) -> dict[str, Any]:
    """Write the half-precision weights file and its card PATH.json: what the file is (sha256,
    size, parameters, config, classes, normalisation), then what `measure` found when it read
    the written file back (accuracies, sample predictions, the data's classes, ...). Returns the
    card. It never writes onto a run's checkpoint, and onto an earlier export only if
    `overwrite`."""
    check_export_path(path, overwrite)
    # written under temporary names and renamed at the end: an interrupted export leaves an
    # earlier export (weights and card) as it was
    new, new_card = path.with_name(path.name + ".new"), card_path(path).with_name(
        card_path(path).name + ".new")
    try:
        export_weights(ckpt, new)
        shipped = load_checkpoint(new, check_card=False)
        facts = measure(shipped)
        card = {"file": path.name, "sha256": sha256_of(new), "bytes": new.stat().st_size,
                "dtype": "float16",
                "parameters": sum(v.numel() for v in shipped["model"].values()),
                "model_config": shipped["model_config"], "classes": shipped["classes"],
                "normalize": shipped["normalize"], **facts, "date": time.strftime("%Y-%m-%d")}
        new_card.write_text(json.dumps(card, indent=1) + "\n")
        os.replace(new, path)
        os.replace(new_card, card_path(path))
    finally:
        new.unlink(missing_ok=True)
        new_card.unlink(missing_ok=True)
    return card
