"""Train a Vision Transformer on CIFAR-10.

    python train_cifar10.py --preset cpu --data-dir /tmp/cifar10     # the 2-core CPU recipe
    python train_cifar10.py --preset gpu                              # full recipe, downloads CIFAR-10
    torchrun --nproc_per_node=4 train_cifar10.py --preset gpu         # DDP, one process per GPU
    python train_cifar10.py --resume checkpoints/RUN/last.pt          # continue exactly
    python train_cifar10.py --eval-only checkpoints/RUN/best.pt       # accuracy + confusion matrix

Settings come from TrainConfig's defaults, then the --preset, then the flags given; the effective
configuration is printed at start and stored in every checkpoint and in the W&B run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataNotFoundError,
    load_dataset,
    mixup_cutmix,
    normalize,
    rand_augment,
    random_crop_flip,
    random_erasing,
)
from vit_model import CIFAR_PRESETS, VisionTransformer, ViTConfig, load_state_dict_checked


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str = _f("vit_cifar_tiny", f"model preset, one of {sorted(CIFAR_PRESETS)}")
    patch_size: int = _f(4, "patch size P (32x32 images give a (32/P)^2 grid)")
    embed_dim: int | None = _f(None, "override the preset's embedding size D", type=int)
    depth: int | None = _f(None, "override the preset's number of blocks", type=int)
    num_heads: int | None = _f(None, "override the preset's number of heads", type=int)
    mlp_ratio: float | None = _f(None, "override the preset's MLP size / D", type=float)
    classifier: str = _f("token", "'token' ([CLS], Eq. 4) or 'gap' (global average pooling)")
    pos_embed: str = _f("learned", "'learned', 'sincos' or 'none' (Appendix D.4)")
    dropout: float = _f(0.0, "dropout after dense layers")
    drop_path: float = _f(0.0, "stochastic depth rate of the last block")
    patch_drop: float = _f(0.0, "fraction of patch tokens dropped in training (faster steps)")
    full_token_epochs: int = _f(0, "train the last N epochs without patch dropout (with --time-budget: "
                                   "the time they are expected to take)")
    # optimisation
    epochs: int = _f(30, "number of epochs (with --time-budget: the most epochs)")
    time_budget: float = _f(0.0, "minutes of training (evaluation included): the cosine decay follows the "
                                 "time spent (read every --log-every steps) instead of the step count and "
                                 "the run stops when it is spent; resuming such a run is not bit-exact (0: off)")
    batch_size: int = _f(128, "global batch size (split across DDP processes)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    min_lr: float = _f(1e-5, "learning rate at the end of the cosine decay")
    warmup_epochs: float = _f(2.0, "linear warmup length in epochs (per-step schedule)")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on biases, norms, pos_embed, cls_token)")
    beta2: float = _f(0.999, "AdamW beta2")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    ema: float = _f(0.0, "decay of an EMA of the weights used for evaluation (0 disables)")
    # augmentation and regularisation
    crop_pad: int = _f(4, "random crop after this much zero padding (0 disables)")
    flip: bool = _f(True, "random horizontal flip")
    randaug_n: int = _f(0, "RandAugment: operations per image (0 disables)")
    randaug_m: int = _f(9, "RandAugment: magnitude, 0-30")
    mixup: float = _f(0.0, "mixup alpha (0 disables)")
    cutmix: float = _f(0.0, "cutmix alpha (0 disables)")
    mix_prob: float = _f(1.0, "probability that a sample is mixed, when mixup or cutmix is on")
    erase_prob: float = _f(0.0, "random erasing probability per sample")
    label_smoothing: float = _f(0.1, "label smoothing")
    # data, evaluation, output
    data_dir: str = _f("data", "CIFAR-10: a cifar-10-batches-py folder, an ImageFolder tree with "
                               "train/ and test/, or where to download it")
    download: bool = _f(True, "download CIFAR-10 when data_dir holds none")
    val_split: int = _f(0, "hold out this many training images and evaluate on them instead of test")
    eval_every: int = _f(1, "evaluate every N epochs (the last epoch is always evaluated)")
    eval_subset: int = _f(0, "evaluate on N evenly spaced evaluation images between epochs and on all of "
                             "them after the last epoch; only full evaluations choose best.pt (0: all)")
    eval_batch_size: int = _f(1000, "evaluation batch size")
    out_dir: str = _f("checkpoints", "checkpoints go to OUT_DIR/RUN_NAME/{last,best}.pt")
    run_name: str = _f("", "run folder name (default: MODEL-TIMESTAMP)")
    wandb: str = _f("offline", "Weights & Biases mode: 'offline', 'online' or 'off'")
    wandb_project: str = _f("vit_from_scratch", "W&B project name")
    # speed and reproducibility
    device: str = _f("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    amp: str = _f("auto", "autocast: 'auto' (bf16 on CUDA, off on CPU), 'bf16', 'fp16' (CUDA) or 'off'")
    compile: bool = _f(False, "torch.compile the model")
    threads: int = _f(0, "CPU threads for torch (0: leave the default)")
    seed: int = _f(0, "random seed")
    log_every: int = _f(20, "steps between progress-bar and W&B step updates")
    stop_at_epoch: int = _f(0, "stop cleanly after this many epochs, as if interrupted (0: run all)")


PRESETS: dict[str, dict[str, Any]] = {
    # The best test accuracy on the 2-core CPU within an hour (README, "Results"): 57 minutes of
    # training, whatever the machine's speed that day, plus start-up and the last evaluation.
    "cpu": dict(model="vit_cifar_tiny", classifier="gap", time_budget=57.0, epochs=100, batch_size=128,
                lr=1e-3, warmup_epochs=1.0, weight_decay=0.05, patch_drop=0.6, full_token_epochs=1,
                label_smoothing=0.1, eval_subset=2000),
    # Full recipe for one GPU (DeiT-style): strong augmentation, long schedule, EMA.
    "gpu": dict(model="vit_cifar_base", epochs=200, batch_size=512, lr=1e-3, warmup_epochs=10,
                weight_decay=0.05, beta2=0.99, drop_path=0.1, randaug_n=2, randaug_m=9, mixup=0.8,
                cutmix=1.0, erase_prob=0.25, label_smoothing=0.1, ema=0.9998, eval_batch_size=2000,
                compile=True),
}
MODEL_FIELDS = ("model", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "classifier",
                "pos_embed", "dropout", "drop_path", "patch_drop")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="starting point for every setting below")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its last.pt (or run folder)")
    p.add_argument("--eval-only", metavar="CKPT", help="evaluate a checkpoint: accuracy, per-class "
                                                       "accuracy and a confusion-matrix PNG")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
        else:
            p.add_argument(flag, type=f.metadata.get("type", type(f.default)),
                           default=argparse.SUPPRESS, help=help_text)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < preset < flags; when resuming, the saved config replaces defaults and preset,
    and a flag that changes the model is an error."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if saved is not None:
        if args.preset:
            raise ValueError("--preset cannot be combined with --resume: the run keeps its own settings")
        changed = {k: (saved[k], v) for k, v in given.items() if k in MODEL_FIELDS and saved.get(k) != v}
        if changed:
            raise ValueError(f"--resume: the checkpoint was trained with another model config; "
                             f"differences (checkpoint, flag): {changed}")
        return TrainConfig(**{**saved, "stop_at_epoch": 0, **given})  # a stop applies to one run only
    preset = PRESETS[args.preset] if args.preset else {}
    cfg = TrainConfig(**{**preset, **given})
    choices = {"model": tuple(CIFAR_PRESETS), "wandb": ("offline", "online", "off"),
               "device": ("auto", "cpu", "cuda"), "amp": ("auto", "bf16", "fp16", "off")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("epochs", "batch_size", "eval_every", "eval_batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.time_budget < 0:
        raise ValueError(f"--time-budget must be 0 (off) or a positive number of minutes, got {cfg.time_budget}")
    model_config(cfg, num_classes=10)  # validates the model settings early
    return cfg


def model_config(cfg: TrainConfig, num_classes: int) -> ViTConfig:
    arch = dict(CIFAR_PRESETS[cfg.model])
    for name in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(cfg, name) is not None:
            arch[name] = getattr(cfg, name)
    return ViTConfig(img_size=32, patch_size=cfg.patch_size, num_classes=num_classes,
                     classifier=cfg.classifier, pos_embed=cfg.pos_embed, drop_rate=cfg.dropout,
                     drop_path_rate=cfg.drop_path, patch_drop_rate=cfg.patch_drop, **arch)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_checkpoint_path(path: str | Path) -> Path:
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


def find_latest_checkpoint(root: str | Path = "checkpoints") -> Path | None:
    found = sorted(Path(root).glob("*/*.pt"), key=lambda p: p.stat().st_mtime)
    best = [p for p in found if p.name == "best.pt"]
    return (best or found or [None])[-1]


# --------------------------------------------------------------------------------------------
# Training pieces
# --------------------------------------------------------------------------------------------

def param_groups(model: VisionTransformer, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, LayerNorm weights, pos_embed and cls_token."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Schedule:
    """Learning-rate factor per step: linear warmup, then cosine decay to min_ratio over the
    remaining steps or, with a time budget, over the remaining time. Its state is plain numbers,
    so LambdaLR's state_dict carries it into checkpoints."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, budget_s: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.budget_s = budget_s
        self.elapsed_s = 0.0  # set by the training loop before each step, in time mode
        self.warmup_end_s = -1.0  # elapsed time when the warmup ended, in time mode

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.budget_s > 0:
            if self.warmup_end_s < 0:
                self.warmup_end_s = self.elapsed_s
            t = (self.elapsed_s - self.warmup_end_s) / max(self.budget_s - self.warmup_end_s, 1e-9)
        else:
            t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def augment(x: Tensor, y: Tensor, cfg: TrainConfig, num_classes: int) -> tuple[Tensor, Tensor]:
    """uint8 images (B, 3, H, W) and labels (B,) -> normalised floats and soft targets (B, K)."""
    x = random_crop_flip(x, cfg.crop_pad, cfg.flip)
    if cfg.randaug_n > 0:
        x = rand_augment(x, cfg.randaug_n, cfg.randaug_m)
    x = normalize(x)
    if cfg.erase_prob > 0:
        x = random_erasing(x, cfg.erase_prob)
    target = F.one_hot(y, num_classes).float()
    target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
    if cfg.mixup > 0 or cfg.cutmix > 0:
        x, target = mixup_cutmix(x, target, cfg.mixup, cfg.cutmix, cfg.mix_prob)
    return x, target


@torch.inference_mode()
def evaluate(model: nn.Module, x_all: Tensor, y_all: Tensor, batch_size: int, amp_ctx: Any,
             num_classes: int) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix (rows: true class) over this process's share."""
    model.eval()
    loss_sum = torch.zeros((), device=x_all.device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=x_all.device)
    for i in range(0, len(x_all), batch_size):
        x, y = normalize(x_all[i:i + batch_size]), y_all[i:i + batch_size]
        with amp_ctx:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        confusion += torch.bincount(y * num_classes + logits.argmax(1),
                                    minlength=num_classes**2).view(num_classes, num_classes)
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    n = confusion.sum().clamp(min=1)
    return {"loss": (loss_sum / n).item(), "acc": (confusion.diag().sum() / n).item(),
            "confusion": confusion.cpu()}


class SafeWandb:
    """W&B logging that never kills training: any failure becomes one warning."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, run_id: str | None) -> None:
        self.run = None
        if cfg.wandb == "off":
            return
        try:
            import wandb

            self.run = wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir),
                                  mode=cfg.wandb, id=run_id, resume="allow",
                                  config=dataclasses.asdict(cfg))
        except Exception as e:
            print(f"warning: W&B disabled, init failed: {e}", file=sys.stderr)

    @property
    def id(self) -> str | None:
        return self.run.id if self.run else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:
            print(f"warning: W&B logging failed and is now off: {e}", file=sys.stderr)
            self.run = None

    def finish(self) -> None:
        with contextlib.suppress(Exception):
            if self.run is not None:
                self.run.finish()


class StopFlag:
    """First Ctrl-C (or SIGTERM): finish the current step, save, exit. Second Ctrl-C: exit now."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint after this step (Ctrl-C again to abort)",
              file=sys.stderr)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_confusion_png(confusion: Tensor, classes: tuple[str, ...], path: Path, title: str) -> None:
    plt = pyplot()
    cm = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_curve_png(history: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    ev = [h for h in history if "eval_acc" in h]
    n_full = max((h.get("eval_images", 0) for h in ev), default=0)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([h["epoch"] for h in history], [100 * h["train_acc"] for h in history], label="train (augmented)")
    ax.plot([h["epoch"] for h in ev], [100 * h["eval_acc"] for h in ev], "-", color="C1")
    for part in (True, False):  # hollow markers: evaluated on a subset (--eval-subset)
        hs = [h for h in ev if (h.get("eval_images", n_full) < n_full) == part]
        if hs:
            n = hs[0].get("eval_images")
            ax.plot([h["epoch"] for h in hs], [100 * h["eval_acc"] for h in hs], "o", color="C1",
                    mfc="none" if part else "C1", label=f"evaluation ({n:,} images)" if n else "evaluation")
    for h in ev[-1:]:
        title += f"\nlast: {100 * h['eval_acc']:.2f}% after {h['elapsed_min']:.1f} min of training"
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def setup_device(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """Device, rank and world size; initialises DDP when launched by torchrun."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local), rank, world
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.device("cpu"), rank, world


def amp_context(cfg: TrainConfig, device: torch.device) -> tuple[Any, torch.dtype | None]:
    mode = ("bf16" if device.type == "cuda" else "off") if cfg.amp == "auto" else cfg.amp
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use bf16 or off on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]
    if dtype is None:
        return contextlib.nullcontext(), None
    return torch.autocast(device.type, dtype=dtype), dtype


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_eval_only(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.eval_only)
    cfg = resolve_config(args, ckpt["config"])
    device, _, _ = setup_device(cfg)
    model = model_from_checkpoint(ckpt).to(device)
    data = load_dataset(cfg.data_dir, cfg.download)
    amp_ctx, _ = amp_context(cfg, device)
    res = evaluate(model, data.test_x.to(device), data.test_y.to(device), cfg.eval_batch_size,
                   amp_ctx, len(data.classes))
    cm = res["confusion"]
    print(f"test accuracy {100 * res['acc']:.2f}%  loss {res['loss']:.4f}  ({cm.sum()} images)")
    for i, name in enumerate(data.classes):
        print(f"  {name:>12s}: {100 * cm[i, i] / max(cm[i].sum(), 1):.1f}%")
    png = resolve_checkpoint_path(args.eval_only).with_name("confusion_matrix.png")
    save_confusion_png(cm, data.classes, png, f"CIFAR-10 test, accuracy {100 * res['acc']:.2f}%")
    print(f"confusion matrix: {png}")


def train(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = load_checkpoint(args.resume) if args.resume else None
    cfg = resolve_config(args, ckpt["config"] if ckpt else None)
    device, rank, world = setup_device(cfg)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    torch.manual_seed(cfg.seed + rank)  # augmentation and dropout differ per process
    is_main = rank == 0

    data = load_dataset(cfg.data_dir, cfg.download)
    num_classes = len(data.classes)
    train_x, train_y, eval_x, eval_y = data.train_x, data.train_y, data.test_x, data.test_y
    if cfg.val_split:
        if not 0 < cfg.val_split < len(train_x):
            raise ValueError(f"--val-split must be in (0, {len(train_x)}), got {cfg.val_split}")
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1234))
        eval_x, eval_y = train_x[perm[:cfg.val_split]], train_y[perm[:cfg.val_split]]
        train_x, train_y = train_x[perm[cfg.val_split:]], train_y[perm[cfg.val_split:]]
    eval_name = "val" if cfg.val_split else "test"
    n_eval = len(eval_x)
    if not 0 <= cfg.eval_subset < n_eval:
        raise ValueError(f"--eval-subset must be in [0, {n_eval}), got {cfg.eval_subset}")
    # evenly spaced indices: every class equally often when the images are sorted by class
    sub = torch.arange(cfg.eval_subset) * n_eval // max(cfg.eval_subset, 1)
    # whole data set on the device once; each process evaluates its own share
    train_x, train_y = train_x.to(device), train_y.to(device)
    sub_x, sub_y = eval_x[sub][rank::world].to(device), eval_y[sub][rank::world].to(device)
    eval_x, eval_y = eval_x[rank::world].to(device), eval_y[rank::world].to(device)

    mcfg = model_config(cfg, num_classes)
    model = VisionTransformer(mcfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, cfg.beta2), fused=True)
    local_bs = cfg.batch_size // world
    steps_per_epoch = len(train_x) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {len(train_x)} training images")
    total_steps = cfg.epochs * steps_per_epoch
    budget_s = cfg.time_budget * 60
    schedule = Schedule(round(cfg.warmup_epochs * steps_per_epoch), total_steps, cfg.min_lr / cfg.lr, budget_s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_ctx, amp_dtype = amp_context(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, step, best_acc, history, run_id = 0, 0, 0.0, [], None
    run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if ckpt:
        load_state_dict_checked(model, ckpt["model"])
        if ema is not None:
            load_state_dict_checked(ema, ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, best_acc = ckpt["epoch"], ckpt["step"], ckpt["best_acc"]
        history, run_id = ckpt["history"], ckpt["wandb_run_id"]
        set_rng_state(ckpt["rng_states"][rank])
        run_dir = resolve_checkpoint_path(args.resume).parent
    run_dir.mkdir(parents=True, exist_ok=True)

    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = ema if ema is not None else model

    n_params = sum(p.numel() for p in model.parameters())
    wb = SafeWandb(cfg, run_dir, run_id) if is_main else None
    if is_main:
        print(f"{'resuming' if ckpt else 'starting'} run {run_dir} on {device} x{world}")
        print(json.dumps(dataclasses.asdict(cfg), indent=None))
        print(f"model: {n_params:,} parameters, {mcfg.num_tokens} tokens, "
              f"{steps_per_epoch} steps/epoch, {len(train_x)} train / {n_eval} {eval_name}"
              + (f" ({cfg.eval_subset} between epochs)" if cfg.eval_subset else ""))

    def checkpoint(epoch: int) -> dict[str, Any]:
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        return {"config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(),
                "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "best_acc": best_acc,
                "history": history, "rng_states": rngs, "wandb_run_id": wb.id if wb else None,
                "classes": list(data.classes), "normalize": {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}}

    stop = StopFlag()
    t_run = time.time() - (history[-1]["elapsed_min"] * 60 if history else 0.0)
    last_epoch = min(cfg.epochs, cfg.stop_at_epoch or cfg.epochs)
    epoch = start_epoch

    def from_rank0(value: float) -> float:  # the same number in every process
        if world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, 0)
        return t.item()

    def elapsed() -> float:  # seconds since the run started
        return from_rank0(time.time() - t_run)

    def full_tokens(epoch: int) -> bool:  # the last phase trains without patch dropout
        if not budget_s:
            return epoch >= cfg.epochs - cfg.full_token_epochs
        if not (cfg.full_token_epochs and cfg.patch_drop):
            return False
        dropped = [h["epoch_time"] for h in history if h.get("patch_drop", cfg.patch_drop) > 0]
        if not dropped:
            return False
        full_epoch_s = statistics.mean(dropped) / (1 - cfg.patch_drop)  # cost grows with the tokens kept
        return bool(from_rank0(budget_s - (time.time() - t_run) <= cfg.full_token_epochs * full_epoch_s))

    if budget_s and elapsed() >= budget_s:
        last_epoch = start_epoch  # a resumed run whose time is spent: nothing left to do
    try:
        # With a time budget the last epoch is the one in which the clock (read every --log-every steps)
        # passes the budget; if that happens during an evaluation, the next epoch stops after one interval.
        for epoch in range(start_epoch, last_epoch):
            model.train()
            model.patch_drop_rate = 0.0 if full_tokens(epoch) else cfg.patch_drop
            # the same permutation in every process, a function of (seed, epoch) alone
            perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            perm = perm[: steps_per_epoch * cfg.batch_size].view(steps_per_epoch, cfg.batch_size)
            perm = perm[:, rank * local_bs:(rank + 1) * local_bs].to(device)
            out_of_time = False
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            t_data = t_step = 0.0
            t_epoch = time.time()
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}" if not budget_s else
                       f"epoch {epoch + 1} ({(budget_s - time.time() + t_run) / 60:.1f} min left)",
                       disable=not is_main, mininterval=1.0 if sys.stderr.isatty() else 30.0,
                       leave=False, dynamic_ncols=True)
            for i in bar:
                t0 = time.perf_counter()
                idx = perm[i]
                x, target = augment(train_x[idx], train_y[idx], cfg, num_classes)
                t1 = time.perf_counter()
                with amp_ctx:
                    logits = train_model(x)
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - cfg.ema)
                step += 1
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == target.argmax(1)).sum()
                t_data += t1 - t0
                t_step += time.perf_counter() - t1
                if (i + 1) % cfg.log_every == 0 or i + 1 == steps_per_epoch:
                    mean_loss = loss_sum.item() / (i + 1)  # one host sync per log interval
                    if budget_s:  # the clock drives the decay, read (and agreed on) once per interval
                        schedule.elapsed_s = elapsed()
                        out_of_time = schedule.elapsed_s >= budget_s
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(
                            f"loss became {mean_loss} at epoch {epoch + 1}, step {step}; stopped without "
                            f"saving, the last good checkpoint is {run_dir / 'last.pt'}. "
                            f"Try a lower --lr or --clip-grad.")
                    if is_main:
                        ips = (i + 1) * cfg.batch_size / (time.time() - t_epoch)
                        acc = correct.item() / ((i + 1) * local_bs)
                        lr = scheduler.get_last_lr()[0]
                        bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * acc:.1f}%", lr=f"{lr:.2e}",
                                        img_s=f"{ips:.0f}", refresh=False)
                        wb.log({"train/loss": mean_loss, "train/acc": acc, "lr": lr, "images_per_sec": ips}, step)
                scheduler.step()  # after the log block, which reads the clock for the time budget
                if stop.requested or out_of_time:
                    break
            if stop.requested:  # mid-epoch: keep only whole epochs, so resuming is exact
                raise KeyboardInterrupt
            bar.close()
            epoch_time = time.time() - t_epoch
            steps_done = i + 1  # fewer than steps_per_epoch when the time budget ran out
            rec = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / steps_done,
                   "train_acc": correct.item() / (steps_done * local_bs), "lr": scheduler.get_last_lr()[0],
                   "epoch_time": epoch_time, "images_per_sec": steps_done * cfg.batch_size / epoch_time,
                   "data_time_frac": t_data / max(t_data + t_step, 1e-9), "patch_drop": model.patch_drop_rate}
            final = epoch + 1 == cfg.epochs or out_of_time
            if final or (epoch + 1) % cfg.eval_every == 0:
                subset = bool(cfg.eval_subset) and not final
                res = evaluate(eval_model, sub_x if subset else eval_x, sub_y if subset else eval_y,
                               cfg.eval_batch_size, amp_ctx, num_classes)
                rec.update(eval_loss=res["loss"], eval_acc=res["acc"],
                           eval_images=cfg.eval_subset if subset else n_eval)
            rec["elapsed_min"] = (time.time() - t_run) / 60
            history.append(rec)
            if is_main:
                line = (f"epoch {epoch + 1:3d}{'' if budget_s else f'/{cfg.epochs}'}  loss {rec['train_loss']:.4f}  "
                        f"train {100 * rec['train_acc']:.2f}%  ")
                if "eval_acc" in rec:
                    line += f"{eval_name} {100 * rec['eval_acc']:.2f}% (loss {rec['eval_loss']:.4f}"
                    line += f", {rec['eval_images']} images)  " if rec["eval_images"] < n_eval else ")  "
                line += (f"lr {rec['lr']:.2e}  {rec['images_per_sec']:.0f} img/s  "
                         f"data {100 * rec['data_time_frac']:.1f}%  {rec['epoch_time']:.0f}s  "
                         f"[{rec['elapsed_min']:.1f} min]")
                tqdm.write(line)
                wb.log({"train/epoch_loss": rec["train_loss"], "train/epoch_acc": rec["train_acc"],
                        "epoch_time": epoch_time, "data_time_frac": rec["data_time_frac"], "epoch": epoch + 1,
                        **({f"{eval_name}/loss": rec["eval_loss"], f"{eval_name}/acc": rec["eval_acc"],
                            f"{eval_name}/images": rec["eval_images"]} if "eval_acc" in rec else {})}, step)
            is_best = rec.get("eval_images") == n_eval and rec["eval_acc"] > best_acc
            if is_best:
                best_acc = rec["eval_acc"]
            state = checkpoint(epoch + 1)
            if is_main:
                atomic_save(state, run_dir / "last.pt")
                if is_best:
                    atomic_save(state, run_dir / "best.pt")
            if out_of_time:
                break
    except KeyboardInterrupt:
        if is_main:
            print(f"interrupted in epoch {epoch + 1}; {run_dir / 'last.pt'} holds every finished epoch, "
                  f"continue with: python train_cifar10.py --resume {run_dir / 'last.pt'}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        stop.restore()
        if wb:
            wb.finish()
    if is_main and history:
        save_curve_png(history, run_dir / "accuracy_curve.png",
                       f"{cfg.model}, {n_params / 1e6:.2f}M params: best {eval_name} {100 * best_acc:.2f}%")
        print(f"done: best {eval_name} accuracy {100 * best_acc:.2f}%, checkpoints in {run_dir}")
    return {"best_acc": best_acc, "history": history, "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.eval_only:
            run_eval_only(args)
        else:
            train(args)
    except (ValueError, FileNotFoundError, DataNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
