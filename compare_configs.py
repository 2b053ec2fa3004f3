"""Compare configurations: named studies, each a group of training runs under one budget, trained by
train_cifar10.py's own loop and summarised as a table and a plot.

    python compare_configs.py --list
    python compare_configs.py --study patch --budget-min 7 --data-dir data   # equal time
    python compare_configs.py --study patch --epochs 3 --data-dir data       # equal images seen
    python compare_configs.py --study posembed classifier size data --budget-min 7 \\
        --data-dir data

Every run is the baseline BASE with one change: the CPU preset of train_cifar10.py (Muon + AdamW;
the ResNet of the `data` and `transfer` studies, which Muon does not fit, uses AdamW) without flip
averaging at test time, trained on 45,000 images and compared on the 5,000 held-out validation
images (--val-split 5000); test accuracy is a second column, never used to choose.

One change per row, for real: the warmup and the full-token phase (no patch dropout) are shares
of each run (10% and the last 20% of its training time, or of its steps with --epochs), not
epochs, whose share of a run depends on its speed; only the training steps count against
--budget-min (--clock train: evaluation and saving are timed apart and recorded).

Noise: the baseline runs with three seeds, at the start, the middle and the end of the study (so
that a drift of the machine's speed shows in it; two in hour_confirm, at the start and the end).
Each table states the seeds' standard deviation s, the sampling error se of an accuracy on the
validation images, and sigma = sqrt(s^2 (1 + 1/k) + se^2), the noise of a run minus the
baseline's mean over k seeds; a difference is called real only beyond 2 sigma. A change run
with m seeds gets a row of their mean, judged by sqrt(s^2 (1/m + 1/k) + se^2). A paired test
(McNemar's, exact) compares each run with the baseline of its seed image by image on the same
validation images.

Budget: --budget-min M gives every run M minutes of training (the fair comparison on a CPU: the
view of a CPU user, with a fixed time), --epochs E the same number of epochs (equal images seen,
as the paper's scaling plots train every model with one setup); the two views go to separate
files (STUDY.json and STUDY_epochs.json). Each
run records when it ran, the machine's reference speed just before it (`python benchmark.py
model`), its images/s with and without patch dropout, and its evaluation and other time; rows
more than 10% from the study's first reference speed are flagged in the table, and rows from
another CPU, device or thread count, or a reference speed 1.5x apart, are refused in one file.
Each study keeps its rows in OUT/NAME.json,
one per finished run; rerunning the command skips finished rows, reuses an identical run another
study has already done on this machine and measured alike (the baseline), and continues an
interrupted run from its last.pt. Several commands may run at once into one OUT: each row is
added under a lock. The table goes to OUT/NAME.md (and the terminal), the plot to
FIG_DIR/study_NAME.png, run checkpoints to CHECKPOINT_DIR/STUDY/, and every run's line to
CHECKPOINT_DIR/STUDY/experiments.csv.

Outputs: by default OUT is outputs/results and FIG_DIR outputs/figures (not tracked by git), and
the checkpoints go to checkpoints/compare. The tables and plots of the guide (docs/studies.md),
committed in results/ and figures/, are regenerated with `--out results --fig-dir figures`.
--set changes any other setting of the baseline: the seeds, the budget and where files go are
set by the study and by the flags below, and a setting the chosen studies vary (the patch size of
`patch`, ...) stays theirs.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

import train_cifar10 as tc  # noqa: E402
from checkpoint import (  # noqa: E402
    atomic_write,
    input_normalization,
    load_checkpoint,
    model_from_checkpoint,
)
from config import (  # noqa: E402
    MEASURE_ONLY,
    PLACE,
    PRESETS,
    TrainConfig,
    as_cnn,
    build_model,
    config_command,
    model_config_of,
    parse_settings,
    validate,
)
from data import ImageData, load_dataset, split_data  # noqa: E402
from experiments import cpu_name, now, reference_speed  # noqa: E402
from runtime import run_cli  # noqa: E402
from vit_model import ViTConfig, estimate_flops  # noqa: E402

# The CPU preset, with its warmup and full-token phase as shares of each run (not epochs, whose
# share of a run depends on the run's speed), only the training steps counted against the budget
# (evaluation and saving are timed apart), and plain accuracy (no flip averaging).
BASE: dict[str, Any] = {**PRESETS["cpu"], "tta_flip": False, "val_split": 5000, "wandb": "off",
                        "warmup_frac": 0.1, "full_token_frac": 0.2, "clock": "train"}
# A reference speed further than this ratio from the median of a file's rows is another machine
# (as are other CPU names, devices or thread counts). Not tighter, and against the median rather
# than each row: on a shared virtual machine the reference read 188-345 img/s within three hours
# while the baseline's training speed moved by 7%.
SAME_MACHINE = 1.5
DRIFT = 0.10  # rows whose reference speed is this far from the study's first are flagged
SEEDS = (0, 1, 2)  # the baseline's seeds, run at the start, the middle and the end of a study
# Settings each study sets itself, which --set may not change, and what to use instead.
STUDY_SETS = {
    "seed": "seeds are part of each study (the baseline runs with seeds 0, 1 and 2, or 0 and 1; "
            "see --list)",
    "epochs": "give the budget of every run with --epochs E or --budget-min M",
    "time_budget": "give the budget of every run with --budget-min M or --epochs E",
    "data_dir": "use --data-dir", "download": "use --download",
    "out_dir": "use --checkpoint-dir (runs go to CHECKPOINT_DIR/STUDY/)",
    "run_name": "runs are named by their study and config (CHECKPOINT_DIR/STUDY/STUDY-KEY)",
}


@dataclass
class Run:
    label: str  # the row's name in the table
    changes: dict[str, Any] = field(default_factory=dict)  # settings that differ from BASE
    seed: int = 0
    baseline: bool = False
    line: str = ""  # the plot's line (data study: the model)
    x: float = 0.0  # the plot's x value (data study: fraction of the training images)


@dataclass
class Study:
    name: str
    question: str
    runs: list[Run]
    plot: str = "bars"  # "bars" or "lines" (accuracy vs x, one line per Run.line)
    mean_rows: bool = False  # the table adds the mean of each change run with several seeds


def varied_settings(study: Study) -> dict[str, Run]:
    """The settings the runs of a study change, each with the first run that changes it: what the
    study compares, so --set may not change them. The ViT-only settings that a CNN run resets
    (as_cnn()) are not among them: a --set of those changes the ViT runs, and the CNN runs undo
    it."""
    cnn = as_cnn()
    varied: dict[str, Run] = {}
    for run in study.runs:
        is_cnn = run.changes.get("model") == cnn["model"]
        for name, value in run.changes.items():
            resets_vit_only = is_cnn and name != "model" and name in cnn and cnn[name] == value
            if not resets_vit_only:
                varied.setdefault(name, run)
    return varied


def baseline(label: str, seeds: tuple[int, ...] = SEEDS, **plot: Any) -> list[Run]:
    return [Run(label, {}, seed, True, **plot) for seed in seeds]


def seeded(label: str, changes: dict[str, Any], seeds: tuple[int, ...]) -> list[Run]:
    """One change with several seeds: the table adds their mean, judged by its own noise."""
    return [Run(label, changes, seed) for seed in seeds]


def _data_runs() -> list[Run]:
    """The baseline's three seeds, each fraction once, then a second seed of the ViT's fractions
    and of the ResNet at 10%: the rows the study's conclusions rest on; and a third seed of the
    ViT at 50% and 25%, because one run of each trained while the machine was busy (393 and
    275 img/s against 525-609 for the others) and saw far fewer images in its 7 minutes."""
    vit, cnn = "ViT (vit_cifar_tiny)", "ResNet (resnet_cifar)"
    runs = baseline("ViT, 100%", line=vit, x=1.0)
    for frac in (0.5, 0.25, 0.1):
        runs.append(Run(f"ViT, {frac:.0%}", {"train_fraction": frac}, line=vit, x=frac))
    for frac in (1.0, 0.5, 0.25, 0.1):  # the CNN: ViT-only settings (and any --set of them) undone
        runs.append(Run(f"ResNet, {frac:.0%}", {**as_cnn(), "train_fraction": frac}, line=cnn,
                        x=frac))
    runs += [Run(f"ViT, {frac:.0%}", {"train_fraction": frac}, 1, line=vit, x=frac)
             for frac in (0.5, 0.25, 0.1)]
    runs.append(Run("ResNet, 10%", {**as_cnn(), "train_fraction": 0.1}, 1, line=cnn, x=0.1))
    runs += [Run(f"ViT, {frac:.0%}", {"train_fraction": frac}, 2, line=vit, x=frac)
             for frac in (0.5, 0.25)]
    return runs


# The transfer study's split of CIFAR-10: pre-train on the first five classes, fine-tune on the
# other five. Each target class has a relative among the sources (dog - cat, horse - deer,
# ship - airplane, truck - automobile; frog - the other small animals), as CIFAR-10's classes have
# relatives in ImageNet-21k, the paper's source: what transfers is general visual features, not
# the classes themselves.
SOURCE = "airplane,automobile,bird,cat,deer"
TARGET = "dog,frog,horse,ship,truck"


def _transfer_runs() -> list[Run]:
    """Pre-train a ViT and the ResNet on the 25,000 source images; then on 1%, 10% and 100% of the
    target's 22,500 training images (2,500 held out), train each from scratch and fine-tuned
    from its pre-trained source (Sec. 3.2: new zero head, same recipe and budget); and one
    fine-tuning at 48x48, above the data's 32x32 (Sec. 3.2: the paper fine-tunes at 384)."""
    target = {"classes": TARGET, "val_split": 2500}
    vit, cnn = "ViT (vit_cifar_tiny)", "ResNet (resnet_cifar)"
    runs = [Run("ViT source, 5 classes", {"classes": SOURCE, "val_split": 0}),
            Run("ResNet source, 5 classes", {**as_cnn(), "classes": SOURCE, "val_split": 0}),
            *(Run("ViT scratch, 100%", target, seed, True, f"{vit}, scratch", 1.0)
              for seed in SEEDS)]
    for frac in (0.1, 0.01):
        runs.append(Run(f"ViT scratch, {frac:.0%}", {**target, "train_fraction": frac},
                        line=f"{vit}, scratch", x=frac))
    for frac in (1.0, 0.1, 0.01):
        changes = {**target, "train_fraction": frac}
        runs += [Run(f"ViT fine-tuned, {frac:.0%}",
                     {**changes, "init": "run:ViT source, 5 classes"},
                     line=f"{vit}, fine-tuned", x=frac),
                 Run(f"ResNet scratch, {frac:.0%}", {**changes, **as_cnn()},
                     line=f"{cnn}, scratch", x=frac),
                 Run(f"ResNet fine-tuned, {frac:.0%}",
                     {**changes, **as_cnn(), "init": "run:ResNet source, 5 classes"},
                     line=f"{cnn}, fine-tuned", x=frac)]
    runs.append(Run("ViT fine-tuned at 48x48, 10%",
                    {**target, "train_fraction": 0.1, "init": "run:ViT source, 5 classes",
                     "img_size": 48}, line=f"{vit}, fine-tuned at 48x48", x=0.1))
    return runs


MIXING_LABEL = "mixup 0.8 + CutMix 1.0, off last 20%"
MIXING = {"mixup": 0.8, "cutmix": 1.0, "mix_off_frac": 0.2}


def _hour_runs() -> list[Run]:
    """One regulariser or prior at a time against the preset, in the order they were judged
    most likely to matter once the curve flattens (about 40 minutes into the hour): mixing,
    which small ViTs trained from scratch on CIFAR-10 rely on, stopped for the last 20% so that
    the end of the decay sees real images; mimetic initialisation; an EMA of the weights whose
    horizon (1 / (1 - decay) = 2,000 steps) is about a third of a 30-minute run (~6,300 steps
    on a 2-core CPU); then erasing, RandAugment, width (which may win at the hour with strong
    augmentation while losing at 9 minutes) and RandAugment's lower magnitude."""
    return [*baseline("preset (baseline)"),
            Run(MIXING_LABEL, MIXING),
            Run("mimetic init", {"mimetic_init": True}),
            Run("EMA 0.9995", {"ema": 0.9995}),
            Run("random erasing 0.25", {"erase_prob": 0.25}),
            Run("RandAugment 2 ops, m=9", {"randaug_n": 2, "randaug_m": 9}),
            Run("D=192 (wider)", {"embed_dim": 192}),
            Run("RandAugment 2 ops, m=5", {"randaug_n": 2, "randaug_m": 5})]


def _hour_confirm_runs() -> list[Run]:
    """The screen's candidates at the preset's full 57 minutes, two seeds each (run in the
    order baseline, mixing, mixing, baseline: each pair of about two hours holds one of each).
    The baseline's own gap curve at 57 minutes is the direct look at overfitting; mixing, which
    cut the 30-minute gap to a third, is the intervention: a win supports the hypothesis, a tie
    or a loss does not refute it (it already paid for under-fitting at 30 minutes)."""
    return [*baseline("preset (baseline)", (0, 1)), *seeded(MIXING_LABEL, MIXING, (0, 1))]


# Both learning rates of the preset (AdamW's --lr and Muon's --muon-lr) times 0.3.
LOWER_LR = {"lr": round(0.3 * BASE["lr"], 8), "muon_lr": round(0.3 * BASE["muon_lr"], 8)}

STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("patch", "patch size 2 / 4 / 8 on 32x32 images (256 / 64 / 16 tokens): "
          "accuracy vs compute", [
        *baseline("P=4, 64 tokens (baseline)"), Run("P=2, 256 tokens", {"patch_size": 2}),
        Run("P=8, 16 tokens", {"patch_size": 8})]),
    Study("posembed", "position embedding: learned / fixed 2-D sin-cos / none "
          "(Appendix D.4, Table 8)", [
        *baseline("learned (baseline)"), Run("2-D sin-cos, fixed", {"pos_embed": "sincos"}),
        Run("none", {"pos_embed": "none"})]),
    Study("classifier", "[CLS] token vs global average pooling, each at two learning rates "
          "(Appendix D.3 / Figure 9 sweeps more)", [
        *baseline("GAP, lr x1 (baseline)"), Run("GAP, lr x0.3", LOWER_LR),
        Run("[CLS], lr x1", {"classifier": "token"}),
        Run("[CLS], lr x0.3", {"classifier": "token", **LOWER_LR})]),
    Study("size", "width D and depth L (Figure 8's axes)", [
        *baseline("D=128, L=6 (baseline)"), Run("D=64, L=6", {"embed_dim": 64}),
        Run("D=192, L=6", {"embed_dim": 192}), Run("D=128, L=3", {"depth": 3}),
        Run("D=128, L=12", {"depth": 12})]),
    Study("data", "ViT vs a ResNet of similar size on 10-100% of the training images (Figures 3-4)",
          _data_runs(), plot="lines"),
    Study("hour", "the late-run levers, screened at 30 minutes (then confirmed at the preset's "
          "57): mixup + CutMix off for the last 20%, mimetic initialisation, EMA, random "
          "erasing, RandAugment at two magnitudes, a wider model", _hour_runs()),
    Study("hour_confirm", "the 30-minute screen's candidates at the preset's 57 minutes, two "
          "seeds each, with the train/validation gap along the run (--set eval_train=2000)",
          _hour_confirm_runs(), mean_rows=True),
    Study("transfer", "pre-train on five classes, fine-tune on the other five (Sec. 3.2): how "
          "much does pre-training help, the ViT and the ResNet, with 1-100% of the target images",
          _transfer_runs(), plot="lines"),
)}


# --------------------------------------------------------------------------------------------
# Configs, rows and the results file of a study
# --------------------------------------------------------------------------------------------

SOURCE_ARCH = ("embed_dim", "depth", "mlp_ratio")  # a fine-tuned run's, taken from its source


def run_config(run: Run, budget: dict[str, Any], base: dict[str, Any]) -> TrainConfig:
    """The full training config of a run: defaults < BASE (with --set) < the run's change <
    budget."""
    if run.changes.get("init"):  # fine-tuned: the architecture is the source run's
        base = {k: v for k, v in base.items() if k not in SOURCE_ARCH}
    cfg = TrainConfig(**{**base, **run.changes, "seed": run.seed, **budget})
    validate(cfg)
    return cfg


# Settings added after rows were recorded: at these values (their defaults) they stay out of a
# run's key, so that rows recorded before the setting existed still match and are reused.
NEWER_SETTINGS = {name: TrainConfig.__dataclass_fields__[name].default
                  for name in ("mimetic_init", "mix_off_frac", "eval_train")}


def not_trained(config: dict[str, Any]) -> set[str]:
    """The settings of a config that do not change what it trains: where files go, and the
    measurements whose time does not count against the budget."""
    measures_free = config.get("clock") == "train" or not config.get("time_budget")
    return set(PLACE) | (set(MEASURE_ONLY) if measures_free else set())


def run_key(cfg: TrainConfig) -> str:
    """A run's identity: everything that changes what is trained (not where files go)."""
    config = dataclasses.asdict(cfg)
    skip = not_trained(config)
    what = {k: v for k, v in config.items()
            if k not in skip and not (k in NEWER_SETTINGS and v == NEWER_SETTINGS[k])}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def model_cost(cfg: TrainConfig, num_classes: int) -> tuple[int, float]:
    """Parameters and forward MFLOPs per image (all tokens; a multiply-add counts 2): the ViT's
    from estimate_flops, the CNN's from PyTorch's FLOP counter."""
    mcfg = model_config_of(cfg, num_classes)
    model = build_model(mcfg).eval()
    params = sum(p.numel() for p in model.parameters())
    if isinstance(mcfg, ViTConfig):
        return params, estimate_flops(mcfg)["total"] / 1e6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, mcfg.in_chans, mcfg.img_size, mcfg.img_size))
    return params, counter.get_total_flops() / 1e6


# What the tables, the plots and the reuse of runs read from a row, with its type.
NUMBER = (int, float)
ROW_TYPES = {"study": str, "label": str, "seed": int, "baseline": bool, "line": str, "x": NUMBER,
             "key": str, "config": dict, "val_acc": NUMBER, "test_acc": NUMBER, "epochs": int,
             "minutes": NUMBER, "images_per_sec": NUMBER, "params": int, "mflops": NUMBER,
             "machine": dict, "started": str, "phases": dict, "val_images": int,
             "val_correct": str, "train_images": int, "images_seen": int, "run_dir": str}
MACHINE_TYPES = {"cpu": str, "ref_img_s": NUMBER}
CONFIG_TYPES = {"time_budget": NUMBER, "epochs": int, "classes": str, "val_split": int,
                "warmup_frac": NUMBER, "full_token_frac": NUMBER}
PHASE_TYPES = {"train_s": NUMBER, "eval_s": NUMBER, "save_other_s": NUMBER, "wall_s": NUMBER,
               "drop_img_s": NUMBER, "full_img_s": NUMBER, "full_token_share": NUMBER}


def wrong_keys(d: Any, types: dict[str, Any]) -> list[str]:
    """The keys of `types` that d lacks or holds with another type."""
    return [k for k, t in types.items() if not (isinstance(d, dict) and isinstance(d.get(k), t))]


def rows_problem(data: Any) -> str:
    """What is wrong with the content of a results file ('' when nothing is)."""
    if not (isinstance(data, dict) and isinstance(data.get("rows"), list)):
        return 'it is not {"study": ..., "rows": [...]}'
    for i, row in enumerate(data["rows"], 1):
        bad = (wrong_keys(row, ROW_TYPES)
               or [f"machine.{k}" for k in wrong_keys(row["machine"], MACHINE_TYPES)]
               or [f"config.{k}" for k in wrong_keys(row["config"], CONFIG_TYPES)]
               or [f"phases.{k}" for k in wrong_keys(row["phases"], PHASE_TYPES)])
        if bad:
            return f"row {i} has no valid {', '.join(map(repr, bad))}"
    return ""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (none if there is no file), checked; a file that is not one is
    left as it is, with a ValueError that names it."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        problem = rows_problem(data)
    except ValueError as e:  # invalid JSON, or not text at all (UnicodeDecodeError)
        problem = f"it is not JSON ({e})"
    if problem:
        raise ValueError(f"{path} is not a results file of compare_configs.py: {problem}. It was "
                         f"left as it is: mend it, or move it away to run the study again")
    return data["rows"]


class Results:
    """OUT/STUDY.json: {"study", "rows": [...]}, one row per finished run. Several processes may
    add rows to one file at once (two commands sharing an --out): each add takes a lock, re-reads
    the file, appends and replaces the file whole, so that no process drops another's rows."""

    def __init__(self, out: Path, name: str) -> None:
        self.name = name  # the study's, with "_epochs" for its equal-epochs view
        self.path = out / f"{name}.json"
        self.lock_path = out / f".{name}.json.lock"
        self.table_path = out / f"{name}.md"
        self.rows = read_rows(self.path)

    def find(self, key: str, label: str) -> dict[str, Any] | None:
        """The row of a run under its label (a row of the same run under an old label is not
        this run's: it is reused under the new one)."""
        return next((r for r in self.rows if r["key"] == key and r["label"] == label), None)

    def add(self, row: dict[str, Any], reused: bool = False) -> None:
        """Add a row under the lock, refusing one of another budget, baseline or machine than
        the rows already there (another process may have written them since this one
        started)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the others; closing the file releases it
            self.rows = read_rows(self.path)  # with the rows other processes added meanwhile
            check_budget(self.rows, row["config"], str(self.path))
            study = STUDIES.get(self.name.removesuffix("_epochs"))
            check_measures(self.rows, row["config"], str(self.path))
            if study is not None:
                check_base(self.rows, row["config"], study, str(self.path))
            # a reused row's speed was compared with this machine's when it was chosen; its CPU,
            # device and threads must still be those of the rows here
            check_machine(self.rows, {**row["machine"], "ref_img_s": median_ref(self.rows)}
                          if reused and self.rows else row["machine"], str(self.path))
            if not any(r["key"] == row["key"] and r["label"] == row["label"] for r in self.rows):
                self.rows.append(row)  # (unless another process just added the same run)
            atomic_write(self.path, (json.dumps({"study": self.name, "rows": self.rows}, indent=1)
                                     + "\n").encode())  # readers see the old file or the new


def results_name(study: str, budget: dict[str, Any]) -> str:
    """The results file of a study under a budget: STUDY (equal time), STUDY_epochs (equal
    epochs, that is equal images seen)."""
    return study if budget["time_budget"] else f"{study}_epochs"


def budget_text(config: dict[str, Any]) -> str:
    return (f"{config['time_budget']:g} min" if config["time_budget"]
            else f"{config['epochs']} epochs")


def check_budget(rows: list[dict[str, Any]], budget: dict[str, Any], where: str) -> None:
    """One table, one budget: refuse to add runs of another budget to a results file."""
    for r in rows:
        if budget_text(r["config"]) != budget_text(budget):
            raise ValueError(f"{where} holds runs of {budget_text(r['config'])} each; this command "
                             f"runs {budget_text(budget)}: use another --out folder (or the "
                             f"same budget)")


def same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two machine records that may share a table: the same device and thread count (where
    recorded), reference speeds within SAME_MACHINE of each other."""
    ra, rb = a["ref_img_s"], b["ref_img_s"]
    return (max(ra / rb, rb / ra) <= SAME_MACHINE and a["cpu"] == b["cpu"]
            and all(a.get(k, b.get(k)) == b.get(k, a.get(k)) for k in ("device", "threads")))


def median_ref(rows: list[dict[str, Any]]) -> float:
    """The median reference speed of a file's rows (one noisy reading must not lock the file)."""
    return statistics.median(r["machine"]["ref_img_s"] for r in rows)


def base_settings(config: dict[str, Any], study: Study) -> dict[str, Any]:
    """The settings a study's rows share: all but what its runs compare (varied_settings), the
    seed, the budget, where files go, and what a run sets whatever the baseline: a CNN's ViT-only
    settings (as_cnn()) and a fine-tuned run's architecture (its source's). (A ViT-only --set,
    which the CNN runs undo, still differs between ViT rows: not one baseline.)"""
    fixed = set(varied_settings(study)) | {"seed", "epochs", "time_budget"} | not_trained(config)
    if config.get("model") == as_cnn()["model"]:
        fixed |= set(as_cnn())
    if config.get("init"):
        fixed |= set(SOURCE_ARCH)
    return {k: v for k, v in config.items() if k not in fixed}


def check_base(rows: list[dict[str, Any]], config: dict[str, Any], study: Study,
               where: str) -> None:
    """One table, one baseline: refuse a run whose shared settings (a --set) differ from the
    rows' already there (settings a row does not record, from older code, are not compared, but
    for NEWER_SETTINGS, which such a row was trained at: their defaults)."""
    for r in rows:
        theirs = base_settings({**NEWER_SETTINGS, **r["config"]}, study)
        ours = base_settings(config, study)
        diff = sorted(k for k in theirs.keys() & ours.keys() if theirs[k] != ours[k])
        if diff:
            raise ValueError(
                f"{where} holds runs whose baseline differs from this one's in "
                + ", ".join(f"{k} ({theirs[k]!r} there, {ours[k]!r} here)" for k in diff[:4])
                + ": one table, one baseline: use another --out folder")


def measured(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What a run measures beyond what it trains: its MEASURE_ONLY settings (a row recorded
    before one existed measured its default)."""
    return tuple((k, config.get(k, TrainConfig.__dataclass_fields__[k].default))
                 for k in MEASURE_ONLY)


def measures_text(m: tuple[tuple[str, Any], ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in m)


def check_measures(rows: list[dict[str, Any]], config: dict[str, Any], where: str) -> None:
    """One table, one set of measurements: refuse a run that measures otherwise than the rows
    already there (a study resumed without its `--set eval_train=N` would add rows without the
    train/validation gap curve, which the gap figure then leaves out without a word), and a
    file whose rows already disagree."""
    kinds: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for r in rows:
        kinds.setdefault(measured(r["config"]), []).append(f"{r['label']!r} (seed {r['seed']})")
    if len(kinds) > 1:
        raise ValueError(f"{where} holds rows measured in different ways ("
                         + "; ".join(f"{measures_text(m)}: {listed(rs)}" for m, rs in kinds.items())
                         + "): one table, one set of measurements: move one kind of row out of "
                           "the file (it is JSON), or use another --out folder")
    ours, theirs = measured(config), next(iter(kinds), measured(config))
    if theirs != ours:
        defaults = dict(measured({}))
        give = measures_text(tuple((k, v) for k, v in theirs if v != defaults[k]))
        free = set(MEASURE_ONLY) <= not_trained(config)
        raise ValueError(
            f"{where} holds runs measured with {measures_text(theirs)}; this one measures "
            f"{measures_text(ours)}: one table, one set of measurements: "
            + (f"give the rows' own `--set {give}`" if give else
               "leave out the --set of " + ", ".join(k for k, _ in ours))
            + (" (it changes nothing that is trained)" if free else "")
            + ", or use another --out folder")


def check_machine(rows: list[dict[str, Any]], machine: dict[str, Any], where: str) -> None:
    """One table, one machine: refuse a row whose CPU, device or thread count differs from any
    row's already there, or whose reference speed is SAME_MACHINE from their median."""
    for r in rows:
        theirs, ours = {**r["machine"], "ref_img_s": median_ref(rows)}, machine
        if not same_machine(theirs, ours):
            raise ValueError(
                f"{where} holds rows measured on {theirs.get('device', 'cpu')} with "
                f"{theirs.get('threads', '?')} threads at a median {theirs['ref_img_s']:.0f} img/s "
                f"on the reference (`python benchmark.py model`); this one is "
                f"{ours.get('device', 'cpu')} with {ours.get('threads', '?')} threads, measuring "
                f"{ours['ref_img_s']:.0f} "
                f"img/s. One table, one machine (accuracies at equal time, and speeds, would not "
                f"compare): use another --out folder")


def check_folder(folder: Path, option: str) -> None:
    """Create an output folder and write a file in it now, so that a bad one fails before the
    first run rather than after it."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder: give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{option} {folder}: cannot write there ({e.strerror or e}); give a "
                         f"folder you can write to") from e


def plot_path(fig_dir: Path, study: str) -> Path:
    return fig_dir / f"study_{study}.png"


def figure_paths(fig_dir: Path, study: Study, res: Results) -> list[Path]:
    """Every plot report() may write for a study's results file."""
    return [plot_path(fig_dir, n) for n in (res.name, f"{study.name}_views", f"{res.name}_curves")]


def check_not_folders(paths: list[Path], option: str) -> None:
    """Files a study writes, in the folder of `option`, must not be folders: a folder in the way
    would fail only when the file is written, after a run has trained."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{path} is a folder, where a file goes: move it away, or give "
                             f"another {option}")


# --------------------------------------------------------------------------------------------
# Running a study
# --------------------------------------------------------------------------------------------

def run_folder(checkpoint_dir: str, study: str, cfg: TrainConfig) -> Path:
    """Where a run's checkpoints go (its last.pt lets an interrupted run continue)."""
    return Path(checkpoint_dir) / study / f"{study}-{run_key(cfg)}"


def train_run(study: str, run: Run, cfg: TrainConfig, args: argparse.Namespace,
              data: ImageData, rows: list[dict[str, Any]], ref: float) -> Path:
    """Train one run with train_cifar10.train (continuing its last.pt if it was interrupted). A
    run fine-tuned from another run of the study (--init run:LABEL) starts from that run's
    best.pt, found among the study's finished `rows`."""
    run_dir = run_folder(args.checkpoint_dir, study, cfg)
    last = run_dir / "last.pt"
    if last.is_file():
        tqdm.write(f"continuing {run.label!r} from {last}")
    placed = cfg.replace(data_dir=args.data_dir, out_dir=str(run_dir.parent), run_name=run_dir.name)
    if cfg.init.startswith("run:"):
        source = next((r for r in rows if r["label"] == cfg.init[4:]), None)
        if source is None:
            raise ValueError(f"{run.label!r} fine-tunes {cfg.init[4:]!r}, which has not run yet")
        placed = placed.replace(init=str(Path(source["run_dir"]) / "best.pt"))
    tc.train(placed, resume=last if last.is_file() else None, data=data, ref_img_s=ref)
    return run_dir


def phases(hist: list[dict[str, Any]]) -> dict[str, float]:
    """Where a run's time went, from its history: training (with patch dropout and with all
    tokens, each with its images/s), evaluation, and the rest (saving, start-up)."""
    total = {k: sum(h.get(k, 0.0) for h in hist)
             for k in ("drop_time", "drop_images", "full_time", "full_images", "eval_time")}
    train_s = sum(h["epoch_time"] for h in hist)
    wall_s = 60 * hist[-1].get("wall_min", hist[-1]["elapsed_min"])
    return {"train_s": round(train_s, 1), "eval_s": round(total["eval_time"], 1),
            "save_other_s": round(max(wall_s - train_s - total["eval_time"], 0.0), 1),
            "wall_s": round(wall_s, 1),
            "drop_img_s": round(total["drop_images"] / max(total["drop_time"], 1e-9), 1),
            "full_img_s": round(total["full_images"] / max(total["full_time"], 1e-9), 1),
            "full_token_share": round(total["full_time"]
                                      / max(total["drop_time"] + total["full_time"], 1e-9), 3)}


# Each epoch's record kept in a row (the curves of the guide's figures): training minutes,
# accuracy on the augmented batches, on the evaluation images (a subset between epochs:
# eval_images), and on training images as they are (--eval-train).
CURVE = ("elapsed_min", "train_loss", "train_acc", "eval_acc", "eval_images", "train_eval_acc",
         "train_eval_images")


def make_row(study: str, run: Run, cfg: TrainConfig, run_dir: Path, data: ImageData,
             machine: dict[str, Any], started: str) -> dict[str, Any]:
    ckpt = load_checkpoint(run_dir / "last.pt")
    hist = ckpt["history"]
    best = load_checkpoint(run_dir / "best.pt") if (run_dir / "best.pt").is_file() else ckpt
    data = tc.load_data(cfg, None, loaded=data)  # the run's own --classes
    model, norm = model_from_checkpoint(best), input_normalization(best)
    test = tc.evaluate(model, data.test_x, data.test_y, *norm, cfg.eval_batch_size)["acc"]
    train_x, _, evals = split_data(data, cfg.val_split, cfg.train_fraction)
    val = tc.evaluate(model, evals.x, evals.y, *norm, cfg.eval_batch_size,  # each image's answer
                      tta_flip=cfg.tta_flip)
    correct = (val["pred"] == evals.y).numpy()
    params, mflops = model_cost(cfg, len(data.classes))
    spent = phases(hist)
    seen = sum(h.get("drop_images", 0) + h.get("full_images", 0) for h in hist)
    return {
        "study": study, "label": run.label, "seed": run.seed, "baseline": run.baseline,
        "line": run.line, "x": run.x, "key": run_key(cfg), "config": dataclasses.asdict(cfg),
        "command": config_command(cfg), "val_acc": round(100 * ckpt["best_acc"], 2),
        "test_acc": round(100 * test, 2), "epochs": len(hist),
        "minutes": round(hist[-1]["elapsed_min"], 2),
        "images_per_sec": round(seen / max(spent["train_s"], 1e-9), 1),
        "train_images": len(train_x), "images_seen": int(seen), "val_images": len(correct),
        "val_correct": np.packbits(correct).tobytes().hex(), "phases": spent,
        "params": params, "mflops": round(mflops, 1), "machine": machine,
        "started": started, "finished": now(), "date": started[:10], "run_dir": str(run_dir),
        "curve": [{k: round(h[k], 4) for k in CURVE if k in h} for h in hist],
    }


def interleaved(todo: list[Any], is_baseline: Callable[[Any], bool],
                key: Callable[[Any], Any] = lambda t: t) -> list[Any]:
    """The runs to do with the baseline's spread evenly among the others (the first at the
    start, the last at the end), so that a drift of the machine's speed during a study shows in
    the baseline's seeds rather than only in the variants. A baseline run that several studies
    share (the same key) is spread once; its copies follow it (they reuse it)."""
    first: dict[Any, list[Any]] = {}
    for t in todo:
        if is_baseline(t):
            first.setdefault(key(t), []).append(t)
    base = list(first.values())
    out: list[Any] = [t for t in todo if not is_baseline(t)]
    gaps = len(out)
    for k in range(len(base) - 1, -1, -1):  # from the end, so earlier places stay put
        at = round(k * gaps / max(len(base) - 1, 1))
        out[at:at] = base[k]
    return out


def run_studies(args: argparse.Namespace) -> None:
    budget = ({"time_budget": args.budget_min, "epochs": 1000} if args.budget_min
              else {"time_budget": 0.0, "epochs": args.epochs})
    base = {**BASE, **args.set}
    out = Path(args.out)
    configs = {(name, i): run_config(r, budget, base)
               for name in args.study for i, r in enumerate(STUDIES[name].runs)}
    # everything that could fail after a run has trained fails now instead
    for option, folder in (("--out", out), ("--fig-dir", args.fig_dir),
                           ("--checkpoint-dir", args.checkpoint_dir)):
        check_folder(Path(folder), option)
    plans = [(STUDIES[name], Results(out, results_name(name, budget))) for name in args.study]
    for s, res in plans:
        check_not_folders([res.path, res.lock_path, res.table_path], "--out")
        check_not_folders(figure_paths(Path(args.fig_dir), s, res), "--fig-dir")
        check_budget(res.rows, budget, str(res.path))
        for i, _ in enumerate(s.runs):  # a --set other than the rows' fails now, not after a run
            check_measures(res.rows, dataclasses.asdict(configs[s.name, i]), str(res.path))
            check_base(res.rows, dataclasses.asdict(configs[s.name, i]), s, str(res.path))
    for path in sorted(out.glob("*.json")):  # the other studies' rows, reused below
        read_rows(path)
    # the order of the whole study, so that a resumed one keeps it, less the finished runs
    todo = [t for t in interleaved([(s, res, i) for s, res in plans for i, _ in enumerate(s.runs)],
                                   lambda t: t[0].runs[t[2]].baseline,
                                   lambda t: run_key(configs[t[0].name, t[2]]))
            if t[1].find(run_key(configs[t[0].name, t[2]]), t[0].runs[t[2]].label) is None]
    for s, _, i in todo:  # an interrupted run continues measuring what it measured
        last = run_folder(args.checkpoint_dir, s.name, configs[s.name, i]) / "last.pt"
        if last.is_file():
            started = load_checkpoint(last, required=("config",), mmap=True)["config"]
            check_measures([{"config": started, "label": s.runs[i].label, "seed": s.runs[i].seed}],
                           dataclasses.asdict(configs[s.name, i]), f"{last} (interrupted)")
    ref = reference_speed()
    device = base.get("device", "auto")
    machine = {"cpu": cpu_name(), "ref_img_s": round(ref, 1), "torch": torch.__version__,
               "device": "cuda" if device == "cuda" or (device == "auto"
                                                        and torch.cuda.is_available()) else "cpu",
               "threads": base.get("threads") or torch.get_num_threads()}
    print(f"machine: {machine['cpu']}, reference speed {ref:.0f} img/s "
          f"(vit_cifar_tiny forward + backward, `python benchmark.py model`)")
    for _, res in plans:
        check_machine(res.rows, machine, str(res.path))
    if not todo:
        print("every run is already done")
    else:
        data = load_dataset(args.data_dir, args.download)
        overall = tqdm(total=len(todo), desc=f"study runs ({budget_text(budget)} each)",
                       unit="run", position=0)
        try:
            for s, res, i in todo:
                run, cfg = s.runs[i], configs[s.name, i]
                key = run_key(cfg)
                # read now: another process may have finished the run meanwhile (one measured
                # otherwise is trained again: its row must measure what this study's rows do)
                same = [r for p in sorted(out.glob("*.json")) for rows in [read_rows(p)]
                        for r in rows if r["key"] == key and same_machine(
                            {**r["machine"], "ref_img_s": median_ref(rows)}, machine)]
                ours = measured(dataclasses.asdict(cfg))
                done = [r for r in same if measured(r["config"]) == ours]
                if same and not done:
                    tqdm.write(f"[{s.name}] {run.label}: same run as {same[0]['study']}/"
                               f"{same[0]['label']!r}, but measured with "
                               f"{measures_text(measured(same[0]['config']))}: trained again")
                # the same run in another study (the baseline): reuse it under this study's label
                if done:
                    tqdm.write(f"[{s.name}] {run.label}: same run as "
                               f"{done[0]['study']}/{done[0]['label']!r}, reused")
                    res.add({**done[0], "study": s.name, "label": run.label, "line": run.line,
                             "x": run.x, "baseline": run.baseline}, reused=True)
                else:
                    command = config_command(cfg)
                    tqdm.write(f"[{s.name}] {run.label} (seed {run.seed}): {command}")
                    # just before the run: speed drifts
                    machine["ref_img_s"] = round(reference_speed(), 1)
                    started = now()
                    run_dir = train_run(s.name, run, cfg, args, data, res.rows,
                                        machine["ref_img_s"])
                    res.add(make_row(s.name, run, cfg, run_dir, data, dict(machine), started))
                overall.update(1)
        except (KeyboardInterrupt, SystemExit) as e:
            if isinstance(e, SystemExit) and e.code != 130:
                raise
            overall.close()
            print(f"interrupted: finished runs are kept in {out}/; rerun the same command to "
                  f"continue (an interrupted run continues from its last.pt)", file=sys.stderr)
            raise SystemExit(130) from None
        overall.close()
    for s, res in plans:
        report(s, res, Path(args.fig_dir))


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------

def noise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The baseline's mean and the noise of a comparison, in accuracy points: the standard
    deviation s over the baseline's k seeds, the sampling error se of one accuracy on the n
    validation images (sqrt(p(1-p)/n)), one run's noise sqrt(s^2 + se^2), and the noise of a run
    minus the baseline's mean, sigma = sqrt(s^2 (1 + 1/k) + se^2). The rule: a difference is
    real when it is larger than 2 sigma."""
    accs = [r["val_acc"] for r in rows if r["baseline"]]
    k = len(accs)
    mean = statistics.mean(accs) if accs else math.nan
    sd = statistics.stdev(accs) if k >= 2 else math.nan
    n = next((r["val_images"] for r in rows if r["baseline"]), 0)
    se = 100 * math.sqrt(mean / 100 * (1 - mean / 100) / n) if n else math.nan
    return {"mean": mean, "sd": sd, "se": se, "k": k, "n": n,
            "run": math.sqrt(sd ** 2 + se ** 2),
            "sigma": math.sqrt(sd ** 2 * (1 + 1 / max(k, 1)) + se ** 2)}


def mean_sigma(nz: dict[str, float], m: int) -> float:
    """The noise of the mean of a change's m seeds minus the baseline's mean over k seeds,
    sqrt(s^2 (1/m + 1/k) + se^2): the seeds' spread averages out; the validation images'
    sampling error is kept whole, a conservative floor (runs scored on the same images share
    part of it, which cancels in a difference; the paired test sees only the rest)."""
    return math.sqrt(nz["sd"] ** 2 * (1 / m + 1 / max(nz["k"], 1)) + nz["se"] ** 2)


def seed_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The changes (not the baseline) that ran with two seeds or more: label -> their rows."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if not r["baseline"]:
            groups.setdefault(r["label"], []).append(r)
    return {label: rs for label, rs in groups.items() if len(rs) >= 2}


def display_names(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's name in a plot: its label, with its seed where the label has several."""
    several = {r["label"] for r in rows if r["baseline"]} | set(seed_groups(rows))
    return [f"{r['label']} (seed {r['seed']})" if r["label"] in several else r["label"]
            for r in rows]


def mcnemar(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Exact two-sided McNemar test of two runs on the same validation images: under "equally
    good", the images that exactly one of them gets right are that one's or the other's with
    probability 1/2 each; the p-value of the split seen (binomial, both tails)."""
    n = a["val_images"]
    right_a = np.unpackbits(np.frombuffer(bytes.fromhex(a["val_correct"]), np.uint8))[:n] == 1
    right_b = np.unpackbits(np.frombuffer(bytes.fromhex(b["val_correct"]), np.uint8))[:n] == 1
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    m, low = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(low + 1))
    return min(1.0, 2 * tail / 2 ** m) if m else 1.0


def paired_baseline(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The baseline run a row is paired with: the same seed (else the first), evaluated on the
    same validation images; None when their images differ (another --classes or --val-split)."""
    same = [b for b in rows if b["baseline"] and b["val_images"] == row["val_images"]
            and all(b["config"][k] == row["config"][k] for k in ("classes", "val_split"))]
    return next((b for b in same if b["seed"] == row["seed"]), same[0] if same else None)


def ordered_rows(study: Study, res: Results) -> list[dict[str, Any]]:
    """The study's rows in the order of its runs (those finished)."""
    by_label = {(r["label"], r["seed"]): r for r in res.rows}
    return [by_label[r.label, r.seed] for r in study.runs if (r.label, r.seed) in by_label]


def listed(items: list[str], most: int = 4) -> str:
    """A list for a message: the first few, and how many more."""
    more = len(items) - most
    return ", ".join(items[:most]) + (f" and {more} more" if more > 0 else "")


STRANGER_FIX = ("no run of the {study} study now (`python compare_configs.py --list`): renamed "
                "or removed since they were recorded. To bring a renamed run's row back, rerun "
                "the study's command: a run whose settings are unchanged is reused under its "
                "new label, not trained again")


def strangers(study: Study, res: Results) -> list[str]:
    """The rows of a results file that are no run of its study (a run renamed or removed since
    they were recorded), as "label (seed s)": the tables and plots leave them out."""
    runs = {(r.label, r.seed) for r in study.runs}
    return [f"{r['label']!r} (seed {r['seed']})" for r in res.rows
            if (r["label"], r["seed"]) not in runs]


def table(study: Study, res: Results) -> str:
    """The study's table (in Chinese, for the guide), with its noise and its machine."""
    rows = ordered_rows(study, res)
    nz = noise(rows)
    first = min(rows, key=lambda r: r["started"])
    ref0 = first["machine"]["ref_img_s"]
    lines = [f"### {res.name}: {study.question}", "",
             "| 运行 | 种子 | 验证准确率 | 与基线均值之差 | 超出 2σ？ | 配对检验 p | "
             "测试准确率 | 看过的图像 | 训练 img/s（dropout / 全部 token） | 训练 / 评估 秒 | "
             "参数量 | MFLOPs/图 | 参照速度 img/s | 开始 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = r["val_acc"] - nz["mean"]
        pair = None if r["baseline"] else paired_baseline(r, rows)
        real = "基线" if r["baseline"] else ("—" if pair is None else
                                            "未知" if math.isnan(nz["sigma"]) else
                                            "是" if abs(delta) > 2 * nz["sigma"] else "否")
        diff = "—" if pair is None and not r["baseline"] else f"{delta:+.2f}"
        p = f"{mcnemar(r, pair):.2g}" if pair else "—"
        ph = r["phases"]
        speed = (f"{ph['drop_img_s']:.0f} / {ph['full_img_s']:.0f}" if ph["drop_img_s"]
                 else f"— / {ph['full_img_s']:.0f}")
        ref = r["machine"]["ref_img_s"]
        flag = " ⚠" if abs(ref / ref0 - 1) > DRIFT else ""
        lines.append(f"| {r['label']} | {r['seed']} | {r['val_acc']:.2f}% | {diff} | "
                     f"{real} | {p} | {r['test_acc']:.2f}% | {r['images_seen'] / 1000:,.0f}k | "
                     f"{speed} | {ph['train_s']:.0f} / {ph['eval_s']:.0f} | {r['params']:,} | "
                     f"{r['mflops']:.1f} | {ref:.0f}{flag} | "
                     f"{r['started'][5:16].replace('T', ' ')} |")
    groups = seed_groups(rows) if study.mean_rows else {}
    for label, rs in groups.items():
        acc = statistics.mean(r["val_acc"] for r in rs)
        sigma = mean_sigma(nz, len(rs))
        paired = all(paired_baseline(r, rows) for r in rs)  # the baseline's validation images
        diff = f"{acc - nz['mean']:+.2f}" if paired else "—"
        real = ("—" if not paired else "未知" if math.isnan(sigma) else
                "是" if abs(acc - nz["mean"]) > 2 * sigma else "否")
        lines.append(
            f"| {label}：{len(rs)} 个种子的均值 | {', '.join(str(r['seed']) for r in rs)} | "
            f"{acc:.2f}% | {diff} | {real} | — | "
            f"{statistics.mean(r['test_acc'] for r in rs):.2f}% | "
            f"{statistics.mean(r['images_seen'] for r in rs) / 1000:,.0f}k | — | — | "
            f"{rs[0]['params']:,} | {rs[0]['mflops']:.1f} | — | — |")
    cfg = first["config"]
    refs = [r["machine"]["ref_img_s"] for r in rows]
    vit = next((r["config"] for r in rows if r["config"]["full_token_frac"]), cfg)
    noise_text = (
        f"基线：{nz['k']} 个种子，验证准确率均值 {nz['mean']:.2f}%，"
        f"种子间标准差 s = {nz['sd']:.2f}；{nz['n']:,} 张验证图像的抽样误差 "
        f"se = {nz['se']:.2f}；一次运行与基线均值之差的噪声 "
        f"σ = √(s²(1 + 1/k) + se²) = {nz['sigma']:.2f} 个百分点。"
        f"规则：差值超过 2σ = {2 * nz['sigma']:.2f} 才算真实的差别。"
        "配对检验：与同一种子的基线在同样的验证图像上逐张比较对错"
        "（McNemar 精确检验），只反映验证集的抽样，不含种子间的波动。")
    if nz["k"] == 0:
        noise_text = ("基线：尚未运行，这张表还不能与基线比较（“与基线均值之差”一栏为“—”）。")
    elif nz["k"] < 2:  # the seeds' spread is not measured yet: no rule can decide
        noise_text = (
            f"基线：目前只有 {nz['k']} 个种子，验证准确率 {nz['mean']:.2f}%；种子间的波动未测量"
            f"（至少要两个种子），所以这张表还不能判断哪个差别是真的（“超出 2σ？”一栏为“未知”）。"
            f"{nz['n']:,} 张验证图像的抽样误差 se = {nz['se']:.2f}：只算它，两次运行之差的噪声是 "
            f"√2·se = {math.sqrt(2) * nz['se']:.2f} 个百分点，真实的噪声只会更大。"
            "配对检验：与同一种子的基线在同样的验证图像上逐张比较对错"
            "（McNemar 精确检验），只反映验证集的抽样，不含种子间的波动。")
    days = [r["started"][:10] for r in rows]
    flagged = any(abs(r / ref0 - 1) > DRIFT for r in refs)
    span = f"{min(refs):.0f}" + (f"-{max(refs):.0f}" if max(refs) > min(refs) else "")
    budget_line = (
        "预算：每次运行 " + (f"{cfg['time_budget']:g} 分钟" if cfg["time_budget"]
                            else f"{cfg['epochs']} 个 epoch")
        + ("的训练时间（评估和保存不计时）" if cfg["time_budget"] else "")
        + f"；warmup 占 {cfg['warmup_frac']:.0%}，"
        f"最后 {vit['full_token_frac']:.0%} 不用 patch dropout（ViT）。"
        f"机器：{first['machine']['cpu']}，参照速度 {span} img/s（`python benchmark.py model`）"
        + (f"；⚠：与本研究第一次运行（{ref0:.0f}）相差超过 {DRIFT:.0%}。" if flagged else "。")
        + f"运行于 {' 至 '.join(sorted({min(days), max(days)}))}。")
    if groups and nz["k"] >= 2:
        noise_text += ("“均值”一行：一个改动的 m 个种子的平均，它与基线均值之差的噪声取 "
                       "σ_m = √(s²(1/m + 1/k) + se²)（种子间的波动被平均；"
                       "验证图的抽样误差整个保留，偏保守：同一批图上的两次运行共有其中一部分，"
                       "相减时抵消；配对检验只看不抵消的部分），"
                       + "，".join(
                           f"m = {m} 时 2σ_m = {2 * mean_sigma(nz, m):.2f}"
                           for m in sorted({len(rs) for rs in groups.values()})) + "。")
    lines += ["", noise_text, "", budget_line]
    return "\n".join(lines) + "\n"


def plot(study: Study, res: Results, path: Path) -> None:
    """Bars (or lines) of validation accuracy from zero, each run with its noise."""
    rows = ordered_rows(study, res)
    nz = noise(rows)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.8) if study.plot == "bars"
                           else (6.5, 4.4))
    each = budget_text(rows[0]["config"]) + " per run"
    if rows[0]["config"]["time_budget"]:
        each += " (training time)"
    if study.plot == "bars":
        names = display_names(rows)
        known = not math.isnan(nz["sigma"])  # one baseline seed: the noise is not measured
        ax.barh(range(len(rows)), [r["val_acc"] for r in rows], xerr=nz["run"] if known else None,
                capsize=3, color=["0.6" if r["baseline"] else "tab:blue" for r in rows])
        if known:
            ax.axvspan(nz["mean"] - 2 * nz["sigma"], nz["mean"] + 2 * nz["sigma"],
                       color="tab:orange", alpha=0.35)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("validation accuracy (%)\n" + (
            "orange band: baseline mean ± 2σ (within it: not a real difference);\nerror bars: "
            "one run's noise; " if known else "") + "grey: baseline seeds", fontsize=8)
        for i, r in enumerate(rows):
            ax.text(r["val_acc"] + (nz["run"] if known else 0.0) + 0.8, i, f"{r['val_acc']:.2f}",
                    va="center",
                    fontsize=8)
    else:
        # one point per x: the mean over seeds, error bar: the seeds' standard deviation, or one
        # run's noise; with two lines, each value on the side away from the other line (more
        # lines would overlap: the table has the values)
        accs: dict[tuple[str, float], list[float]] = {}  # (line, x): the seeds' accuracies
        for r in rows:
            if r["line"]:
                accs.setdefault((r["line"], r["x"]), []).append(r["val_acc"])
        means = {k: statistics.mean(a) for k, a in accs.items()}
        lines = list(dict.fromkeys(line for line, _ in accs))
        for line in lines:
            xs = sorted(x for ln, x in accs if ln == line)
            err = [statistics.stdev(a) if len(a) > 1 else nz["run"]
                   for a in (accs[line, x] for x in xs)]
            ys = [means[line, x] for x in xs]
            ax.errorbar([100 * x for x in xs], ys, yerr=err, fmt="o-", capsize=4, label=line)
            for x, m in zip(xs, ys, strict=True) if len(lines) <= 2 else ():
                other = [v for (ln, ox), v in means.items() if ln != line and ox == x]
                below = bool(other) and m < max(other)
                ax.annotate(f"{m:.1f}", (100 * x, m), textcoords="offset points",
                            xytext=(0, -14 if below else 7), ha="center", fontsize=8)
        ax.set_xscale("log")
        ticks = sorted({100 * r["x"] for r in rows if r["line"]})
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        n = max((r["train_images"] for r in rows if r["line"] and r["x"] == 1.0), default=0) or max(
            r["train_images"] / r["x"] for r in rows if r["line"])  # all of them, as counted
        ax.set_xlabel(f"fraction of the {n:,.0f} training images (error bars: the seeds' standard "
                      f"deviation, or one run's noise)", fontsize=8)
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{res.name}: {each};\n" + (
        f"noise σ = {nz['sigma']:.2f} points ({nz['k']} baseline seeds)"
        if not math.isnan(nz["sigma"]) else
        f"{nz['k']} baseline seed: noise not measured yet, no difference can be called real"),
        fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_views(study: Study, timed: Results, epochs: Results, path: Path) -> None:
    """The two views of cost side by side, each run's accuracy against its compute per image:
    at equal training time (what a CPU user has) and at an equal number of epochs (equal images
    seen)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, res in zip(axes, (timed, epochs), strict=True):
        rows = ordered_rows(study, res)
        nz = noise(rows)
        firsts = sorted({r["label"]: r for r in reversed(rows)}.values(),
                        key=lambda r: r["mflops"])
        crowded = False  # a point close to the one before it gets its label above, not below
        for i, r in enumerate(firsts):
            accs = [q["val_acc"] for q in rows if q["label"] == r["label"]]
            ax.errorbar(r["mflops"], statistics.mean(accs), yerr=nz["run"], fmt="o", capsize=3,
                        color="0.4" if r["baseline"] else "tab:blue")
            crowded = i > 0 and r["mflops"] < 1.3 * firsts[i - 1]["mflops"] and not crowded
            ax.annotate(f"{r['label']}\n{statistics.mean(accs):.1f}%", (r["mflops"],
                        statistics.mean(accs)), textcoords="offset points",
                        xytext=(6, 10) if crowded else (6, -22), fontsize=8)
        ax.set_xscale("log")
        ax.minorticks_off()
        flops = [f for i, f in enumerate(sorted({r["mflops"] for r in rows}))
                 if i == 0 or f >= 1.3 * sorted({r["mflops"] for r in rows})[i - 1]]
        ax.set_xticks(flops, [f"{f:g}" for f in flops])
        ax.set_xlim(flops[0] / 1.6, flops[-1] * 3.5)  # room for the labels on the right
        ax.set_xlabel("forward MFLOPs per image (log scale)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        view = ("equal training time" if rows[0]["config"]["time_budget"]
                else "equal images seen")
        ax.set_title(f"{view}: {budget_text(rows[0]['config'])} per run", fontsize=10)
    axes[0].set_ylabel("validation accuracy (%)\n(error bars: one run's noise)")
    fig.suptitle(f"{study.name}: the same runs under two budgets", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def has_gap_curve(row: dict[str, Any]) -> bool:
    """Whether a row was trained with --eval-train (its curve has the train/val gap)."""
    return any("train_eval_acc" in h for h in row.get("curve", []))


def has_gap_curves(study: Study, res: Results) -> bool:
    return any(has_gap_curve(r) for r in ordered_rows(study, res))


def plot_curves(study: Study, res: Results, path: Path) -> None:
    """The train/validation gap along each run (rows trained with --eval-train): accuracy on
    training images as they are and on validation images, against training minutes; and their
    difference. A gap that grows while validation accuracy stalls is overfitting."""
    rows = [r for r in ordered_rows(study, res) if has_gap_curve(r)]
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (r, name) in enumerate(zip(rows, display_names(rows), strict=True)):
        pts = [h for h in r["curve"] if "train_eval_acc" in h and "eval_acc" in h]
        t = [h["elapsed_min"] for h in pts]
        train = [100 * h["train_eval_acc"] for h in pts]
        val = [100 * h["eval_acc"] for h in pts]
        color = f"C{i % 10}"
        ax.plot(t, train, "-", color=color, label=name)
        ax.plot(t, val, "--", color=color)
        gap.plot(t, [a - b for a, b in zip(train, val, strict=True)], "-", color=color,
                 label=name)
    counts = sorted({h.get("train_eval_images", r["config"].get("eval_train", 0))
                     for r in rows for h in r["curve"] if "train_eval_acc" in h} - {0})
    n = "/".join(f"{c:,}" for c in counts) or "some"
    ax.set_xlabel("training minutes")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"solid: {n} training images as they are; dashed: validation images\n"
                 "(a subset between epochs, all at the end)", fontsize=9)
    gap.set_xlabel("training minutes")
    gap.set_ylabel("train minus validation accuracy (points)")
    gap.set_title("the train/validation gap", fontsize=9)
    for a in (ax, gap):
        a.grid(alpha=0.3)
    gap.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{res.name}: {budget_text(rows[0]['config']) if rows else ''} per run "
                 "(training time)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(study: Study, res: Results, fig_dir: Path) -> None:
    if not res.rows:
        return
    left_out = strangers(study, res)
    if left_out:
        print(f"{res.path}: left out of the table and plots: {listed(left_out)}, "
              f"{STRANGER_FIX.format(study=study.name)}", file=sys.stderr)
    if len(left_out) == len(res.rows):  # (--report refuses such a file before writing anything)
        return
    text = table(study, res)
    print("\n" + text)
    res.table_path.write_text(text)
    print(f"table {res.table_path}, plots " + ", ".join(map(str, draw(study, res, fig_dir))))


def draw(study: Study, res: Results, fig_dir: Path, views: bool = True) -> list[Path]:
    """Every plot of a study's results file, from its rows of the study's runs: the accuracies,
    the train/validation gap (rows trained with --eval-train), and both budgets side by side
    (with `views`, when the other budget's file has rows too). Returns the files written."""
    if not ordered_rows(study, res):
        return []
    written = [plot_path(fig_dir, res.name)]
    plot(study, res, written[-1])
    if has_gap_curves(study, res):
        written.append(plot_path(fig_dir, f"{res.name}_curves"))
        plot_curves(study, res, written[-1])
    timed, epochs = (Results(res.path.parent, n) for n in (study.name, f"{study.name}_epochs"))
    if views and ordered_rows(study, timed) and ordered_rows(study, epochs) and (
            study.plot == "bars"):
        written.append(plot_path(fig_dir, f"{study.name}_views"))
        plot_views(study, timed, epochs, written[-1])
    return written


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", nargs="+", choices=list(STUDIES),
                   help="the studies to run (several allowed)")
    p.add_argument("--list", action="store_true",
                   help="print the studies and their runs, then exit")
    p.add_argument("--report", action="store_true",
                   help="only write the tables and plots of the finished rows of the studies "
                        "(of --budget-min M or --epochs E) in --out; train nothing")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-min", type=float,
                        help="minutes of training per run (equal wall time)")
    budget.add_argument("--epochs", type=int, help="epochs per run (equal epochs, e.g. on a GPU)")
    p.add_argument("--data-dir", default="data",
                   help="CIFAR-10, as in train_cifar10.py (default: data)")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help="download CIFAR-10 when --data-dir holds none (default: off)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="change the baseline of every run, e.g. --set batch_size=256 "
                        "model=vit_cifar_small (not the seeds, the budget or where files go: "
                        "the study and the flags here set those; nor a setting the chosen "
                        "studies vary)")
    p.add_argument("--out", default="outputs/results",
                   help="folder of the results files STUDY.json and tables STUDY.md (default: "
                        "outputs/results; the guide's own tables: --out results)")
    p.add_argument("--fig-dir", default="outputs/figures",
                   help="folder of the plots study_STUDY.png (default: outputs/figures; the "
                        "guide's own plots: --fig-dir figures)")
    p.add_argument("--checkpoint-dir", default="checkpoints/compare",
                   help="run checkpoints go to DIR/STUDY/")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p.parse_args(argv)


def list_studies() -> None:
    for s in STUDIES.values():
        print(f"{s.name}: {s.question}")
        for r in s.runs:
            change = (", ".join(f"{k}={v}" for k, v in r.changes.items() if v is not None)
                      or "baseline")
            print(f"    {r.label:<28s} seed {r.seed}  {change}")
    print(f"baseline: {config_command(TrainConfig(**BASE))}")


def _main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.list:
        list_studies()
        return
    if not args.study:
        raise ValueError("name at least one --study (or --list to see them)")
    if args.budget_min is None and args.epochs is None:
        raise ValueError("give the budget of every run: --budget-min M (equal time) or --epochs E")
    if args.budget_min is not None and not (math.isfinite(args.budget_min)
                                            and args.budget_min > 0):
        raise ValueError(f"--budget-min must be a positive number of minutes, got "
                         f"{args.budget_min}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.report:
        report_only(args)
        return
    args.set = parse_settings(args.set)
    for name in args.set:
        if name in STUDY_SETS:
            raise ValueError(f"--set {name}: the study sets it; {STUDY_SETS[name]}")
        for study in args.study:
            run = varied_settings(STUDIES[study]).get(name)
            if run is not None:
                raise ValueError(
                    f"--set {name}: the {study} study varies it (its run {run.label!r} sets "
                    f"{name}={run.changes[name]}); a --set would change its other runs too, "
                    f"the baseline included, and mislabel their rows: leave it out")
    run_studies(args)


def report_only(args: argparse.Namespace) -> None:
    """--report: the tables and plots of the studies' finished rows; every file is checked
    before anything is written, and nothing is trained."""
    if args.set:
        raise ValueError("--report trains nothing: --set has no effect there, leave it out")
    budget = ({"time_budget": args.budget_min, "epochs": 1000} if args.budget_min
              else {"time_budget": 0.0, "epochs": args.epochs})
    check_folder(Path(args.fig_dir), "--fig-dir")
    plans = []
    for name in args.study:
        res = Results(Path(args.out), results_name(name, budget))
        if not res.rows:
            raise ValueError(f"{res.path} holds no finished runs: nothing to report")
        check_budget(res.rows, budget, str(res.path))
        left_out = strangers(STUDIES[name], res)
        if len(left_out) == len(res.rows):
            raise ValueError(f"{res.path}: nothing to report, none of its rows is a run of the "
                             f"study now: {listed(left_out)}, "
                             f"{STRANGER_FIX.format(study=name)}")
        check_not_folders([res.table_path], "--out")
        check_not_folders(figure_paths(Path(args.fig_dir), STUDIES[name], res), "--fig-dir")
        plans.append((STUDIES[name], res))
    for study, res in plans:
        report(study, res, Path(args.fig_dir))


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
