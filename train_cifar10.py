"""Train a Vision Transformer on CIFAR-10 (or any ImageFolder data set).

    python train_cifar10.py --preset cpu --data-dir data   # the 2-core CPU recipe
    python train_cifar10.py --preset gpu                  # full recipe, downloads CIFAR-10
    torchrun --nproc_per_node=4 train_cifar10.py --preset gpu   # DDP, one process per GPU
    python train_cifar10.py --resume checkpoints/RUN/last.pt    # continue exactly
    python train_cifar10.py --resume checkpoints/RUN/last.pt --epochs 60   # re-planned decay
    python train_cifar10.py --eval-only checkpoints/RUN/best.pt # accuracy + confusion matrix
    python train_cifar10.py --eval-only checkpoints/RUN/best.pt --export checkpoints/my_model.pt

Settings come from TrainConfig's defaults (config.py), then the --preset, then the flags given;
the effective configuration is printed at start and stored in every checkpoint and in the W&B run.
A resumed run keeps its saved settings; flags given with --resume replace them, except those that
change the model. The learning rate is a pure function of the step and the plan (`lr_at`), so a
resumed run with the same settings continues bit for bit, and one with a new --epochs or
--time-budget follows the schedule a run planned that way from the start would follow.

From Python: `train(cfg)` with a config.TrainConfig, e.g. `train(config.preset("cpu"))`.
Reading order: the schedule (`lr_at`, `Schedule`), one training step (`Learner`), one epoch
(`train_epoch`), evaluation, then `train()`, which puts them together.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import checkpoint
import experiments
from checkpoint import (
    RESUME_KEYS,
    RunState,
    check_writable,
    input_normalization,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint_path,
)
from config import (
    TrainConfig,
    build_model,
    build_parser,
    check_same_model,
    config_command,
    config_from_args,
    model_config_of,
    resolution_stages,
    validate,
)
from data import (
    BUNDLED_SAMPLES,
    Augment,
    DataNotFoundError,
    EvalSet,
    ImageData,
    TrainBatches,
    evenly_spaced,
    image_files,
    load_dataset,
    match_classes,
    normalize,
    read_image,
    select_classes,
    split_data,
)
from inference import top_k
from plots import save_confusion_png, save_curve_png
from runtime import SafeWandb, StopFlag, amp_context, run_cli, setup_device
from vit_model import load_state_dict_checked

# --------------------------------------------------------------------------------------------
# The schedule: the learning rate of a step, and when the run stops
# --------------------------------------------------------------------------------------------


def lr_at(step: int, progress: float, warmup_steps: int, lr: float, min_lr: float,
          decay: str = "cosine") -> float:
    """The learning rate of a step (nanoGPT's get_lr): linear warmup over the first warmup_steps
    steps, then a cosine (or linear) decay from lr to min_lr as progress, the fraction of the
    decay done (by steps or by time, see Schedule.progress), goes from 0 to 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(max(progress, 0.0), 1.0)
    shape = 1.0 - t if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return min_lr + (lr - min_lr) * shape


class Schedule:
    """The plan of a run: the learning rate of each step, the image size of each epoch, which
    steps train with all tokens, and which epoch is the last.

    By steps (no --time-budget): the decay progress is the fraction of the post-warmup steps of
    `epochs` epochs done; the last `full_token_epochs` epochs train without patch dropout.
    By time (--time-budget M): the decay progress is the fraction of the post-warmup time spent,
    the clock being read once per log interval (`read`), so the decay reaches min_lr when the
    time runs out; the epoch in which the clock passes the budget is the last one, stopped at
    that log interval and evaluated on all images (`spent`); patch dropout stops once the time
    left is about `full_token_epochs` epochs at the full-token cost (mean epoch time with dropout
    / (1 - patch_drop), the cost being linear in the tokens kept).
    Fractions of the run (--warmup-frac, --full-token-frac) replace the epoch counts: the same
    share of every run's steps, or of its time (the clock then read before every step, so that
    a slow step cannot overshoot a share or the budget by a log interval), whatever a step
    costs. With --clock train, evaluation and saving (`paused`) do not count. A resumed run keeps
    the warmup it has done, even when a new --epochs or --time-budget re-plans the rest.
    Elapsed time carries over a resume, and every DDP process uses rank 0's clock, so all of them
    take the same decisions. `clock` is injectable for tests.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, elapsed_s: float = 0.0,
                 warmup_end_s: float | None = None, clock: Callable[[], float] = time.time,
                 wall_s: float | None = None, warmup_steps: int | None = None) -> None:
        self.cfg = cfg
        self.budget_s = cfg.time_budget * 60
        self.total_steps = cfg.epochs * steps_per_epoch
        self.warmup_steps = (round(cfg.warmup_frac * self.total_steps) if cfg.warmup_frac
                             else round(cfg.warmup_epochs * steps_per_epoch))
        if self.budget_s and cfg.warmup_frac:
            self.warmup_steps = 0  # by time: see lr()
        elif cfg.warmup_frac and warmup_steps is not None:
            self.warmup_steps = warmup_steps  # resumed: the warmup as planned at the start
        self.clock = clock
        self.start = clock() - elapsed_s
        self.wall_start = clock() - (elapsed_s if wall_s is None else wall_s)
        self.elapsed_s = elapsed_s  # the last reading
        self.warmup_end_s = warmup_end_s  # by time: the first reading after the warmup

    def read(self, step: int) -> float:
        """Seconds since the run started (resumed runs included), rank 0's reading in every
        process; the first reading at or after the end of the warmup starts the timed decay."""
        value = [self.clock() - self.start]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(value, src=0)
        self.elapsed_s = value[0]
        if self.budget_s and self.warmup_end_s is None and step >= self.warmup_steps and (
                not self.cfg.warmup_frac or self.elapsed_s >= self.cfg.warmup_frac * self.budget_s):
            self.warmup_end_s = self.elapsed_s
        return self.elapsed_s

    @property
    def wall_s(self) -> float:
        """Seconds since the run started, everything included (this process's clock)."""
        return self.clock() - self.wall_start

    @contextlib.contextmanager
    def paused(self) -> Iterator[dict[str, float]]:
        """Time a piece of work outside training (evaluation, saving): yields a dict whose
        "seconds" it fills; with --clock train, the work does not count against the budget."""
        took = {"seconds": 0.0}
        t0 = self.clock()
        try:
            yield took
        finally:
            took["seconds"] = self.clock() - t0
            if self.cfg.clock == "train":
                self.start += took["seconds"]

    @property
    def spent(self) -> bool:
        return self.budget_s > 0 and self.elapsed_s >= self.budget_s

    def fraction(self, step: int) -> float:
        """The fraction of the run done at this step: of its steps, or of its time budget (as
        of the last reading)."""
        if self.budget_s:
            return self.elapsed_s / self.budget_s
        return step / max(1, self.total_steps)

    @property
    def reads_every_step(self) -> bool:
        """By time, shares of the run (or the training clock) read the clock before every step."""
        cfg = self.cfg
        return bool(self.budget_s and (cfg.warmup_frac or cfg.full_token_frac
                                       or cfg.mix_off_frac or cfg.clock == "train"))

    def progress(self, step: int) -> float:
        """Fraction of the decay done at this step (0 during the warmup)."""
        if step < self.warmup_steps:
            return 0.0
        if not self.budget_s:
            return (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.warmup_end_s is None:
            return 0.0
        return (self.elapsed_s - self.warmup_end_s) / max(self.budget_s - self.warmup_end_s, 1e-9)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        if self.budget_s and cfg.warmup_frac and self.warmup_end_s is None:
            return cfg.lr * self.fraction(step) / cfg.warmup_frac  # linear warmup by time
        return lr_at(step, self.progress(step), self.warmup_steps, cfg.lr, cfg.min_lr, cfg.decay)

    def image_size(self, step: int, full: int) -> int:
        """The training image size at this step (--res-schedule; one size per epoch)."""
        stages = resolution_stages(self.cfg.res_schedule)
        return next((size for size, until in stages if self.progress(step) < until), full)

    def in_last(self, step: int, frac: float) -> bool:
        """Whether this step is in the last `frac` of the run: of its time (as of the last
        reading), or of its steps (counted in whole steps, as the warmup is)."""
        if self.budget_s:
            return self.elapsed_s >= (1 - frac) * self.budget_s
        return step >= self.total_steps - round(frac * self.total_steps)

    def full_tokens_at(self, step: int) -> bool:
        """--full-token-frac: whether this step trains without patch dropout."""
        return self.in_last(step, self.cfg.full_token_frac)

    def mixes_at(self, step: int) -> bool:
        """--mix-off-frac: whether this step's batch may be mixed (mixup / cutmix)."""
        return not self.in_last(step, self.cfg.mix_off_frac)

    def full_tokens(self, epoch: int, step: int, history: list[dict[str, Any]]) -> bool:
        """--full-token-epochs: whether this epoch (0-based) trains without patch dropout; by
        time, it reads the clock."""
        cfg = self.cfg
        if not self.budget_s:
            return epoch >= cfg.epochs - cfg.full_token_epochs
        if not (cfg.full_token_epochs and cfg.patch_drop):
            return False
        dropped = [h["epoch_time"] for h in history  # full-size epochs with patch dropout
                   if h.get("patch_drop", cfg.patch_drop) > 0 and not h.get("downscaled")]
        if not dropped:
            return False
        full_epoch_s = statistics.mean(dropped) / (1 - cfg.patch_drop)
        return self.budget_s - self.read(step) <= cfg.full_token_epochs * full_epoch_s

    def remaining_epochs(self, done: int, step: int) -> range:
        """The epochs (0-based) this run trains: from `done` to --epochs (or --stop-at-epoch);
        none when a resumed run's time is already spent (by time, it reads the clock)."""
        last = min(self.cfg.epochs, self.cfg.stop_at_epoch or self.cfg.epochs)
        if self.budget_s and self.read(step) >= self.budget_s:
            last = done
        return range(done, last)

    def is_last(self, epoch: int) -> bool:
        """The run's last epoch, which is evaluated on all images."""
        return epoch + 1 == self.cfg.epochs or self.spent

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_end_s": self.warmup_end_s, "warmup_steps": self.warmup_steps}


# --------------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------------

def param_groups(named: list[tuple[str, nn.Parameter]], skip: set[str], weight_decay: float
                 ) -> list[dict[str, Any]]:
    """No weight decay on biases, LayerNorm weights and the names in skip (pos_embed,
    cls_token)."""
    decay, no_decay = [], []
    for name, p in named:
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizers(model: nn.Module, cfg: TrainConfig
                     ) -> list[tuple[torch.optim.Optimizer, float]]:
    """The optimisers, each with its peak learning rate relative to --lr: AdamW for everything,
    or Muon for the blocks' 2D weight matrices and AdamW for the rest."""
    named = list(model.named_parameters())
    if cfg.optimizer == "sgd":  # the paper's fine-tuning (Appendix B.1.1)
        groups = param_groups(named, model.no_weight_decay(), cfg.weight_decay)
        return [(torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum), 1.0)]
    muon = [p for n, p in named
            if cfg.optimizer == "muon" and n.startswith("blocks.") and p.ndim == 2]
    in_muon = {id(p) for p in muon}
    rest = [(n, p) for n, p in named if id(p) not in in_muon]
    adamw = torch.optim.AdamW(param_groups(rest, model.no_weight_decay(), cfg.weight_decay),
                              lr=cfg.lr, betas=(0.9, cfg.beta2), fused=True)
    if not muon:
        return [(adamw, 1.0)]
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"--optimizer muon needs torch.optim.Muon (PyTorch 2.9 or newer), found "
                         f"{torch.__version__}")
    muon_lr = cfg.muon_lr or cfg.lr
    return [(adamw, 1.0), (torch.optim.Muon(muon, lr=muon_lr, weight_decay=cfg.weight_decay,
                                            momentum=cfg.muon_momentum,
                                            adjust_lr_fn="match_rms_adamw"), muon_lr / cfg.lr)]


@dataclass
class Learner:
    """What a training step changes: the model, its EMA, the optimisers and the fp16 loss scaler.
    `forward` is the model as trained (compiled and/or wrapped in DDP)."""

    model: nn.Module
    forward: nn.Module
    ema: nn.Module | None
    optimizers: list[tuple[torch.optim.Optimizer, float]]  # each with its lr relative to --lr
    scaler: torch.amp.GradScaler
    amp_ctx: Any
    cfg: TrainConfig

    @classmethod
    def build(cls, cfg: TrainConfig, model: nn.Module, device: torch.device, world: int
              ) -> Learner:
        model = model.to(device)
        ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
        optimizers = build_optimizers(model, cfg)
        amp_ctx, amp_dtype = amp_context(cfg.amp, device)
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
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()),
                                     1 - self.cfg.ema)
                for b_ema, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
                    b_ema.copy_(b)  # BatchNorm statistics (the CNN)
        return loss.detach(), logits.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": [opt.state_dict() for opt, _ in self.optimizers],
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        load_state_dict_checked(self.model, ckpt["model"])
        if self.ema is not None:
            load_state_dict_checked(self.ema, ckpt["model"] if ckpt.get("ema") is None
                                    else ckpt["ema"])
        saved = ckpt["optimizer"] if isinstance(ckpt["optimizer"], list) else [ckpt["optimizer"]]
        for (opt, _), state in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(state)
        self.scaler.load_state_dict(ckpt["scaler"])


# --------------------------------------------------------------------------------------------
# One epoch, and evaluation
# --------------------------------------------------------------------------------------------

def train_epoch(learner: Learner, batches: TrainBatches, schedule: Schedule, epoch: int,
                step: int, stop: StopFlag, log: Callable[[dict[str, float], int], None],
                show: bool) -> tuple[dict[str, Any], int]:
    """One epoch, or less if the time budget runs out; returns the epoch's record and the step
    count. Loss and accuracy stay on the device and are read once per log interval."""
    cfg, model = learner.cfg, learner.model
    model.train()
    full = model.config.img_size
    size = schedule.image_size(step, full)  # progressive resolution
    dev = batches.x.device
    loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
    t_data = t_step = 0.0
    phase = {"drop_time": 0.0, "drop_images": 0, "full_time": 0.0, "full_images": 0}
    t_epoch = t_ready = time.perf_counter()
    left = (schedule.budget_s - schedule.elapsed_s) / 60
    desc = (f"epoch {epoch + 1} ({left:.1f} min left)" if schedule.budget_s
            else f"epoch {epoch + 1}/{cfg.epochs}")
    # --mix-off-frac: the generator augments a batch when the loop asks for it, so whether this
    # step's batch is mixed is decided before it is drawn (the clock then read after each step)
    read_after_step = cfg.mix_off_frac > 0 and schedule.reads_every_step
    if cfg.mix_off_frac:
        if read_after_step:
            schedule.read(step)
        batches.augment.mixing = schedule.mixes_at(step)
    bar = tqdm(batches.epoch(epoch), total=len(batches), desc=desc, disable=not show, leave=False,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    for i, (x, target) in enumerate(bar):
        if size != x.shape[-1]:  # (B, C, size, size): --img-size, or --res-schedule (the model
            x = resize(x, size)  # then interpolates its position embedding)
        t0 = time.perf_counter()
        t_data += t0 - t_ready
        if schedule.reads_every_step and not read_after_step:
            schedule.read(step)
        if cfg.full_token_frac and cfg.patch_drop:  # a ViT setting (config.VIT_ONLY)
            model.patch_drop_rate = 0.0 if schedule.full_tokens_at(step) else cfg.patch_drop
        dropping = getattr(model, "patch_drop_rate", 0.0) > 0
        loss, logits = learner.step(x, target, schedule.lr(step))
        step += 1
        if read_after_step:
            schedule.read(step)  # the next step's reading, before its batch is drawn
        if cfg.mix_off_frac:
            batches.augment.mixing = schedule.mixes_at(step)
        loss_sum += loss
        correct += (logits.argmax(1) == target.argmax(1)).sum()
        t_last, t_ready = t_ready, time.perf_counter()
        t_step += t_ready - t0
        kind = "drop" if dropping else "full"  # each step's time, its data included
        phase[f"{kind}_time"] += t_ready - t_last
        phase[f"{kind}_images"] += len(x) * (dist.get_world_size() if dist.is_initialized() else 1)
        if (i + 1) % cfg.log_every == 0 or i + 1 == len(batches):
            mean_loss = loss_sum.item() / (i + 1)  # one host sync per log interval
            if schedule.budget_s:
                schedule.read(step)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at epoch {epoch + 1}, step "
                                         f"{step}; stopped without saving. Try a lower --lr or "
                                         f"--clip-grad.")
            ips = (i + 1) * cfg.batch_size / (time.perf_counter() - t_epoch)
            acc = correct.item() / ((i + 1) * len(x))
            lr = learner.optimizers[0][0].param_groups[0]["lr"]
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * acc:.1f}%", lr=f"{lr:.2e}",
                            img_s=f"{ips:.0f}", refresh=False)
            log({"train/loss": mean_loss, "train/acc": acc, "lr": lr, "images_per_sec": ips},
                step)
        if stop.requested or schedule.spent:
            break
    bar.close()
    if stop.requested:  # mid-epoch: keep only whole epochs, so resuming is exact
        raise KeyboardInterrupt
    epoch_time = time.perf_counter() - t_epoch
    steps_done = i + 1  # fewer than len(batches) when the time budget ran out
    return {"epoch": epoch + 1, "step": step, "train_loss": loss_sum.item() / steps_done,
            "train_acc": correct.item() / (steps_done * len(x)), "lr": schedule.lr(step),
            "epoch_time": epoch_time, "images_per_sec": steps_done * cfg.batch_size / epoch_time,
            "data_time_frac": t_data / max(t_data + t_step, 1e-9),
            "patch_drop": getattr(model, "patch_drop_rate", 0.0), **phase,
            **({"downscaled": size} if size != full else {})}, step


def resize(x: Tensor, size: int) -> Tensor:
    """Images (B, C, H, W) at size x size: bilinear, antialiased when shrinking."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=size < x.shape[-1],
                         align_corners=False)


@torch.inference_mode()
def evaluate(model: nn.Module, x_all: Tensor, y_all: Tensor, mean: tuple[float, ...],
             std: tuple[float, ...], batch_size: int, amp_ctx: Any = None,
             tta_flip: bool = False) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix (rows: true class) of uint8 images (N, C, H, W) with
    labels (N,), summed over the DDP processes (each holds its own share), and the predicted
    class of each image (N,) of this process. With tta_flip the logits are the mean of the
    image's and its mirror image's."""
    model.eval()
    K = model.num_classes
    loss_sum = torch.zeros((), device=x_all.device)
    confusion = torch.zeros(K, K, dtype=torch.long, device=x_all.device)
    preds = []
    size = model.config.img_size
    for i in range(0, len(x_all), batch_size):
        x, y = normalize(x_all[i:i + batch_size], mean, std), y_all[i:i + batch_size]
        x = x if x.shape[-1] == size else resize(x, size)  # (b, C, size, size)
        with amp_ctx or contextlib.nullcontext():
            logits = model(x).float()  # (b, K)
            if tta_flip:
                logits = (logits + model(x.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        preds.append(logits.argmax(1))
        confusion += torch.bincount(y * K + preds[-1], minlength=K * K).view(K, K)
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        dist.all_reduce(confusion)
    n = confusion.sum().clamp(min=1)
    return {"loss": (loss_sum / n).item(), "acc": (confusion.diag().sum() / n).item(),
            "confusion": confusion.cpu(),
            "pred": torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# Data and logging of a run
# --------------------------------------------------------------------------------------------

def load_data(cfg: TrainConfig, ckpt: dict[str, Any] | None, with_train: bool = True,
              loaded: ImageData | None = None) -> ImageData:
    """The data set of --data-dir (or the one already loaded), only the --classes if given; with a
    checkpoint, labelled by the checkpoint's class list (matched by name), and refused if its
    classes are not the checkpoint's."""
    data = loaded or load_dataset(cfg.data_dir, cfg.download, with_train=with_train)
    if cfg.classes:
        data = select_classes(data, cfg.classes.split(","))
    if ckpt is None:
        return data
    if ckpt.get("classes"):
        data = match_classes(data, ckpt["classes"])
    if len(data.classes) != ckpt["model_config"]["num_classes"]:
        raise DataNotFoundError(f"the data has {len(data.classes)} classes {list(data.classes)}, "
                                f"the checkpoint's model {ckpt['model_config']['num_classes']}")
    return data


def log_epoch(rec: dict[str, Any], evals: EvalSet, schedule: Schedule, wb: SafeWandb) -> None:
    line = f"epoch {rec['epoch']:3d}{'' if schedule.budget_s else f'/{schedule.cfg.epochs}'}  "
    line += f"loss {rec['train_loss']:.4f}  train {100 * rec['train_acc']:.2f}%"
    line += f" at {rec['downscaled']}px  " if "downscaled" in rec else "  "
    if "eval_acc" in rec:
        line += f"{evals.name} {100 * rec['eval_acc']:.2f}% (loss {rec['eval_loss']:.4f}"
        line += f", {rec['eval_images']} images)  " if rec["eval_images"] < evals.size else ")  "
    if "train_eval_acc" in rec:
        line += f"train images as they are {100 * rec['train_eval_acc']:.2f}%  "
    tqdm.write(line + f"lr {rec['lr']:.2e}  {rec['images_per_sec']:.0f} img/s  data "
               f"{100 * rec['data_time_frac']:.1f}%  {rec['epoch_time']:.0f}s  "
               f"[{rec['elapsed_min']:.1f} min]")
    evaluated = {f"{evals.name}/{k}": rec[f"eval_{k}"] for k in ("loss", "acc", "images")
                 if "eval_acc" in rec}
    if "train_eval_acc" in rec:
        evaluated["train/eval_acc"] = rec["train_eval_acc"]
    wb.log({"train/epoch_loss": rec["train_loss"], "train/epoch_acc": rec["train_acc"],
            "epoch": rec["epoch"], "epoch_time": rec["epoch_time"],
            "data_time_frac": rec["data_time_frac"], **evaluated}, rec["step"])


def log_run(path: Path, cfg: TrainConfig, run_dir: Path, run: RunState, evals: EvalSet,
            started: str, status: str, device: torch.device, ref_img_s: float | None) -> None:
    """The run's row in the experiments log (experiments.py)."""
    hist = run.history  # (empty for a run stopped or failed in its first epoch)
    train_s = sum(h["epoch_time"] for h in hist)
    images = sum(h["images_per_sec"] * h["epoch_time"] for h in hist)
    command = config_command(cfg)
    words = command.split()[2:]  # after "python train_cifar10.py"
    preset = words[1] if words[:1] == ["--preset"] else ""
    experiments.append_row(path, {
        "started": started, "finished": experiments.now(), "status": status,
        "run": str(run_dir), "command": command, "preset": preset,
        "changes": " ".join(words[2:] if preset else words), "model": cfg.model, "seed": cfg.seed,
        "eval_set": evals.name, "best_acc": round(100 * run.best_acc, 2), "epochs": run.epoch,
        "clock_min": round(hist[-1]["elapsed_min"], 2) if hist else None,
        "wall_min": round(hist[-1].get("wall_min", hist[-1]["elapsed_min"]), 2) if hist else None,
        "images_per_sec": round(images / max(train_s, 1e-9), 1),
        "device": str(device), "cpu": experiments.cpu_name(),
        "ref_img_s": None if ref_img_s is None else round(ref_img_s, 1),
        "torch": torch.__version__})


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: str | Path | None = None, data: ImageData | None = None,
          ref_img_s: float | None = None) -> dict[str, Any]:
    """A training run of `cfg`; with `resume` (a last.pt or run folder), the continuation of that
    run, `cfg` being its saved config with any changes (config.config_from_args); `data` skips
    loading --data-dir (a caller running many runs on the same data, like compare_configs.py);
    `ref_img_s`, the machine's reference speed for the experiments log, if the caller has just
    measured it."""
    validate(cfg)
    if resume:  # a file of the right kind, before its folder is touched
        load_checkpoint(resume, required=RESUME_KEYS, mmap=True)
    device, rank, world = setup_device(cfg.device, cfg.threads)
    if resume:
        run_dir = resolve_checkpoint_path(resume).parent
    else:
        default = f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = (checkpoint.new_run_dir(cfg.out_dir, cfg.run_name, default) if rank == 0
                   else Path(cfg.out_dir) / (cfg.run_name or default))
    # rank 0 holds the run folder, before anything in it is read, until the run ends
    held = checkpoint.hold_run_dir(run_dir, not resume, cfg.overwrite) if rank == 0 else None
    try:
        return _train(cfg, resume, data, run_dir, device, rank, world, ref_img_s)
    finally:
        if held:
            held.close()
            checkpoint.release_run_dir(run_dir)


def _train(cfg: TrainConfig, resume: str | Path | None, data: ImageData | None, run_dir: Path,
           device: torch.device, rank: int, world: int, ref_img_s: float | None
           ) -> dict[str, Any]:
    """train() in its held run folder."""
    is_main = rank == 0
    started = experiments.now()
    log_csv = experiments.log_path(cfg.log_csv, str(run_dir.parent)) if is_main else None
    if log_csv:
        experiments.check_log(log_csv)
        if ref_img_s is None and cfg.measure_speed:
            ref_img_s = experiments.reference_speed()  # before the run: speed drifts
    ckpt = load_checkpoint(resume, required=RESUME_KEYS) if resume else None
    if ckpt:
        check_same_model(cfg, ckpt["model_config"])
        checkpoint.check_resume_point(resolve_checkpoint_path(resume), ckpt)
        cfg = cfg.replace(out_dir=str(run_dir.parent), run_name=run_dir.name)  # where it is now
        if is_main:
            checkpoint.repair_best(run_dir, ckpt)
    # The initial weights, the same in every process (the EMA is copied from them before DDP
    # would broadcast rank 0's); every batch then reseeds per process (data.TrainBatches).
    torch.manual_seed(cfg.seed)

    data = load_data(cfg, ckpt, loaded=data)
    mean, std = input_normalization(ckpt) if ckpt else (data.mean, data.std)  # travel with weights
    train_x, train_y, evals = split_data(data, cfg.val_split, cfg.train_fraction,
                                         cfg.eval_subset, device, rank, world)
    n_train_eval = min(cfg.eval_train, len(train_x))  # --eval-train: at most all of them
    spaced = evenly_spaced(n_train_eval, len(train_x)).to(train_x.device)
    train_sub_x, train_sub_y = train_x[spaced][rank::world], train_y[spaced][rank::world]  # share
    augment = Augment(len(data.classes), mean, std, cfg.crop_pad, cfg.flip, cfg.randaug_n,
                      cfg.randaug_m, cfg.erase_prob, cfg.label_smoothing, cfg.mixup, cfg.cutmix,
                      cfg.mix_prob)
    batches = TrainBatches(train_x, train_y, cfg.batch_size, augment, cfg.seed, rank, world)
    source, weights = None, None
    if ckpt and cfg.init:  # a fine-tuning run resumed: the architecture is the checkpoint's
        source = ckpt["model_config"]
    elif cfg.init:
        source, weights = checkpoint.load_pretrained(cfg.init, cfg.num_heads)
    mcfg = model_config_of(cfg, len(data.classes), source)
    model = build_model(mcfg)
    if weights is not None:
        checkpoint.init_from_pretrained(model, weights)  # Sec. 3.2: new zero head
    learner = Learner.build(cfg, model, device, world)
    eval_model = learner.ema if learner.ema is not None else learner.model
    run = RunState.from_checkpoint(ckpt)
    if ckpt:
        learner.load_state_dict(ckpt)
    last_rec = run.history[-1] if run.history else {}
    schedule = Schedule(cfg, len(batches), elapsed_s=last_rec.get("elapsed_min", 0.0) * 60,
                        warmup_end_s=(ckpt or {}).get("time_budget", {}).get("warmup_end_s"),
                        warmup_steps=(ckpt or {}).get("time_budget", {}).get("warmup_steps"),
                        wall_s=last_rec.get("wall_min", last_rec.get("elapsed_min", 0.0)) * 60)
    wb = SafeWandb(cfg.wandb if is_main else "off", cfg.wandb_project, run_dir.name, str(run_dir),
                   run.wandb_run_id, dataclasses.asdict(cfg))
    run.wandb_run_id = wb.id
    n_params = sum(p.numel() for p in learner.model.parameters())
    if is_main:
        tokens = f"{mcfg.num_tokens} tokens, " if hasattr(mcfg, "num_tokens") else ""
        print(f"{'resuming' if ckpt else 'starting'} run {run_dir} on {device} x{world}, after "
              f"{run.epoch} epochs\n{json.dumps(dataclasses.asdict(cfg))}\nmodel: {n_params:,} "
              f"parameters, {tokens}{len(batches)} steps/epoch, {len(train_x)} train / "
              f"{evals.size} {evals.name}"
              + (f" ({evals.subset} between epochs)" if evals.subset else ""))

    stop = StopFlag()
    save_s = 0.0  # time spent saving checkpoints (this process, this call)
    try:
        for epoch in schedule.remaining_epochs(run.epoch, run.step):
            if cfg.patch_drop and not cfg.full_token_frac:  # a ViT setting (config.VIT_ONLY)
                full = schedule.full_tokens(epoch, run.step, run.history)
                learner.model.patch_drop_rate = 0.0 if full else cfg.patch_drop
            rec, run.step = train_epoch(learner, batches, schedule, epoch, run.step, stop, wb.log,
                                        is_main)
            final = schedule.is_last(epoch)  # the last epoch is evaluated on all images
            with schedule.paused() as took:
                if final or (epoch + 1) % cfg.eval_every == 0:
                    sub = bool(evals.subset) and not final
                    res = evaluate(eval_model, evals.sub_x if sub else evals.x,
                                   evals.sub_y if sub else evals.y, mean, std,
                                   cfg.eval_batch_size, learner.amp_ctx, cfg.tta_flip and not sub)
                    rec.update(eval_loss=res["loss"], eval_acc=res["acc"],
                               eval_images=evals.subset if sub else evals.size)
                    if n_train_eval:  # the same weights on training images, un-augmented
                        rec["train_eval_acc"] = evaluate(
                            eval_model, train_sub_x, train_sub_y, mean, std, cfg.eval_batch_size,
                            learner.amp_ctx)["acc"]
                        rec["train_eval_images"] = n_train_eval
            rec["eval_time"] = took["seconds"]
            rec["elapsed_min"] = schedule.read(run.step) / 60
            rec["wall_min"] = schedule.wall_s / 60
            run.history.append(rec)
            run.epoch = epoch + 1
            is_best = rec.get("eval_images") == evals.size and rec["eval_acc"] > run.best_acc
            run.best_acc = rec["eval_acc"] if is_best else run.best_acc
            if is_main:
                log_epoch(rec, evals, schedule, wb)
                with schedule.paused() as took:
                    state = checkpoint.run_checkpoint(
                        dataclasses.asdict(cfg), mcfg.to_dict(), learner.state_dict(), run,
                        schedule.state_dict(), list(data.classes), mean, std)
                    checkpoint.save_run(state, run_dir, is_best,
                                        first=not ckpt and run.epoch == 1)
                save_s += took["seconds"]
            if final:  # (a budget spent during this epoch's evaluation: the next epoch stops
                break  # at its first clock reading and ends the run with a full evaluation)
    except BaseException as e:  # a row for a run that did not finish too, then the usual exit
        if log_csv:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            try:
                log_run(log_csv, cfg, run_dir, run, evals, started, status, device, ref_img_s)
            except Exception as not_logged:  # the run's own error is the one to report
                print(f"warning: no row in {log_csv}: {not_logged}", file=sys.stderr)
        if not isinstance(e, KeyboardInterrupt):
            raise
        if is_main:
            last = run_dir / "last.pt"
            print(f"interrupted; {last} holds the {run.epoch} finished epochs, continue with: "
                  f"python train_cifar10.py --resume {last}" if run.epoch else
                  f"interrupted in the first epoch: nothing was saved in {run_dir}; start the "
                  f"run again", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        stop.restore()
        wb.finish()
    if is_main and run.history:
        save_curve_png(run.history, run_dir / "accuracy_curve.png",
                       f"{cfg.model}, {n_params / 1e6:.2f}M params: best {evals.name} "
                       f"{100 * run.best_acc:.2f}%")
        flip = " (each image averaged with its mirror image)" if cfg.tta_flip else ""
        print(f"done: best {evals.name} accuracy {100 * run.best_acc:.2f}%{flip}, checkpoints in "
              f"{run_dir}")
        if log_csv:
            log_run(log_csv, cfg, run_dir, run, evals, started, "finished", device, ref_img_s)
            print(f"experiments log: {log_csv}")
    return {"best_acc": run.best_acc, "history": run.history, "run_dir": str(run_dir),
            "save_s": save_s}


# --------------------------------------------------------------------------------------------
# Evaluating and exporting a checkpoint, and the command line
# --------------------------------------------------------------------------------------------

def evaluate_checkpoint(cfg: TrainConfig, path: str | Path, export_to: str | None = None,
                        png: Path | None = None) -> dict[str, Any]:
    """--eval-only: accuracy, per-class accuracy and a confusion-matrix PNG (beside the file, or
    at `png`); --export: also the half-precision weights file and its card."""
    ckpt = load_checkpoint(path)
    if export_to:
        checkpoint.check_export_path(Path(export_to), cfg.overwrite)  # before any work
    device, _, _ = setup_device(cfg.device, cfg.threads)
    model = model_from_checkpoint(ckpt).to(device)
    data = load_data(cfg, ckpt, with_train=False)
    mean, std = input_normalization(ckpt)
    x, y = data.test_x.to(device), data.test_y.to(device)
    res = evaluate(model, x, y, mean, std, cfg.eval_batch_size, amp_context(cfg.amp, device)[0],
                   cfg.tta_flip)
    cm = res["confusion"]
    print(f"test accuracy {100 * res['acc']:.2f}%  loss {res['loss']:.4f}  ({cm.sum()} images)")
    for i, name in enumerate(data.classes):
        print(f"  {name:>12s}: {100 * cm[i, i] / max(cm[i].sum(), 1):.1f}%")
    png = png or resolve_checkpoint_path(path).with_name("confusion_matrix.png")
    check_writable(png.parent)
    save_confusion_png(cm, data.classes, png, f"test set, accuracy {100 * res['acc']:.2f}%")
    print(f"confusion matrix: {png}")
    if not export_to:
        return res

    def measure(shipped: dict[str, Any]) -> dict[str, Any]:
        """The exported file, read back: its accuracies and its top-3 on the bundled photos."""
        fp16 = model_from_checkpoint(shipped).to(device)
        plain = evaluate(fp16, x, y, mean, std, cfg.eval_batch_size)["acc"]
        flip = evaluate(fp16, x, y, mean, std, cfg.eval_batch_size, tta_flip=True)["acc"]
        fp32 = evaluate(model, x, y, mean, std, cfg.eval_batch_size)["acc"]
        files = image_files(BUNDLED_SAMPLES) if BUNDLED_SAMPLES.is_dir() else []
        samples = []
        if files:
            images = torch.stack([read_image(f, fp16.config.img_size) for f in files])
            tops = top_k(fp16.cpu(), images, mean, std, list(data.classes))
            samples = [{"file": f"{BUNDLED_SAMPLES.parent.name}/{BUNDLED_SAMPLES.name}/{f.name}",
                        "label": f.name.split("_")[0], "top3": [[c, round(p, 4)] for c, p in top]}
                       for f, top in zip(files, tops, strict=True)]
        jpeg = "JPEG copy, " if (Path(cfg.data_dir) / "test").is_dir() else ""
        return {"classes": list(data.classes),
                "command": config_command(ckpt.get("config") or {}), "epochs": ckpt.get("epoch"),
                "data": f"CIFAR-10 ({jpeg}{len(data.test_y):,} test images)",
                "test_accuracy": {"checkpoint_fp32": round(100 * fp32, 2),
                                  "shipped_fp16": round(100 * plain, 2),
                                  "shipped_fp16_flip_tta": round(100 * flip, 2)},
                "samples": samples}

    card = checkpoint.export(ckpt, Path(export_to), measure, cfg.overwrite)
    acc = card["test_accuracy"]
    print(f"exported {export_to} ({card['bytes']:,} bytes, sha256 {card['sha256'][:12]}...): test "
          f"accuracy {acc['shipped_fp16']:.2f}% in half precision ({acc['checkpoint_fp32']:.2f}% "
          f"in float32), {acc['shipped_fp16_flip_tta']:.2f}% with flip TTA; card "
          f"{checkpoint.card_path(export_to)}")
    return res


def _main(argv: list[str]) -> None:
    args = build_parser(__doc__).parse_args(argv)
    try:
        if args.export and not args.eval_only:
            raise ValueError("--export needs --eval-only CKPT: it exports the checkpoint it "
                             "evaluates")
        if args.eval_only:
            saved = load_checkpoint(args.eval_only, mmap=True).get("config") or {}
            evaluate_checkpoint(config_from_args(args, saved), args.eval_only, args.export)
        else:
            saved = (load_checkpoint(args.resume, required=RESUME_KEYS, mmap=True)["config"]
                     if args.resume else None)
            train(config_from_args(args, saved), resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _no_data_hint(e: Exception) -> str:
    if isinstance(e, DataNotFoundError) and str(e).lstrip().startswith("no CIFAR-10 found"):
        return (" Meanwhile `python visualize_attention.py` needs no data: it draws the figures "
                "with the model shipped in checkpoints/ and the sample photos in assets/samples.")
    return ""


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv, hint=_no_data_hint)


if __name__ == "__main__":
    main()
