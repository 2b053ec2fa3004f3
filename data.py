"""CIFAR-10 in memory, and batched augmentation drawn independently per sample.

The whole data set lives as one uint8 tensor (50,000 x 3 x 32 x 32 is 150 MB) on the training
device. Every augmentation below works on a whole batch at once, yet draws its randomness per
sample (crop offset, flip, RandAugment operation and sign, mixup/cutmix partner and ratio, erasing
box), so nothing is shared across a batch and no DataLoader workers are needed.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageData:
    """Images as uint8 (N, 3, H, W) and integer labels (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]


class DataNotFoundError(RuntimeError):
    pass


def _load_batches_py(folder: Path) -> ImageData:
    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d["labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return ImageData(train_x, train_y, test_x, test_y, CIFAR10_CLASSES)


def read_image(path: str | Path, size: int | None = None) -> Tensor:
    """One image file as uint8 (3, H, W), RGB, resized to size x size if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (3, H, W)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _load_split(folder: Path, classes: tuple[str, ...], size: int) -> tuple[Tensor, Tensor]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        files += found
        labels += [label] * len(found)
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without the GIL
        images = list(pool.map(lambda p: read_image(p, size), files))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _load_image_folder(root: Path, size: int, with_train: bool = True) -> ImageData:
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    test_classes = tuple(sorted(p.name for p in (root / "test").iterdir() if p.is_dir()))
    if classes != test_classes:
        raise DataNotFoundError(f"train/ and test/ under {root} hold different classes: "
                                f"{classes} vs {test_classes}")
    test_x, test_y = _load_split(root / "test", classes, size)
    if with_train:
        train_x, train_y = _load_split(root / "train", classes, size)
    else:
        train_x, train_y = test_x[:0], test_y[:0]
    return ImageData(train_x, train_y, test_x, test_y, classes)


def load_dataset(data_dir: str | Path, download: bool = True, img_size: int = 32,
                 with_train: bool = True) -> ImageData:
    """CIFAR-10 from `data_dir`, in whichever form is there:

    1. torchvision's `cifar-10-batches-py` folder (data_dir itself or inside it);
    2. an ImageFolder tree `train/<class>/*.jpg` and `test/<class>/*.jpg` (any classes; images
       resized to img_size);
    3. otherwise torchvision downloads CIFAR-10 into data_dir (when download is True).

    with_train=False skips decoding the training images of an ImageFolder tree (test set only).
    """
    root = Path(data_dir)
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            return _load_batches_py(folder)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _load_image_folder(root, img_size, with_train)
    options = (f"either torchvision's 'cifar-10-batches-py' folder or an ImageFolder tree with "
               f"'train/' and 'test/' in --data-dir (now {str(root)!r})")
    if not download:
        raise DataNotFoundError(f"no CIFAR-10 found: expected {options}")
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, ...)
        raise DataNotFoundError(
            f"no CIFAR-10 found and the download into {str(root)!r} failed ({type(e).__name__}: "
            f"{e}). Offline, put {options}."
        ) from e
    return _load_batches_py(root / "cifar-10-batches-py")


# --------------------------------------------------------------------------------------------
# Batched per-sample augmentation on uint8 (B, 3, H, W) tensors
# --------------------------------------------------------------------------------------------

def random_crop_flip(x: Tensor, pad: int = 4, flip: bool = True) -> Tensor:
    """Random crop after zero padding, and a horizontal flip, each drawn per sample.

    Both are one gather from the padded batch: output pixel (y, x) of sample b reads padded pixel
    (oy_b + y, ox_b + x), or (oy_b + y, ox_b + W-1-x) when b is flipped.
    """
    B, C, H, W = x.shape
    dev = x.device
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=dev)
    ox = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=dev)
    cols = torch.arange(W, device=dev).view(1, 1, W).expand(B, 1, W)  # (B, 1, W)
    if flip:
        mirror = torch.rand(B, 1, 1, device=dev) < 0.5
        cols = torch.where(mirror, W - 1 - cols, cols)
    rows = oy + torch.arange(H, device=dev).view(1, H, 1)  # (B, H, 1)
    idx = rows * (W + 2 * pad) + ox + cols  # (B, H, W), flat index into the padded image
    out = xp.flatten(2).gather(2, idx.view(B, 1, H * W).expand(B, C, H * W))  # (B, C, H*W)
    return out.view(B, C, H, W)


def warp(img: Tensor, a: float = 1.0, b: float = 0.0, c: float = 0.0, d: float = 0.0, e: float = 1.0,
         f: float = 0.0, fill: int = 128) -> Tensor:
    """Affine warp with nearest-neighbour sampling of a uint8 batch (B, C, H, W), one gather.

    Output pixel (x, y), taken relative to the image centre, reads input pixel
    (a x + b y + c, d x + e y + f); pixels from outside the image get `fill`.
    """
    B, C, H, W = img.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=img.device, dtype=torch.float32),
                            torch.arange(W, device=img.device, dtype=torch.float32), indexing="ij")
    cx, cy = (W - 1) / 2, (H - 1) / 2
    sx = (a * (xs - cx) + b * (ys - cy) + c + cx).round().long()  # (H, W)
    sy = (d * (xs - cx) + e * (ys - cy) + f + cy).round().long()
    inside = (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)
    idx = (sy.clamp(0, H - 1) * W + sx.clamp(0, W - 1)).flatten()  # (H*W,)
    out = img.flatten(2)[:, :, idx].view(B, C, H, W)
    return torch.where(inside, out, torch.full_like(out, fill))


def _rotate(img: Tensor, degrees: float) -> Tensor:
    t = math.radians(degrees)
    return warp(img, math.cos(t), math.sin(t), 0.0, -math.sin(t), math.cos(t), 0.0)


# RandAugment (Cubuk et al., 2020): name -> (op(img, v), magnitude at M=30, signed). Magnitude M in
# [0, 30] scales linearly as in torchvision's RandAugment (num_bins=31).
RANDAUG_OPS: dict[str, tuple[Callable[[Tensor, float], Tensor], float, bool]] = {
    "Identity": (lambda im, v: im, 0.0, False),
    "ShearX": (lambda im, v: warp(im, b=v), 0.3, True),
    "ShearY": (lambda im, v: warp(im, d=v), 0.3, True),
    "TranslateX": (lambda im, v: warp(im, c=round(v * im.shape[-1])), 0.45, True),
    "TranslateY": (lambda im, v: warp(im, f=round(v * im.shape[-2])), 0.45, True),
    "Rotate": (_rotate, 30.0, True),
    "Brightness": (lambda im, v: TF.adjust_brightness(im, 1.0 + v), 0.9, True),
    "Color": (lambda im, v: TF.adjust_saturation(im, 1.0 + v), 0.9, True),
    "Contrast": (lambda im, v: TF.adjust_contrast(im, 1.0 + v), 0.9, True),
    "Sharpness": (lambda im, v: TF.adjust_sharpness(im, 1.0 + v), 0.9, True),
    "Posterize": (lambda im, v: TF.posterize(im, 8 - int(round(v))), 4.0, False),
    "Solarize": (lambda im, v: TF.solarize(im, 255.0 - v), 255.0, False),
    "AutoContrast": (lambda im, v: TF.autocontrast(im), 0.0, False),
    "Equalize": (lambda im, v: TF.equalize(im), 0.0, False),
}


def rand_augment(x: Tensor, num_ops: int = 2, magnitude: int = 9) -> Tensor:
    """RandAugment with the operation and its sign drawn per sample.

    The batch is split by the drawn operation (and sign) so each operation runs once, batched,
    on just the samples that drew it.
    """
    names = list(RANDAUG_OPS)
    for _ in range(num_ops):
        op_ids = torch.randint(len(names), (x.shape[0],), device=x.device)
        negative = torch.rand(x.shape[0], device=x.device) < 0.5
        x = x.clone()
        for i, name in enumerate(names):
            fn, max_v, signed = RANDAUG_OPS[name]
            if name == "Identity":
                continue
            v = max_v * magnitude / 30.0
            for neg in ((False, True) if signed else (False,)):
                sel = (op_ids == i) & (negative == neg) if signed else op_ids == i
                idx = sel.nonzero().squeeze(1)
                if idx.numel():
                    x[idx] = fn(x[idx], -v if neg else v)
    return x


def normalize(x: Tensor, mean: tuple[float, ...] = CIFAR10_MEAN,
              std: tuple[float, ...] = CIFAR10_STD) -> Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W), per-channel standardised: (x/255 - mean) / std,
    computed in one fused pass as x * 1/(255 std) + (-mean/std)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return torch.addcmul(-m / s, x.float(), 1.0 / (255.0 * s))


def _boxes(B: int, H: int, W: int, h: Tensor, w: Tensor, device: torch.device) -> Tensor:
    """Per-sample boolean masks (B, 1, H, W) of boxes of size (h, w) at random places."""
    y0 = (torch.rand(B, device=device) * (H - h + 1)).floor()
    x0 = (torch.rand(B, device=device) * (W - w + 1)).floor()
    rows = torch.arange(H, device=device).view(1, H, 1)
    cols = torch.arange(W, device=device).view(1, 1, W)
    inside = ((rows >= y0.view(B, 1, 1)) & (rows < (y0 + h).view(B, 1, 1))
              & (cols >= x0.view(B, 1, 1)) & (cols < (x0 + w).view(B, 1, 1)))
    return inside.unsqueeze(1)


def random_erasing(x: Tensor, prob: float = 0.25, area: tuple[float, float] = (0.02, 1 / 3),
                   log_ratio: tuple[float, float] = (math.log(0.3), math.log(3.3))) -> Tensor:
    """Random erasing (Zhong et al., 2020) per sample, filling the box with Gaussian noise."""
    B, _, H, W = x.shape
    s = torch.empty(B, device=x.device).uniform_(*area) * H * W
    r = torch.empty(B, device=x.device).uniform_(*log_ratio).exp()
    h = (s * r).sqrt().round().clamp(1, H)
    w = (s / r).sqrt().round().clamp(1, W)
    mask = _boxes(B, H, W, h, w, x.device) & (torch.rand(B, 1, 1, 1, device=x.device) < prob)
    return torch.where(mask, torch.randn_like(x), x)


def mixup_cutmix(x: Tensor, y: Tensor, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019), chosen and mixed per sample.

    x: float (B, C, H, W); y: soft targets (B, K). Sample i is mixed with sample B-1-i, with its
    own ratio lambda ~ Beta(alpha, alpha); the targets are mixed by the same (pixel-area) ratio.
    """
    B, _, H, W = x.shape
    dev = x.device
    apply = torch.rand(B, device=dev) < prob
    use_cut = torch.rand(B, device=dev) < (0.5 if mixup_alpha > 0 and cutmix_alpha > 0
                                           else float(cutmix_alpha > 0))
    lam_mix = torch.distributions.Beta(max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3)).sample((B,)).to(dev)
    lam_cut = torch.distributions.Beta(max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3)).sample((B,)).to(dev)
    cut = (1.0 - lam_cut).sqrt()
    box = _boxes(B, H, W, (cut * H).round(), (cut * W).round(), dev)  # (B, 1, H, W)
    lam_cut = 1.0 - box.flatten(1).float().mean(1)  # area actually kept
    x2, y2 = x.flip(0), y.flip(0)
    mixed = torch.where(use_cut.view(B, 1, 1, 1), torch.where(box, x2, x),
                        lam_mix.view(B, 1, 1, 1) * x + (1 - lam_mix.view(B, 1, 1, 1)) * x2)
    lam = torch.where(use_cut, lam_cut, lam_mix)
    lam = torch.where(apply, lam, torch.ones_like(lam)).view(B, 1)
    x = torch.where(apply.view(B, 1, 1, 1), mixed, x)
    return x, lam * y + (1 - lam) * y2
