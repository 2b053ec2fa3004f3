"""The record of experiments: the machine a run was measured on (its CPU and its speed on a fixed
reference) and the experiments log, one CSV row per training run.

The log (OUT_DIR/experiments.csv by default, --log-csv) opens in a spreadsheet or imports into
Notion as a database: when, which command, the settings that differ from the preset, accuracy,
time, images per second, machine and reference speed. A row is added under a lock by writing the
whole file anew and renaming it over the old one: an earlier row is never lost, and a reader sees
the old file or the new one, never half of it.
"""

from __future__ import annotations

import csv
import fcntl
import io
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from checkpoint import atomic_write
from vit_model import vit_cifar

# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def train_step_timer(model: torch.nn.Module, x: torch.Tensor,
                     y: torch.Tensor) -> Callable[[], float]:
    """A function that times one training step (forward, backward, AdamW) of model on (x, y)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step()  # warm-up
    return step


def reference_speed(rounds: int = 10, batch: int = 128) -> float:
    """The machine's speed on a fixed reference, in images/s: vit_cifar_tiny forward +
    backward + AdamW step, fp32 on the CPU, batch 128, the fastest of `rounds` steps (what
    `python benchmark.py model` times for the CIFAR preset). The fastest step, not the median:
    on a shared virtual machine the median of a few steps moved by a third within an hour
    while training speed moved by 7%; the fastest is what the machine can do. Wall-clock
    results are reported next to it."""
    step = train_step_timer(vit_cifar("vit_cifar_tiny").train(), torch.randn(batch, 3, 32, 32),
                            torch.randint(0, 10, (batch,)))
    return batch / min(step() for _ in range(rounds))


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), with ', AVX-512' when it has AVX-512F."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    return name + (", AVX-512" if " avx512f" in info else "")


# --------------------------------------------------------------------------------------------
# The experiments log
# --------------------------------------------------------------------------------------------

# clock_min: the minutes --time-budget counts (training only with --clock train, else wall time)
COLUMNS = ("started", "finished", "status", "run", "command", "preset", "changes", "model",
           "seed", "eval_set", "best_acc", "epochs", "clock_min", "wall_min", "images_per_sec",
           "device", "cpu", "ref_img_s", "torch")
HEADER = ",".join(COLUMNS) + "\r\n"  # csv.writer's line ending


def now() -> str:
    """The local time as the log and the results files write it (ISO 8601, with the offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log_path(log_csv: str, out_dir: str) -> Path | None:
    """Where a run's row goes: --log-csv, OUT_DIR/experiments.csv by default, none for 'off'."""
    if log_csv == "off":
        return None
    return Path(log_csv) if log_csv else Path(out_dir) / "experiments.csv"


def check_log(path: Path) -> None:
    """Fail before training, not after it, when the log cannot take a row: a folder in the way,
    or a file that is not a log of these columns."""
    if path.is_dir():
        raise ValueError(f"--log-csv {path} is a folder: give a file (or 'off')")
    if path.is_file():
        with open(path, newline="") as f:
            first = f.readline()
        if first.rstrip("\r\n") != HEADER.rstrip("\r\n"):
            raise ValueError(f"--log-csv {path} is not an experiments log of these columns "
                             f"({', '.join(COLUMNS)}); it was left as it is: give another file "
                             f"(or 'off')")


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add one row (the COLUMNS; missing ones empty) to the log: under a lock, the old content
    and the new row go to a temporary file that then replaces the log whole (the file a
    symbolic link points to, not the link)."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = io.StringIO()
    csv.writer(line).writerow(["" if row.get(c) is None else row[c] for c in COLUMNS])
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other runs wait; closing the file releases it
        check_log(path)
        old = path.read_bytes() if path.is_file() else HEADER.encode()
        if not old.endswith(b"\n"):
            old += b"\r\n"
        atomic_write(path, old + line.getvalue().encode())


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a log."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
