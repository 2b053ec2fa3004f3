"""Every figure of the guide, regenerated from files in the repository by one command:

    python make_figures.py --data-dir data                   # into outputs/figures (not tracked)
    python make_figures.py --data-dir data --out-dir figures # replace the guide's own figures

- the attention figures of docs/figures.md (the paper's Figure 7, Figure 6 and per-head maps):
  visualize_attention.py on the shipped model and 128 CIFAR-10 test images;
- the screenshot of the attention explorer (explorer.png): visualize_attention.py --html on the
  shipped model and the bundled photos, opened in headless Chromium (browser.py); left out, with
  the reason printed, where no Chromium, chromedriver or selenium is installed;
- the shipped model's confusion matrix on the 10,000 test images (train_cifar10.py --eval-only);
- the study plots of docs/studies.md from results/*.json (compare_configs.py's own plotting: no
  training; the tables in results/ are left as they are);
- with --run checkpoints/RUN/last.pt, the accuracy curve of that training run (the curve is the
  run's history, which only its own checkpoint holds: the shipped model keeps the weights).

CIFAR-10 must be under --data-dir (the guide's figures are made on its test images; --download
fetches it). Every input is read and checked before the first file is written. The figures of
older results (figures/previous/) are not redrawn.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import browser
import compare_configs as cc
import visualize_attention
from checkpoint import load_checkpoint
from config import TrainConfig
from data import BUNDLED_SAMPLES, image_files, load_dataset
from inference import SHIPPED_MODEL
from plots import save_curve_png
from runtime import run_cli
from train_cifar10 import evaluate_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data",
                   help="CIFAR-10, as in train_cifar10.py (default: data)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into --data-dir when it is not there")
    p.add_argument("--out-dir", default="outputs/figures",
                   help="where the PNG files go (default: outputs/figures; the guide's own "
                        "figures: --out-dir figures, which replaces them)")
    p.add_argument("--results", default="results",
                   help="folder of the studies' results files STUDY.json (default: results)")
    p.add_argument("--run", help="a training run's last.pt or best.pt: also draw its accuracy "
                                 "curve (cpu_accuracy_curve.png)")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (or set VIT_DEBUG=1)")
    return p.parse_args(argv)


# What the screenshot shows: the cat (the one bundled photo of a CIFAR-10 class), its query patch
# on the cat's left eye (row 4, column 4 of the 8 x 8 grid), the last layer, the mean over heads.
EXPLORER_VIEW = {"file": "cat_chelsea.jpg", "query": 3 * 8 + 3, "layer": 6, "head": "mean"}


def shipped_model() -> str:
    """The shipped model's path as the figures' titles show it: relative to the working folder
    (checkpoints/vit_cifar_tiny_cpu.pt from the repository root), not this machine's full path."""
    return os.path.relpath(SHIPPED_MODEL)


def draw_explorer(png: Path) -> None:
    """The explorer page of the shipped model and the bundled photos, written to a temporary
    folder, and its screenshot as png."""
    files = image_files(BUNDLED_SAMPLES)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "explorer.html"
        visualize_attention.main(["--checkpoint", shipped_model(), "--images",
                                  *map(str, files), "--html", str(page)])
        view = {k: v for k, v in EXPLORER_VIEW.items() if k != "file"}
        view["image"] = [f.name for f in files].index(EXPLORER_VIEW["file"])
        browser.screenshot_explorer(page, png, view)


def make_all(args: argparse.Namespace) -> list[Path]:
    out = Path(args.out_dir)
    # every input read and checked before the first file is written
    load_dataset(args.data_dir, download=args.download, with_train=False)
    studies = [(cc.STUDIES[p.stem.removesuffix("_epochs")], cc.Results(p.parent, p.stem))
               for p in sorted(Path(args.results).glob("*.json"))
               if p.stem.removesuffix("_epochs") in cc.STUDIES]
    history = load_checkpoint(args.run, required=("history",))["history"] if args.run else None
    full = [h["eval_acc"] for h in history or [] if h.get("eval_images")]
    if history is not None and not full:
        raise ValueError(f"{args.run} holds no evaluation to draw")
    no_browser = browser.unavailable()

    written = list(visualize_attention.main(
        ["--checkpoint", shipped_model(), "--data-dir", args.data_dir,
         "--out-dir", str(out)]).values())
    png = out / "cpu_confusion_matrix.png"
    evaluate_checkpoint(TrainConfig(data_dir=args.data_dir, download=False, tta_flip=False),
                        SHIPPED_MODEL, png=png)
    written.append(png)
    for study, res in studies:  # the plots only: the tables in results/ stay as they are
        written += cc.draw(study, res, out, views=res.name == study.name)  # views: once a study
    if no_browser:
        print(f"explorer.png left out: {no_browser}")
    else:
        written.append(out / "explorer.png")
        draw_explorer(written[-1])
    if history is not None:
        written.append(out / "cpu_accuracy_curve.png")
        save_curve_png(history, written[-1], f"{Path(args.run).parent.name}: best "
                                             f"{100 * max(full):.2f}%")
    print(f"{len(written)} figures in {out}")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    return run_cli(lambda a: make_all(parse_args(a)), argv)


if __name__ == "__main__":
    main()
