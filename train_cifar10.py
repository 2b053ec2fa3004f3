"""Train a Vision Transformer on CIFAR-10 (or any ImageFolder data set).

    python train_cifar10.py --preset cpu --data-dir /tmp/cifar10     # the 2-core CPU recipe
    python train_cifar10.py --preset gpu                              # full recipe, downloads CIFAR-10
    torchrun --nproc_per_node=4 train_cifar10.py --preset gpu         # DDP, one process per GPU
    python train_cifar10.py --resume checkpoints/RUN/last.pt          # continue exactly
    python train_cifar10.py --resume checkpoints/RUN/last.pt --epochs 60   # extend: the decay is re-planned
    python train_cifar10.py --eval-only checkpoints/RUN/best.pt       # accuracy + confusion matrix
    python train_cifar10.py --eval-only checkpoints/RUN/best.pt --export checkpoints/my_model.pt  # + weights, card

Settings come from TrainConfig's defaults, then the --preset, then the flags given; the effective
configuration is printed at start and stored in every checkpoint and in the W&B run. A resumed run
keeps its saved settings; flags given with --resume replace them, except those that change the
model. The learning rate is a pure function of the step and the plan (`lr_at`), so a resumed run
with the same settings continues bit for bit, and one with a new --epochs or --time-budget follows
the schedule a run planned that way from the start would follow.

Reading order: configuration, the schedule (`lr_at`, `TimeBudget`), one training step (`Learner`),
one epoch (`train_epoch`), evaluation, then `train()`, which puts them together.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from checkpoint import (
    atomic_save,
    card_path,
    export_weights,
    input_normalization,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint_path,
    sha256_of,
    top_k,
)
from cnn_model import ResNetCIFAR, ResNetConfig
from data import (
    BUNDLED_SAMPLES,
    Augment,
    DataNotFoundError,
    ImageData,
    TrainBatches,
    image_files,
    load_dataset,
    match_classes,
    normalize,
    read_image,
)
from plots import save_confusion_png, save_curve_png
from vit_model import CIFAR_PRESETS, VisionTransformer, ViTConfig, load_state_dict_checked, model_config

# The ViT presets of vit_model.py, and the small ResNet the `data` study of compare_configs.py sets
# against them (cnn_model.py; ViT-only settings such as the patch size do not apply to it).
MODELS = (*CIFAR_PRESETS, "resnet_cifar")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # model
    model: str = _f("vit_cifar_tiny", f"model, one of {list(MODELS)}; resnet_cifar is the CNN baseline "
                                      "(cnn_model.py), for which the ViT settings below do not apply")
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
    res_schedule: str = _f("", "progressive resolution, 'SIZE:UNTIL,...': train on images downscaled to SIZE x "
                               "SIZE until the fraction UNTIL of the decay is done, then at full size, e.g. "
                               "'16:0.3,24:0.6'; the position embedding is interpolated on the fly (Sec. 3.2) "
                               "('': off)")
    # optimisation
    epochs: int = _f(30, "number of epochs (with --time-budget: the most epochs); with --resume, a new value "
                         "re-plans the cosine decay to end at the new last epoch")
    time_budget: float = _f(0.0, "minutes of training (evaluation included): the cosine decay follows the "
                                 "time spent (read every --log-every steps) instead of the step count and "
                                 "the run stops when it is spent; resuming such a run is not bit-exact; with "
                                 "--resume, a new value re-plans the decay to end at the new budget (0: off)")
    batch_size: int = _f(128, "global batch size (split across DDP processes)")
    optimizer: str = _f("adamw", "'adamw', or 'muon': Muon for the 2D weight matrices of the blocks (qkv, proj, "
                                 "fc1, fc2) and AdamW for the rest (embeddings, norms, biases, head)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    muon_lr: float = _f(0.0, "peak learning rate of Muon, with its update scaled to AdamW's RMS "
                             "(adjust_lr_fn='match_rms_adamw'); it follows the same schedule (0: --lr)")
    muon_momentum: float = _f(0.95, "Muon momentum (Nesterov)")
    min_lr: float = _f(1e-5, "learning rate at the end of the decay")
    decay: str = _f("cosine", "shape of the decay after the warmup: 'cosine' or 'linear' (to min_lr)")
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
    train_fraction: float = _f(1.0, "train on this fraction of the training images (after --val-split), the "
                                    "same fraction of every class, always the same images whatever the seed")
    eval_every: int = _f(1, "evaluate every N epochs (the last epoch is always evaluated)")
    eval_subset: int = _f(0, "evaluate on N evenly spaced evaluation images between epochs and on all of "
                             "them after the last epoch; only full evaluations choose best.pt (0: all)")
    eval_batch_size: int = _f(1000, "evaluation batch size")
    tta_flip: bool = _f(False, "average the logits of each image and its mirror image in the full evaluations "
                               "(those that choose best.pt, and --eval-only), not in the --eval-subset ones "
                               "between epochs (test-time augmentation; twice the cost of a full evaluation)")
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
                optimizer="muon", lr=1e-3, muon_lr=4e-3, warmup_epochs=1.0, weight_decay=0.05, patch_drop=0.6,
                full_token_epochs=1, label_smoothing=0.1, eval_subset=2000, tta_flip=True),
    # Full recipe for one GPU (DeiT-style): strong augmentation, long schedule, EMA.
    "gpu": dict(model="vit_cifar_base", epochs=200, batch_size=512, lr=1e-3, warmup_epochs=10,
                weight_decay=0.05, beta2=0.99, drop_path=0.1, randaug_n=2, randaug_m=9, mixup=0.8,
                cutmix=1.0, erase_prob=0.25, label_smoothing=0.1, ema=0.9998, eval_batch_size=2000,
                compile=True),
}
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="starting point for every setting below")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its last.pt (or run folder)")
    p.add_argument("--eval-only", metavar="CKPT", help="evaluate a checkpoint: accuracy, per-class "
                                                       "accuracy and a confusion-matrix PNG")
    p.add_argument("--export", metavar="PATH", help="with --eval-only: also write the weights for inference in "
                                                   "half precision to PATH and a card PATH.json (sha256, config, "
                                                   "test accuracy, predictions on the bundled sample images)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (or set VIT_DEBUG=1)")
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


def resolve_config(args: argparse.Namespace, ckpt: dict[str, Any] | None = None, check_model: bool = True
                   ) -> TrainConfig:
    """defaults < preset < flags; with a checkpoint, its saved config replaces defaults and preset,
    and (check_model) a flag that changes the model is an error. The result is validated the same
    way in every mode."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if ckpt is None:
        cfg = TrainConfig(**{**(PRESETS[args.preset] if args.preset else {}), **given})
        validate(cfg)
        return cfg
    if args.preset:
        raise ValueError("--preset cannot be combined with --resume or --eval-only: the run keeps its own settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved_cfg = {k: v for k, v in ckpt.get("config", {}).items() if k in known}
    cfg = TrainConfig(**{**saved_cfg, "stop_at_epoch": 0, **given})  # a stop applies to one run only
    validate(cfg)
    if not check_model:
        return cfg
    saved = ckpt["model_config"]
    new = model_config_of(cfg, saved["num_classes"]).to_dict()
    changed = {k: (v, new.get(k)) for k, v in saved.items() if new.get(k) != v}
    if changed:
        raise ValueError(f"the checkpoint was trained with another model config; differences "
                         f"(checkpoint, flags): {changed}")
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every setting in its range, or a ValueError naming the flag, the rule and the value."""
    choices = {"model": MODELS, "optimizer": ("adamw", "muon"), "decay": ("cosine", "linear"),
               "wandb": ("offline", "online", "off"), "device": ("auto", "cpu", "cuda"),
               "amp": ("auto", "bf16", "fp16", "off")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, name)!r}")
    at_least_1 = ("epochs", "batch_size", "eval_every", "eval_batch_size", "log_every", "patch_size",
                  "embed_dim", "depth", "num_heads")
    rules: list[tuple[str, Callable[[Any], bool], str]] = [
        *((n, lambda v: v is None or v >= 1, "at least 1") for n in at_least_1),
        *((n, lambda v: v >= 0, "0 or more") for n in (
            "warmup_epochs", "weight_decay", "clip_grad", "crop_pad", "randaug_n", "mixup", "cutmix",
            "val_split", "eval_subset", "full_token_epochs", "threads", "stop_at_epoch", "min_lr", "muon_lr")),
        ("muon_momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("lr", lambda v: v > 0, "positive"),
        ("mlp_ratio", lambda v: v is None or v > 0, "positive"),
        ("time_budget", lambda v: v >= 0, "0 (off) or a positive number of minutes"),
        ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("ema", lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
        ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
        *((n, lambda v: 0 <= v <= 1, "in [0, 1]") for n in ("mix_prob", "erase_prob")),
        ("randaug_m", lambda v: 0 <= v <= 30, "in [0, 30]"),
        ("train_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ]
    for name, ok, rule in rules:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float, type(None))) and math.isfinite(value or 0) and ok(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if cfg.model == "resnet_cifar":
        vit_only = {"patch_drop": cfg.patch_drop > 0, "res_schedule": bool(cfg.res_schedule),
                    "drop_path": cfg.drop_path > 0, "dropout": cfg.dropout > 0, "optimizer": cfg.optimizer == "muon",
                    **{n: getattr(cfg, n) is not None for n in ("embed_dim", "depth", "num_heads", "mlp_ratio")}}
        if any(vit_only.values()):
            flags = ", ".join("--" + n.replace("_", "-") for n, v in vit_only.items() if v)
            raise ValueError(f"--model resnet_cifar: {flags} apply to ViT models only (Muon: to the blocks' "
                             f"matrices); use the defaults")
        return
    mcfg = model_config_of(cfg, num_classes=10)  # the model settings fit together (e.g. D divisible by heads)
    stages = resolution_stages(cfg.res_schedule)
    sizes, untils = [s for s, _ in stages], [u for _, u in stages]
    if stages and not (all(s % mcfg.patch_size == 0 and 0 < s < mcfg.img_size for s in sizes)
                       and untils == sorted(untils) and 0 < untils[0] and untils[-1] <= 1):
        raise ValueError(f"--res-schedule {cfg.res_schedule!r}: sizes must be multiples of the patch size "
                         f"{mcfg.patch_size} below {mcfg.img_size}, and UNTIL fractions increasing in (0, 1]")


def resolution_stages(text: str) -> list[tuple[int, float]]:
    """'16:0.3,24:0.6' -> [(16, 0.3), (24, 0.6)]."""
    try:
        return [(int(size), float(until)) for size, until in (part.split(":") for part in text.split(",") if part)]
    except ValueError as e:
        raise ValueError(f"--res-schedule must look like '16:0.3,24:0.6' (SIZE:UNTIL,...), got {text!r}") from e


def image_size_at(cfg: TrainConfig, full: int, progress: float) -> int:
    """The training image size at this fraction of the decay (--res-schedule)."""
    return next((size for size, until in resolution_stages(cfg.res_schedule) if progress < until), full)


def model_config_of(cfg: TrainConfig, num_classes: int) -> ViTConfig | ResNetConfig:
    """The model of a training config: its --model preset with the flags that override it."""
    if cfg.model == "resnet_cifar":
        return ResNetConfig(num_classes=num_classes)
    return model_config(cfg.model, num_classes=num_classes, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                        classifier=cfg.classifier, pos_embed=cfg.pos_embed, drop_rate=cfg.dropout,
                        drop_path_rate=cfg.drop_path, patch_drop_rate=cfg.patch_drop,
                        dynamic_img_size=bool(cfg.res_schedule))


# --------------------------------------------------------------------------------------------
# The schedule: learning rate per step, and the rules of a time budget
# --------------------------------------------------------------------------------------------

def lr_at(step: int, progress: float, warmup_steps: int, lr: float, min_lr: float, decay: str = "cosine"
          ) -> float:
    """The learning rate of a step (nanoGPT's get_lr): linear warmup over the first warmup_steps
    steps, then a cosine (or linear) decay from lr to min_lr as progress, the fraction of the decay
    done (by steps or by time, see TimeBudget.progress), goes from 0 to 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(max(progress, 0.0), 1.0)
    return min_lr + (lr - min_lr) * (1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t)))


class TimeBudget:
    """The clock of a run and the rules that depend on it, planned in steps or in time.

    In steps (no --time-budget): the decay progress is the fraction of the post-warmup steps done,
    of `epochs` epochs, and the last `full_token_epochs` epochs train without patch dropout.
    In time (--time-budget M):
    - progress is the fraction of the post-warmup time spent; the clock is read once per log
      interval (`read`), so the cosine reaches min_lr when the time runs out;
    - `spent`: the clock has passed the budget. The epoch in which that happens is the last one,
      stopped at that log interval and evaluated on all images;
    - full_tokens: patch dropout stops once the time left is about `full_token_epochs` epochs at the
      full-token cost (mean epoch time with dropout / (1 - patch_drop), the cost being linear in the
      tokens kept).
    Elapsed time carries over a resume, and every DDP process uses rank 0's clock, so all of them
    take the same decisions. `clock` is injectable for tests.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, elapsed_s: float = 0.0,
                 warmup_end_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.budget_s = cfg.time_budget * 60
        self.warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        self.total_steps = cfg.epochs * steps_per_epoch
        self.epochs, self.full_token_epochs, self.patch_drop = cfg.epochs, cfg.full_token_epochs, cfg.patch_drop
        self.clock = clock
        self.start = clock() - elapsed_s
        self.elapsed_s = elapsed_s  # the last reading
        self.warmup_end_s = warmup_end_s  # elapsed time when the warmup ended, in time mode

    def read(self) -> float:
        """Seconds since the run started (resumed runs included), rank 0's reading in every process."""
        value = [self.clock() - self.start]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(value, src=0)
        self.elapsed_s = value[0]
        return self.elapsed_s

    @property
    def spent(self) -> bool:
        return self.budget_s > 0 and self.elapsed_s >= self.budget_s

    def progress(self, step: int) -> float:
        """Fraction of the decay done at this step (0 during the warmup)."""
        if step < self.warmup_steps:
            return 0.0
        if not self.budget_s:
            return (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.warmup_end_s is None:
            self.warmup_end_s = self.elapsed_s
        return (self.elapsed_s - self.warmup_end_s) / max(self.budget_s - self.warmup_end_s, 1e-9)

    def full_tokens(self, epoch: int, history: list[dict[str, Any]]) -> bool:
        """Whether this epoch (0-based) trains without patch dropout."""
        if not self.budget_s:
            return epoch >= self.epochs - self.full_token_epochs
        if not (self.full_token_epochs and self.patch_drop):
            return False
        dropped = [h["epoch_time"] for h in history  # full-size epochs with patch dropout
                   if h.get("patch_drop", self.patch_drop) > 0 and not h.get("downscaled")]
        if not dropped:
            return False
        full_epoch_s = statistics.mean(dropped) / (1 - self.patch_drop)
        return self.budget_s - self.read() <= self.full_token_epochs * full_epoch_s

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_end_s": self.warmup_end_s}


# --------------------------------------------------------------------------------------------
# One training step, one epoch, evaluation
# --------------------------------------------------------------------------------------------

def param_groups(named: list[tuple[str, nn.Parameter]], skip: set[str], weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, LayerNorm weights and the names in skip (pos_embed, cls_token)."""
    decay, no_decay = [], []
    for name, p in named:
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[tuple[torch.optim.Optimizer, float]]:
    """The optimisers, each with its peak learning rate relative to --lr: AdamW for everything, or
    Muon for the blocks' 2D weight matrices and AdamW for the rest."""
    named = list(model.named_parameters())
    muon = [p for n, p in named if cfg.optimizer == "muon" and n.startswith("blocks.") and p.ndim == 2]
    in_muon = {id(p) for p in muon}
    rest = [(n, p) for n, p in named if id(p) not in in_muon]
    adamw = torch.optim.AdamW(param_groups(rest, model.no_weight_decay(), cfg.weight_decay), lr=cfg.lr,
                              betas=(0.9, cfg.beta2), fused=True)
    if not muon:
        return [(adamw, 1.0)]
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"--optimizer muon needs torch.optim.Muon (PyTorch 2.9 or newer), found {torch.__version__}")
    muon_lr = cfg.muon_lr or cfg.lr
    return [(adamw, 1.0), (torch.optim.Muon(muon, lr=muon_lr, weight_decay=cfg.weight_decay,
                                            momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"),
                           muon_lr / cfg.lr)]


@dataclass
class Learner:
    """What a training step changes: the model, its EMA, the optimiser and the fp16 loss scaler.
    `forward` is the model as trained (compiled and/or wrapped in DDP)."""

    model: VisionTransformer | ResNetCIFAR
    forward: nn.Module
    ema: VisionTransformer | ResNetCIFAR | None
    optimizers: list[tuple[torch.optim.Optimizer, float]]  # each with its learning rate relative to --lr
    scaler: torch.amp.GradScaler
    amp_ctx: Any
    cfg: TrainConfig

    @classmethod
    def build(cls, cfg: TrainConfig, mcfg: ViTConfig | ResNetConfig, device: torch.device, world: int) -> Learner:
        model = (ResNetCIFAR(mcfg) if isinstance(mcfg, ResNetConfig) else VisionTransformer(mcfg)).to(device)
        ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
        optimizers = build_optimizers(model, cfg)
        amp_ctx, amp_dtype = amp_context(cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        forward = torch.compile(model) if cfg.compile else model
        if world > 1:
            forward = nn.parallel.DistributedDataParallel(
                forward, device_ids=[device.index] if device.type == "cuda" else None)
        return cls(model, forward, ema, optimizers, scaler, amp_ctx, cfg)

    def step(self, x: Tensor, target: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """One optimiser step on a batch (B, C, H, W) with soft targets (B, K); returns the loss
        and the logits (B, K), both detached."""
        for opt, scale in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * scale
        with self.amp_ctx:
            logits = self.forward(x)  # (B, K)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        self.model.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad > 0:
            for opt, _ in self.optimizers:
                self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        for opt, _ in self.optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - self.cfg.ema)
                for b_ema, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
                    b_ema.copy_(b)  # BatchNorm statistics (the CNN)
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": [opt.state_dict() for opt, _ in self.optimizers], "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        load_state_dict_checked(self.model, ckpt["model"])
        if self.ema is not None:
            load_state_dict_checked(self.ema, ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
        saved = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
        for (opt, _), state in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(ckpt["scaler"])


def train_epoch(learner: Learner, batches: TrainBatches, epoch: int, step: int, budget: TimeBudget,
                stop: StopFlag, log: Callable[[dict[str, float], int], None], show: bool) -> tuple[dict[str, Any], int]:
    """One epoch, or less if the time budget runs out; returns the epoch's record and the step count.
    Loss and accuracy stay on the device and are read once per log interval."""
    cfg, model = learner.cfg, learner.model
    model.train()
    full = model.config.img_size
    size = image_size_at(cfg, full, budget.progress(step))  # progressive resolution: one size per epoch
    dev = batches.x.device
    loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
    t_data = t_step = 0.0
    t_epoch = t_ready = time.perf_counter()
    desc = (f"epoch {epoch + 1} ({(budget.budget_s - budget.elapsed_s) / 60:.1f} min left)" if budget.budget_s
            else f"epoch {epoch + 1}/{cfg.epochs}")
    bar = tqdm(batches.epoch(epoch), total=len(batches), desc=desc, disable=not show, leave=False,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for i, (x, target) in enumerate(bar):
        if size != full:  # (B, C, size, size); the model interpolates its position embedding
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        t0 = time.perf_counter()
        t_data += t0 - t_ready
        loss, logits = learner.step(x, target, lr_at(step, budget.progress(step), budget.warmup_steps, cfg.lr,
                                                      cfg.min_lr, cfg.decay))
        step += 1
        loss_sum += loss
        correct += (logits.argmax(1) == target.argmax(1)).sum()
        t_ready = time.perf_counter()
        t_step += t_ready - t0
        if (i + 1) % cfg.log_every == 0 or i + 1 == len(batches):
            mean_loss = loss_sum.item() / (i + 1)  # one host sync per log interval
            if budget.budget_s:
                budget.read()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at epoch {epoch + 1}, step {step}; stopped "
                                         f"without saving. Try a lower --lr or --clip-grad.")
            ips = (i + 1) * cfg.batch_size / (time.perf_counter() - t_epoch)
            acc = correct.item() / ((i + 1) * len(x))
            lr = learner.optimizers[0][0].param_groups[0]["lr"]
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * acc:.1f}%", lr=f"{lr:.2e}", img_s=f"{ips:.0f}",
                            refresh=False)
            log({"train/loss": mean_loss, "train/acc": acc, "lr": lr, "images_per_sec": ips}, step)
        if stop.requested or budget.spent:
            break
    bar.close()
    if stop.requested:  # mid-epoch: keep only whole epochs, so resuming is exact
        raise KeyboardInterrupt
    epoch_time = time.perf_counter() - t_epoch
    steps_done = i + 1  # fewer than len(batches) when the time budget ran out
    return {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / steps_done,
            "train_acc": correct.item() / (steps_done * len(x)),
            "lr": lr_at(step, budget.progress(step), budget.warmup_steps, cfg.lr, cfg.min_lr, cfg.decay),
            "epoch_time": epoch_time, "images_per_sec": steps_done * cfg.batch_size / epoch_time,
            "data_time_frac": t_data / max(t_data + t_step, 1e-9), "patch_drop": getattr(model, "patch_drop_rate", 0.0),
            **({"downscaled": size} if size != full else {})}, step


@torch.inference_mode()
def evaluate(model: nn.Module, x_all: Tensor, y_all: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
             batch_size: int, amp_ctx: Any = None, tta_flip: bool = False) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix (rows: true class) of uint8 images (N, C, H, W) with
    labels (N,), summed over the DDP processes (each holds its own share). With tta_flip the logits
    are the mean of the image's and its mirror image's."""
    model.eval()
    K = model.num_classes
    loss_sum = torch.zeros((), device=x_all.device)
    confusion = torch.zeros(K, K, dtype=torch.long, device=x_all.device)
    for i in range(0, len(x_all), batch_size):
        x, y = normalize(x_all[i:i + batch_size], mean, std), y_all[i:i + batch_size]
        with amp_ctx or contextlib.nullcontext():
            logits = model(x).float()  # (b, K)
            if tta_flip:
                logits = (logits + model(x.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        confusion += torch.bincount(y * K + logits.argmax(1), minlength=K * K).view(K, K)
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    n = confusion.sum().clamp(min=1)
    return {"loss": (loss_sum / n).item(), "acc": (confusion.diag().sum() / n).item(), "confusion": confusion.cpu()}


# --------------------------------------------------------------------------------------------
# Logging, interruption, devices
# --------------------------------------------------------------------------------------------

class SafeWandb:
    """W&B logging that never kills training: any failure becomes one warning."""

    def __init__(self, cfg: TrainConfig | None, run_dir: Path, run_id: str | None) -> None:
        """cfg None: off (DDP processes other than rank 0)."""
        self.run = None
        if cfg is None or cfg.wandb == "off":
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
    """First Ctrl-C (or SIGTERM): finish the current step and exit, keeping the finished epochs.
    Second Ctrl-C: exit now."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: stopping after this step; last.pt keeps every finished epoch and the "
              "current one will be redone on --resume (Ctrl-C again to abort at once)", file=sys.stderr)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


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


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every process's random number generator state, in rank order (for an exact resume)."""
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_data(cfg: TrainConfig, ckpt: dict[str, Any] | None, with_train: bool = True,
              loaded: ImageData | None = None) -> ImageData:
    """The data set of --data-dir (or the one already loaded); with a checkpoint, labelled by the
    checkpoint's class list (matched by name), and refused if its classes are not the checkpoint's."""
    data = loaded or load_dataset(cfg.data_dir, cfg.download, with_train=with_train)
    if ckpt is None:
        return data
    if ckpt.get("classes"):
        data = match_classes(data, ckpt["classes"])
    if len(data.classes) != ckpt["model_config"]["num_classes"]:
        raise DataNotFoundError(f"the data has {len(data.classes)} classes {list(data.classes)}, the checkpoint's "
                                f"model {ckpt['model_config']['num_classes']}")
    return data


def run_eval_only(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.eval_only)
    cfg = resolve_config(args, ckpt, check_model=False)
    device, _, _ = setup_device(cfg)
    model = model_from_checkpoint(ckpt).to(device)
    data = load_data(cfg, ckpt, with_train=False)
    amp_ctx, _ = amp_context(cfg, device)
    res = evaluate(model, data.test_x.to(device), data.test_y.to(device), *input_normalization(ckpt),
                   cfg.eval_batch_size, amp_ctx, cfg.tta_flip)
    cm = res["confusion"]
    print(f"test accuracy {100 * res['acc']:.2f}%  loss {res['loss']:.4f}  ({cm.sum()} images)")
    for i, name in enumerate(data.classes):
        print(f"  {name:>12s}: {100 * cm[i, i] / max(cm[i].sum(), 1):.1f}%")
    png = resolve_checkpoint_path(args.eval_only).with_name("confusion_matrix.png")
    check_writable(png.parent)
    save_confusion_png(cm, data.classes, png, f"test set, accuracy {100 * res['acc']:.2f}%")
    print(f"confusion matrix: {png}")
    if args.export:
        export(ckpt, Path(args.export), cfg, data, device)


def _flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def config_command(config: dict[str, Any]) -> str:
    """The shortest `python train_cifar10.py ...` that reproduces a training config (a preset plus
    the flags that differ from it); where the data and outputs go is left out."""
    skip = {"data_dir", "download", "out_dir", "run_name", "wandb", "wandb_project", "device", "threads"}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    best = None
    for preset in (None, *PRESETS):
        base = dataclasses.asdict(TrainConfig(**(PRESETS[preset] if preset else {})))
        flags = [_flag(k, v) for k, v in config.items() if k in known and k not in skip and v != base[k]]
        cmd = " ".join(["python train_cifar10.py"] + ([f"--preset {preset}"] if preset else []) + flags)
        best = cmd if best is None or len(cmd) < len(best) else best
    return best


def export(ckpt: dict[str, Any], path: Path, cfg: TrainConfig, data: ImageData, device: torch.device) -> None:
    """--export: the half-precision weights file, evaluated again as written, and its card."""
    check_writable(path.parent)
    export_weights(ckpt, path)
    shipped = load_checkpoint(path)
    mean, std = input_normalization(shipped)
    x, y = data.test_x.to(device), data.test_y.to(device)
    acc_fp32 = evaluate(model_from_checkpoint(ckpt).to(device), x, y, mean, std, cfg.eval_batch_size)["acc"]
    model = model_from_checkpoint(shipped).to(device)
    plain = evaluate(model, x, y, mean, std, cfg.eval_batch_size)["acc"]
    flip = evaluate(model, x, y, mean, std, cfg.eval_batch_size, tta_flip=True)["acc"]
    samples = []
    files = image_files(BUNDLED_SAMPLES) if BUNDLED_SAMPLES.is_dir() else []
    if files:
        images = torch.stack([read_image(f, model.config.img_size) for f in files])
        for f, top in zip(files, top_k(model.cpu(), images, mean, std, list(data.classes)), strict=True):
            samples.append({"file": f"{BUNDLED_SAMPLES.parent.name}/{BUNDLED_SAMPLES.name}/{f.name}",
                            "label": f.name.split("_")[0], "top3": [[c, round(p, 4)] for c, p in top]})
    card = {
        "file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size, "dtype": "float16",
        "parameters": sum(v.numel() for v in shipped["model"].values()), "model_config": shipped["model_config"],
        "classes": list(data.classes), "normalize": shipped["normalize"],
        "command": config_command(ckpt.get("config", {})), "epochs": ckpt.get("epoch"),
        "data": f"CIFAR-10 ({'JPEG copy, ' if (Path(cfg.data_dir) / 'test').is_dir() else ''}"
                f"{len(data.test_y):,} test images)",
        "test_accuracy": {"checkpoint_fp32": round(100 * acc_fp32, 2), "shipped_fp16": round(100 * plain, 2),
                          "shipped_fp16_flip_tta": round(100 * flip, 2)},
        "samples": samples, "date": time.strftime("%Y-%m-%d"),
    }
    card_path(path).write_text(json.dumps(card, indent=1) + "\n")
    print(f"exported {path} ({card['bytes']:,} bytes, sha256 {card['sha256'][:12]}...): test accuracy "
          f"{card['test_accuracy']['shipped_fp16']:.2f}% in half precision ({100 * acc_fp32:.2f}% in float32), "
          f"{card['test_accuracy']['shipped_fp16_flip_tta']:.2f}% with flip TTA; card {card_path(path)}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    """Evaluation images of this process (uint8, on the device): all of them, and the evenly spaced
    subset used between epochs (--eval-subset; every class equally often when sorted by class)."""

    name: str  # "test" or "val"
    size: int  # images over all processes
    x: Tensor
    y: Tensor
    sub_x: Tensor
    sub_y: Tensor
    subset: int


def split_data(cfg: TrainConfig, data: ImageData, device: torch.device, rank: int, world: int
               ) -> tuple[Tensor, Tensor, EvalSet]:
    """Training images and the evaluation set: the test set, or --val-split images held out of the
    training set (a fixed permutation, the same for every seed); then --train-fraction of each class
    of the rest (another fixed permutation, so a smaller fraction is a subset of a larger one)."""
    train_x, train_y, eval_x, eval_y = data.train_x, data.train_y, data.test_x, data.test_y
    if cfg.val_split:
        if not cfg.val_split < len(train_x):
            raise ValueError(f"--val-split must be in (0, {len(train_x)}), got {cfg.val_split}")
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1234))
        eval_x, eval_y = train_x[perm[:cfg.val_split]], train_y[perm[:cfg.val_split]]
        train_x, train_y = train_x[perm[cfg.val_split:]], train_y[perm[cfg.val_split:]]
    if cfg.train_fraction < 1:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(4321))
        by_class = [order[train_y[order] == c] for c in train_y.unique()]
        keep = torch.cat([idx[:max(1, round(cfg.train_fraction * len(idx)))] for idx in by_class]).sort().values
        train_x, train_y = train_x[keep], train_y[keep]
    n = len(eval_x)
    if not cfg.eval_subset < n:
        raise ValueError(f"--eval-subset must be in [0, {n}), got {cfg.eval_subset}")
    sub = torch.arange(cfg.eval_subset) * n // max(cfg.eval_subset, 1)
    evals = EvalSet("val" if cfg.val_split else "test", n, eval_x[rank::world].to(device),
                    eval_y[rank::world].to(device), eval_x[sub][rank::world].to(device),
                    eval_y[sub][rank::world].to(device), cfg.eval_subset)
    return train_x.to(device), train_y.to(device), evals


def epoch_line(rec: dict[str, Any], evals: EvalSet, budget: TimeBudget, epochs: int) -> str:
    line = f"epoch {rec['epoch']:3d}{'' if budget.budget_s else f'/{epochs}'}  loss {rec['train_loss']:.4f}  "
    line += f"train {100 * rec['train_acc']:.2f}%" + (f" at {rec['downscaled']}px  " if "downscaled" in rec else "  ")
    if "eval_acc" in rec:
        line += f"{evals.name} {100 * rec['eval_acc']:.2f}% (loss {rec['eval_loss']:.4f}"
        line += f", {rec['eval_images']} images)  " if rec["eval_images"] < evals.size else ")  "
    return line + (f"lr {rec['lr']:.2e}  {rec['images_per_sec']:.0f} img/s  data {100 * rec['data_time_frac']:.1f}%  "
                   f"{rec['epoch_time']:.0f}s  [{rec['elapsed_min']:.1f} min]")


def log_epoch(rec: dict[str, Any], evals: EvalSet, budget: TimeBudget, cfg: TrainConfig, wb: SafeWandb) -> None:
    tqdm.write(epoch_line(rec, evals, budget, cfg.epochs))
    wb.log({"train/epoch_loss": rec["train_loss"], "train/epoch_acc": rec["train_acc"], "epoch": rec["epoch"],
            "epoch_time": rec["epoch_time"], "data_time_frac": rec["data_time_frac"],
            **({f"{evals.name}/{k}": rec[f"eval_{k}"] for k in ("loss", "acc", "images")} if "eval_acc" in rec
               else {})}, rec["step"])


@dataclass
class RunState:
    """Where a run stands after its finished epochs; saved in every checkpoint, restored by --resume."""

    epoch: int = 0  # finished epochs
    step: int = 0
    best_acc: float = 0.0  # best accuracy on all evaluation images
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    wandb_run_id: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any] | None) -> RunState:
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)}) if ckpt else cls()


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


def repair_best(run_dir: Path, ckpt: dict[str, Any]) -> None:
    """last.pt is written before best.pt, so a crash between the two can leave last.pt recording a
    new best epoch that best.pt does not hold; last.pt then holds that epoch's weights itself, and
    best.pt is rebuilt from it."""
    best = run_dir / "best.pt"
    hist = ckpt["history"]
    if not (hist and hist[-1].get("eval_acc") == ckpt["best_acc"] and ckpt["best_acc"] > 0):
        return  # the last epoch was not the best: best.pt was not due to change
    held = load_checkpoint(best)["best_acc"] if best.is_file() else None
    if held != ckpt["best_acc"]:
        atomic_save(ckpt, best)
        print(f"repaired {best}: it now holds epoch {ckpt['epoch']} ({100 * ckpt['best_acc']:.2f}%), the best "
              f"epoch recorded in last.pt (its write had been interrupted)", file=sys.stderr)


RESUME_KEYS = ("config", "model_config", "model", "optimizer", "scaler", "epoch", "step", "best_acc", "history",
               "rng_states")


def train(args: argparse.Namespace, data: ImageData | None = None) -> dict[str, Any]:
    """A training run of the parsed flags; `data` skips loading --data-dir (a caller running many
    runs on the same data set, like compare_configs.py)."""
    ckpt = load_checkpoint(args.resume, required=RESUME_KEYS) if args.resume else None
    cfg = resolve_config(args, ckpt)
    device, rank, world = setup_device(cfg)
    torch.manual_seed(cfg.seed + rank)  # augmentation and dropout differ per process
    is_main = rank == 0

    data = load_data(cfg, ckpt, loaded=data)
    mean, std = input_normalization(ckpt) if ckpt else (data.mean, data.std)  # preprocessing travels with weights
    train_x, train_y, evals = split_data(cfg, data, device, rank, world)
    augment = Augment(len(data.classes), mean, std, cfg.crop_pad, cfg.flip, cfg.randaug_n, cfg.randaug_m,
                      cfg.erase_prob, cfg.label_smoothing, cfg.mixup, cfg.cutmix, cfg.mix_prob)
    batches = TrainBatches(train_x, train_y, cfg.batch_size, augment, cfg.seed, rank, world)
    mcfg = model_config_of(cfg, len(data.classes))
    learner = Learner.build(cfg, mcfg, device, world)
    eval_model = learner.ema if learner.ema is not None else learner.model

    run = RunState.from_checkpoint(ckpt)
    run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if ckpt:
        learner.load_state_dict(ckpt)
        set_rng_state(ckpt["rng_states"][rank])
        run_dir = resolve_checkpoint_path(args.resume).parent
    if is_main:
        check_writable(run_dir, ("last.pt", "best.pt"))
        if ckpt:
            repair_best(run_dir, ckpt)
    budget = TimeBudget(cfg, len(batches), elapsed_s=run.history[-1]["elapsed_min"] * 60 if run.history else 0.0,
                        warmup_end_s=(ckpt or {}).get("time_budget", {}).get("warmup_end_s"))
    wb = SafeWandb(cfg if is_main else None, run_dir, run.wandb_run_id)
    run.wandb_run_id = wb.id
    n_params = sum(p.numel() for p in learner.model.parameters())
    if is_main:
        print(f"{'resuming' if ckpt else 'starting'} run {run_dir} on {device} x{world}, after {run.epoch} epochs\n"
              f"{json.dumps(dataclasses.asdict(cfg))}\nmodel: {n_params:,} parameters, "
              f"{f'{mcfg.num_tokens} tokens, ' if isinstance(mcfg, ViTConfig) else ''}"
              f"{len(batches)} steps/epoch, {len(train_x)} train / {evals.size} {evals.name}"
              + (f" ({evals.subset} between epochs)" if evals.subset else ""))

    stop = StopFlag()
    last_epoch = min(cfg.epochs, cfg.stop_at_epoch or cfg.epochs)
    if budget.budget_s and budget.read() >= budget.budget_s:
        last_epoch = run.epoch  # a resumed run whose time is spent: nothing left to do
    try:
        for epoch in range(run.epoch, last_epoch):
            if isinstance(learner.model, VisionTransformer):
                learner.model.patch_drop_rate = 0.0 if budget.full_tokens(epoch, run.history) else cfg.patch_drop
            rec, run.step = train_epoch(learner, batches, epoch, run.step, budget, stop, wb.log, is_main)
            final = epoch + 1 == cfg.epochs or budget.spent  # the last epoch is evaluated on all images
            if final or (epoch + 1) % cfg.eval_every == 0:
                sub = bool(evals.subset) and not final
                res = evaluate(eval_model, evals.sub_x if sub else evals.x, evals.sub_y if sub else evals.y,
                               mean, std, cfg.eval_batch_size, learner.amp_ctx, cfg.tta_flip and not sub)
                rec.update(eval_loss=res["loss"], eval_acc=res["acc"], eval_images=evals.subset if sub else evals.size)
            rec["elapsed_min"] = budget.read() / 60
            run.history.append(rec)
            run.epoch = epoch + 1
            is_best = rec.get("eval_images") == evals.size and rec["eval_acc"] > run.best_acc
            run.best_acc = rec["eval_acc"] if is_best else run.best_acc
            state = {"config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(), **learner.state_dict(),
                     **dataclasses.asdict(run), "rng_states": gather_rng_states(world),
                     "time_budget": budget.state_dict(), "classes": list(data.classes),
                     "normalize": {"mean": list(mean), "std": list(std)}}
            if is_main:
                log_epoch(rec, evals, budget, cfg, wb)
                atomic_save(state, run_dir / "last.pt")
                if is_best:
                    atomic_save(state, run_dir / "best.pt")
            if budget.spent:
                break
    except KeyboardInterrupt:
        if is_main:
            print(f"interrupted; {run_dir / 'last.pt'} holds the {run.epoch} finished epochs, continue with: "
                  f"python train_cifar10.py --resume {run_dir / 'last.pt'}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        stop.restore()
        wb.finish()
    if is_main and run.history:
        save_curve_png(run.history, run_dir / "accuracy_curve.png",
                       f"{cfg.model}, {n_params / 1e6:.2f}M params: best {evals.name} {100 * run.best_acc:.2f}%")
        print(f"done: best {evals.name} accuracy {100 * run.best_acc:.2f}%"
              f"{' (each image averaged with its mirror image)' if cfg.tta_flip else ''}, checkpoints in {run_dir}")
    return {"best_acc": run.best_acc, "history": run.history, "run_dir": str(run_dir)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.export and not args.eval_only:
            raise ValueError("--export needs --eval-only CKPT: it exports the checkpoint it evaluates")
        if args.eval_only:
            run_eval_only(args)
        else:
            train(args)
    except (ValueError, FileNotFoundError, DataNotFoundError, FloatingPointError) as e:
        if args.debug or os.environ.get("VIT_DEBUG"):
            raise
        msg = " ".join(str(e).split())  # one line; --debug for the traceback
        if isinstance(e, DataNotFoundError) and msg.startswith("no CIFAR-10 found"):
            msg += (" Meanwhile `python visualize_attention.py` needs no data: it draws the figures with the "
                    "model shipped in checkpoints/ and the sample photos in assets/samples.")
        print("error: " + msg, file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
