"""Side-by-side speed checks, each against a reference on the same input in one run.

    python benchmark.py model                      # forward + backward: ours vs torchvision ViT
    python benchmark.py data --data-dir data   # augmentation: ours vs DataLoader + PIL
    python benchmark.py recipe --data-dir data --minutes 15  # standard recipe, to compare

Timings alternate between the two contestants and report medians, so a busy machine slows both
alike; the ratio is the number to read. `recipe` is the baseline for an equal-time comparison with
`python train_cifar10.py --preset cpu --time-budget M`: run the two back to back on one machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from data import CIFAR10_MEAN, CIFAR10_STD, load_dataset, normalize, rand_augment, random_crop_flip
from experiments import train_step_timer
from runtime import run_cli
from train_cifar10 import lr_at
from vit_model import VisionTransformer, vit_base, vit_cifar


def alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each function `rounds` times, interleaved; median seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    cases = [
        ("ViT-B/16, 224x224", args.batch_b16, vit_base(),
         torchvision.models.vit_b_16()),
        ("vit_cifar_tiny, 32x32", args.batch_cifar, vit_cifar("vit_cifar_tiny"),
         torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=6,
                                              num_heads=4, hidden_dim=128, mlp_dim=256,
                                              num_classes=10)),
    ]
    print(f"forward + backward + AdamW step, fp32, {device}, "
          f"median of {args.rounds} interleaved rounds")
    for name, batch, ours, ref in cases:
        ours: VisionTransformer
        size = ours.config.img_size
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, ours.config.num_classes, (batch,), device=device)
        res = alternate({"ours": train_step_timer(ours.to(device).train(), x, y),
                         "torchvision": train_step_timer(ref.to(device).train(), x, y)},
                        args.rounds)
        speedup = res["torchvision"] / res["ours"]
        print(f"  {name:<24s} batch {batch:>4d}: ours {batch / res['ours']:8.1f} img/s, "
              f"torchvision {batch / res['torchvision']:8.1f} img/s, "
              f"ratio ours/torchvision {speedup:.2f}x")


class PILCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: array -> PIL image -> transforms (and the
    label, when labels are given)."""

    def __init__(self, images: torch.Tensor, transform: Callable,
                 labels: torch.Tensor | None = None) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8
        self.transform = transform
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, int]:
        from PIL import Image

        image = self.transform(Image.fromarray(self.images[i]))
        return image if self.labels is None else (image, int(self.labels[i]))


def bench_data(args: argparse.Namespace) -> None:
    if args.data_dir:
        images = load_dataset(args.data_dir, download=False).train_x[: args.num_images]
    else:
        images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8)
    n, bs = len(images), args.batch_size
    if bs > n:  # no full batch: "ours" would time nothing
        raise ValueError(f"--batch-size {bs} is larger than the {n} images of a timing round")
    print(f"augmentation of {n} images, batch {bs}; "
          f"reference: DataLoader({args.workers} workers) + PIL")
    for policy in ("crop+flip", "crop+flip+RandAugment(2, 9)"):
        strong = "RandAugment" in policy
        pil = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        pil += [T.RandAugment(2, 9)] if strong else []
        pil += [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        loader = DataLoader(PILCifar(images, T.Compose(pil)), batch_size=bs, shuffle=True,
                            num_workers=args.workers, persistent_workers=args.workers > 0)

        def reference(loader: DataLoader = loader) -> float:
            t = time.perf_counter()
            for _ in loader:
                pass
            return time.perf_counter() - t

        def ours(strong: bool = strong) -> float:
            t = time.perf_counter()
            perm = torch.randperm(n)
            for i in range(0, n - bs + 1, bs):
                x = random_crop_flip(images[perm[i:i + bs]], 4, True)
                if strong:
                    x = rand_augment(x, 2, 9)
                normalize(x, CIFAR10_MEAN, CIFAR10_STD)
            return time.perf_counter() - t

        reference()  # start the workers
        res = alternate({"ours": ours, "reference": reference}, args.rounds)
        print(f"  {policy:<30s} ours {n / res['ours']:9.0f} img/s, "
              f"reference {n / res['reference']:7.0f} img/s, "
              f"ratio {res['reference'] / res['ours']:.1f}x")


def bench_recipe(args: argparse.Namespace) -> None:
    """The standard recipe a user would write: torchvision's ViT of the CPU preset's size (D=128, 6
    layers, 4 heads, MLP 256, patch 4, [CLS]), torchvision transforms (random crop, flip) through a
    DataLoader with 2 workers, AdamW (lr 1e-3, weight decay 0.05), label smoothing 0.1, one epoch of
    linear warmup, then a cosine decay over the wall-clock budget (so it also ends its decay on
    time). Prints the test accuracy after `--minutes` of training (evaluation at the end, not
    counted)."""
    torch.manual_seed(0)
    data = load_dataset(args.data_dir, download=False)
    if args.batch_size > len(data.train_x):  # no full batch: not one step would be taken
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set of "
                         f"{args.data_dir} ({len(data.train_x)} images)")
    train = PILCifar(data.train_x,
                     T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]), data.train_y)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=6,
                                                 num_heads=4, hidden_dim=128, mlp_dim=256,
                                                 num_classes=len(data.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    budget, warmup = args.minutes * 60, len(loader)
    t0, step, epoch, done = time.time(), 0, 0, False
    while not done:
        model.train()
        for x, y in loader:
            progress = min((time.time() - t0) / budget, 1.0)
            lr = lr_at(step, progress, warmup, 1e-3, 1e-5)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress >= 1.0:
                done = True
                break
        epoch += 1
        print(f"epoch {epoch}: {step} steps, {(time.time() - t0) / 60:.1f} min, "
              f"loss {loss.item():.3f}", flush=True)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(data.test_x), 1000):
            x = normalize(data.test_x[i:i + 1000], CIFAR10_MEAN, CIFAR10_STD)
            correct += (model(x).argmax(1) == data.test_y[i:i + 1000]).sum().item()
    print(f"standard recipe: {100 * correct / len(data.test_x):.2f}% test accuracy "
          f"after {args.minutes} min of training ({epoch} epochs, {step} steps, "
          f"{step * args.batch_size / budget:.0f} img/s)")


def _main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (or set VIT_DEBUG=1)")
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", parents=[common],
                       help="forward + backward speed: ours vs torchvision")
    m.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when there is a GPU)")
    m.add_argument("--batch-b16", type=int, default=8, help="batch size for ViT-B/16")
    m.add_argument("--batch-cifar", type=int, default=128, help="batch size for the CIFAR preset")
    m.add_argument("--rounds", type=int, default=5,
                   help="interleaved timing rounds (median reported)")
    d = sub.add_parser("data", parents=[common],
                       help="augmentation speed: ours vs DataLoader + PIL transforms")
    d.add_argument("--data-dir",
                   help="CIFAR-10 (as in train_cifar10.py); random images if not given")
    d.add_argument("--num-images", type=int, default=10000, help="images per timing round")
    d.add_argument("--batch-size", type=int, default=256, help="batch size")
    d.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    d.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds (median reported)")
    r = sub.add_parser("recipe", parents=[common], help="the standard recipe (torchvision ViT + "
                       "DataLoader), for equal-time comparisons")
    r.add_argument("--data-dir", required=True, help="CIFAR-10 (as in train_cifar10.py)")
    r.add_argument("--minutes", type=float, default=15.0, help="training time")
    r.add_argument("--batch-size", type=int, default=128, help="batch size")
    r.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = p.parse_args(argv)
    for name in ("batch_b16", "batch_cifar", "rounds", "num_images", "batch_size", "minutes"):
        value = getattr(args, name, 1)
        if not (math.isfinite(value) and value > 0):  # not nan or inf minutes: they never end
            raise ValueError(f"--{name.replace('_', '-')} must be positive and finite, "
                             f"got {value}")
    if getattr(args, "workers", 0) < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA GPU that PyTorch can use; "
                         "use --device cpu")
    torch.manual_seed(0)
    {"model": bench_model, "data": bench_data, "recipe": bench_recipe}[args.what](args)


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
