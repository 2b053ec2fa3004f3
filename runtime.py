"""What every script needs around its work: the one command-line error wrapper, the device and
autocast, a clean stop on Ctrl-C or SIGTERM, and W&B logging that never stops a run."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from data import DataNotFoundError
from vit_model import DownloadError

T = TypeVar("T")

# What a user can cause and mend: a bad flag, a missing or unwritable file or folder, a full disk,
# a missing data set, no network, a run that diverged. Anything else is a bug and keeps its
# traceback.
USER_ERRORS = (ValueError, OSError, DataNotFoundError, DownloadError, FloatingPointError)


def run_cli(main: Callable[[list[str]], T], argv: list[str] | None = None,
            hint: Callable[[Exception], str] | None = None) -> T:
    """Run a script's main(argv): a user error becomes one line `error: ...` on stderr and exit
    code 2 (with --debug or VIT_DEBUG=1, the full traceback); `hint` may add a sentence."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except BrokenPipeError:  # `... | head`, or a pager that quit: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: the output was closed (`| head` or a pager that quit), so the command "
              "stopped; what it had saved is kept", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits itself)
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if "--debug" in argv or os.environ.get("VIT_DEBUG"):
            raise
        msg = " ".join(str(e).split()) + (hint(e) if hint else "")
        print("error: " + msg, file=sys.stderr)
        raise SystemExit(2) from None


def setup_device(device: str = "auto", threads: int = 0) -> tuple[torch.device, int, int]:
    """Device, rank and world size; initialises DDP when launched by torchrun."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
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
    if threads:
        torch.set_num_threads(threads)
    return torch.device("cpu"), rank, world


def amp_context(amp: str, device: torch.device) -> tuple[Any, torch.dtype | None]:
    """The autocast context of --amp on this device, and its dtype (None: full precision)."""
    mode = ("bf16" if device.type == "cuda" else "off") if amp == "auto" else amp
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use bf16 or off on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]
    if dtype is None:
        return contextlib.nullcontext(), None
    return torch.autocast(device.type, dtype=dtype), dtype


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
        print("\nstop requested: stopping after this step; last.pt keeps every finished epoch and "
              "the current one will be redone on --resume (Ctrl-C again to abort at once)",
              file=sys.stderr)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class SafeWandb:
    """W&B logging that never kills training: any failure becomes one warning."""

    def __init__(self, mode: str, project: str, name: str, folder: str, run_id: str | None,
                 config: dict[str, Any]) -> None:
        """mode 'off' (or DDP processes other than rank 0): nothing is logged."""
        self.run = None
        if mode == "off":
            return
        try:
            import wandb

            if mode == "online":  # a slow or missing network would otherwise look like a hang
                print("connecting to W&B online (at most 30 s; --wandb offline needs no network)",
                      file=sys.stderr)
            self.run = wandb.init(project=project, name=name, dir=folder, mode=mode, id=run_id,
                                  resume="allow", config=config,
                                  settings=wandb.Settings(init_timeout=30))
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
