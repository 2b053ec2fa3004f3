"""The training script's figures: the accuracy curve of a run and a confusion matrix; and
`pyplot()`, matplotlib on a file-only backend, for every script that draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Write a figure (and close it); a failed write names the file."""
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        pyplot().close(fig)


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
    save_figure(fig, path)


def save_curve_png(history: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = pyplot()
    ev = [h for h in history if "eval_acc" in h]
    n_full = max((h.get("eval_images", 0) for h in ev), default=0)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([h["epoch"] for h in history], [100 * h["train_acc"] for h in history],
            label="train (augmented)")
    ax.plot([h["epoch"] for h in ev], [100 * h["eval_acc"] for h in ev], "-", color="C1")
    for part in (True, False):  # hollow markers: evaluated on a subset (--eval-subset)
        hs = [h for h in ev if (h.get("eval_images", n_full) < n_full) == part]
        if hs:
            n = hs[0].get("eval_images")
            ax.plot([h["epoch"] for h in hs], [100 * h["eval_acc"] for h in hs], "o", color="C1",
                    mfc="none" if part else "C1",
                    label=f"evaluation ({n:,} images)" if n else "evaluation")
    for h in ev[-1:]:
        title += f"\nlast: {100 * h['eval_acc']:.2f}% after {h['elapsed_min']:.1f} min of training"
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    save_figure(fig, path)
