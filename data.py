"""CIFAR-10 in memory, batched augmentation drawn independently per sample, and the batch iterator.

The whole data set lives as one uint8 tensor (50,000 x 3 x 32 x 32 is 150 MB) on the training
device. Every augmentation below works on a whole batch at once, yet draws its randomness per
sample (crop offset, flip, RandAugment operation and sign, mixup/cutmix partner and ratio, erasing
box), so nothing is shared across a batch and no DataLoader workers are needed. `TrainBatches`
puts it together: `for inputs, targets in batches.epoch(e)` gives one epoch of augmented batches.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics of the 50,000 training images
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageData:
    """Images as uint8 (N, 3, H, W), integer labels (N,), and the per-channel mean and std (in
    [0, 1] units) that inputs are standardised with: CIFAR-10's own for CIFAR-10, else measured on
    the training images (see `channel_stats`)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units, rounded to 4 places
    like CIFAR10_MEAN/STD. Summed in float64 by chunks, so 50,000 images need no big float copy."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):
        c = chunk.double().div_(255.0)
        total += c.sum((0, 2, 3))
        squares += c.square().sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp(min=1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


class DataNotFoundError(RuntimeError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch file, refusing every global but numpy's array reconstruction:
    a plain pickle.load would run any function a crafted file names (os.system, ...)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),  # as numpy 1 (and Python 2) names it
               ("numpy._core.multiarray", "_reconstruct"),  # numpy 2
               # numpy scalars (labels saved as numpy ints), and bytes in pickle protocols 0-2
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("_codecs", "encode"),
               # what numpy writes with pickle protocol 5 (Python 3.14's default)
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR-10 batch "
                                         "holds (refused: unpickling it could run code)")
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One file of cifar-10-batches-py: a pickled dict with 'data', uint8 (N, 3072), and 'labels',
    N integers in 0..9. Anything else is refused with an error naming the file."""
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: cifar-10-batches-py holds data_batch_1 to "
                                "data_batch_5 and test_batch")
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="latin1").load()
        if isinstance(d, dict):  # str keys, or bytes (a Python 2 pickle read as bytes)
            d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
        for key in ("data", "labels"):
            if not isinstance(d, dict) or key not in d:
                raise ValueError(f"no '{key}' entry")
        x, y = np.asarray(d["data"]), np.asarray(d["labels"])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' is {x.dtype} {x.shape}, not uint8 (N, 3072)")
        if y.shape != (len(x),) or y.dtype.kind not in "iu" or not ((y >= 0) & (y < 10)).all():
            raise ValueError(f"'labels' must be {len(x)} integers in 0..9, one per image, "
                             f"found {y.dtype} {y.shape}")
    except Exception as e:  # a damaged pickle fails in many ways (EOFError, UnpicklingError, ...)
        raise ValueError(f"{path} is not a CIFAR-10 batch (a pickled dict of uint8 'data' and "
                         f"'labels'): {str(e) or type(e).__name__}") from e
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _load_batches_py(folder: Path) -> ImageData:
    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*(_read_batch(folder / name) for name in names), strict=True)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return ImageData(train_x, train_y, test_x, test_y, CIFAR10_CLASSES)


def _to_rgb(im: Any, path: str | Path) -> Any:
    """A PIL image as 8-bit RGB. PIL's own convert clips 16-bit and 32-bit grey images at 255, so
    these are scaled by their real range first (16-bit: 0-65535; float: 0-1 or 0-255)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "F" and hi <= 1.0:
            top = 1.0
        else:
            top = 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else 0.0
        if lo < 0 or not top:
            raise ValueError(f"cannot read image {path}: its {im.mode} values span "
                             f"[{lo:g}, {hi:g}], not 8-bit, 16-bit or [0, 1] intensities")
        im = Image.fromarray(np.round(a * (255.0 / top)).astype(np.uint8), "L")
    return im.convert("RGB")


def read_image(path: str | Path, size: int | None = None) -> Tensor:
    """One image file as uint8 (3, H, W), RGB, resized to size x size if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = _to_rgb(im, path)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (3, H, W)
    except (OSError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


# A few freely licensed photos that ship with the repository (assets/samples/README.md), so the
# figures need no data set. File names start with the label: cat_chelsea.jpg is a "cat".
BUNDLED_SAMPLES = Path(__file__).resolve().parent / "assets" / "samples"


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)


def _load_split(folder: Path, classes: tuple[str, ...], size: int) -> tuple[Tensor, Tensor]:
    files, labels = [], []
    for label, name in enumerate(classes):
        found = image_files(folder / name)
        if not found:
            raise DataNotFoundError(f"class folder {folder / name} holds no images "
                                    f"({', '.join(IMAGE_EXTS)}); every class needs images in "
                                    f"train/ and test/")
        files += found
        labels += [label] * len(found)
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without the GIL
        images = list(pool.map(lambda p: read_image(p, size), files))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _load_image_folder(root: Path, size: int, with_train: bool = True) -> ImageData:
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    test_classes = tuple(sorted(p.name for p in (root / "test").iterdir() if p.is_dir()))
    if not classes:
        raise DataNotFoundError(f"{root / 'train'} has no class folders: "
                                "expected train/<class>/*.jpg")
    if classes != test_classes:
        raise DataNotFoundError(f"train/ and test/ under {root} hold different classes: "
                                f"{classes} vs {test_classes}")
    test_x, test_y = _load_split(root / "test", classes, size)
    if with_train:
        train_x, train_y = _load_split(root / "train", classes, size)
    else:
        train_x, train_y = test_x[:0], test_y[:0]
    if classes == CIFAR10_CLASSES:
        return ImageData(train_x, train_y, test_x, test_y, classes)
    # not CIFAR-10: its own statistics
    mean, std = channel_stats(train_x if len(train_x) else test_x)
    return ImageData(train_x, train_y, test_x, test_y, classes, mean, std)


def match_classes(data: ImageData, classes: list[str] | tuple[str, ...]) -> ImageData:
    """Relabel the data so that label i means classes[i] (the class list a checkpoint was trained
    with), matching classes by name; data with other class names is refused."""
    classes = tuple(classes)
    if classes == data.classes:
        return data
    if sorted(classes) != sorted(data.classes):
        raise DataNotFoundError(f"the data's classes {list(data.classes)} are not the ones the "
                                f"checkpoint was trained on {list(classes)}")
    # data label -> checkpoint label
    lookup = torch.tensor([classes.index(name) for name in data.classes])
    return replace(data, train_y=lookup[data.train_y], test_y=lookup[data.test_y], classes=classes)


def select_classes(data: ImageData, names: list[str] | tuple[str, ...]) -> ImageData:
    """Only the images of these classes, labelled 0..k-1 in the order given."""
    unknown = [n for n in names if n not in data.classes]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"--classes must name distinct classes of the data {list(data.classes)}, "
                         f"got {list(names)}")
    lookup = torch.full((len(data.classes),), -1, dtype=torch.long)  # data label -> new label
    for new, name in enumerate(names):
        lookup[data.classes.index(name)] = new
    train_y, test_y = lookup[data.train_y], lookup[data.test_y]
    keep_train, keep_test = train_y >= 0, test_y >= 0
    return replace(data, train_x=data.train_x[keep_train], train_y=train_y[keep_train],
                   test_x=data.test_x[keep_test], test_y=test_y[keep_test], classes=tuple(names))


def load_dataset(data_dir: str | Path, download: bool = True, img_size: int = 32,
                 with_train: bool = True) -> ImageData:
    """CIFAR-10 from `data_dir`, in whichever form is there:

    1. torchvision's `cifar-10-batches-py` folder (data_dir itself or inside it);
    2. an ImageFolder tree `train/<class>/*.jpg` and `test/<class>/*.jpg` (any classes; images
       resized to img_size; mean and std measured on its training images unless the classes are
       CIFAR-10's);
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


@dataclass
class EvalSet:
    """Evaluation images of this process (uint8, on the device): all of them, and the evenly
    spaced subset used between epochs (--eval-subset; every class equally often when sorted by
    class)."""

    name: str  # "test" or "val"
    size: int  # images over all processes
    x: Tensor
    y: Tensor
    sub_x: Tensor
    sub_y: Tensor
    subset: int


def evenly_spaced(k: int, n: int) -> Tensor:
    """k indices spread evenly over range(n) (k <= n): a subset with every class when the
    images are sorted by class."""
    return torch.arange(k) * n // max(k, 1)


def split_data(data: ImageData, val_split: int = 0, train_fraction: float = 1.0,
               eval_subset: int = 0, device: torch.device | str = "cpu", rank: int = 0,
               world: int = 1) -> tuple[Tensor, Tensor, EvalSet]:
    """A run's training images and its evaluation set: the test set, or val_split images held
    out of the training set (a fixed permutation, the same for every seed); then train_fraction
    of each class of the rest (another fixed permutation, so a smaller fraction is a subset of a
    larger one). The evaluation images are split across the DDP processes."""
    train_x, train_y, eval_x, eval_y = data.train_x, data.train_y, data.test_x, data.test_y
    if val_split:
        if not val_split < len(train_x):
            raise ValueError(f"--val-split must be in (0, {len(train_x)}), got {val_split}")
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1234))
        eval_x, eval_y = train_x[perm[:val_split]], train_y[perm[:val_split]]
        train_x, train_y = train_x[perm[val_split:]], train_y[perm[val_split:]]
    if train_fraction < 1:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(4321))
        by_class = [order[train_y[order] == c] for c in train_y.unique()]
        keep = torch.cat([idx[:max(1, round(train_fraction * len(idx)))]
                          for idx in by_class]).sort().values
        train_x, train_y = train_x[keep], train_y[keep]
    n = len(eval_x)
    if not eval_subset < n:
        raise ValueError(f"--eval-subset must be in [0, {n}), got {eval_subset}")
    sub = evenly_spaced(eval_subset, n)
    evals = EvalSet("val" if val_split else "test", n, eval_x[rank::world].to(device),
                    eval_y[rank::world].to(device), eval_x[sub][rank::world].to(device),
                    eval_y[sub][rank::world].to(device), eval_subset)
    return train_x.to(device), train_y.to(device), evals


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


def _source_index(H: int, W: int, a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor,
                  f: Tensor) -> Tensor:
    """Nearest-neighbour sampling maps of U affine warps, each coefficient a (U,) tensor: output
    pixel (x, y), relative to the image centre, reads input pixel (a x + b y + c, d x + e y + f).
    Returns flat source indices (U, H*W), with H*W for pixels from outside the image."""
    a, b, c, d, e, f = (k.float().view(-1, 1, 1) for k in (a, b, c, d, e, f))  # each (U, 1, 1)
    dev = a.device
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float32) - (H - 1) / 2,
                            torch.arange(W, device=dev, dtype=torch.float32) - (W - 1) / 2,
                            indexing="ij")
    sx = (a * xs + b * ys + c + (W - 1) / 2).round().long()  # (U, H, W) source column
    sy = (d * xs + e * ys + f + (H - 1) / 2).round().long()  # (U, H, W) source row
    inside = (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)
    return torch.where(inside, sy * W + sx, H * W).view(-1, H * W)


def _gather_pixels(img: Tensor, idx: Tensor, fill: int) -> Tensor:
    """out[b, :, p] = img[b, :, idx[b, p]] for a uint8 batch (B, C, H, W) and idx (B, H*W); index
    H*W reads `fill`."""
    B, C, H, W = img.shape
    flat = torch.cat([img.flatten(2), img.new_full((B, C, 1), fill)], 2)  # (B, C, H*W + 1)
    return flat.gather(2, idx.unsqueeze(1).expand(B, C, H * W)).view(B, C, H, W)


def warp(img: Tensor, a: float | Tensor = 1.0, b: float | Tensor = 0.0, c: float | Tensor = 0.0,
         d: float | Tensor = 0.0, e: float | Tensor = 1.0, f: float | Tensor = 0.0,
         fill: int = 128) -> Tensor:
    """Affine warp with nearest-neighbour sampling of a uint8 batch (B, C, H, W), one gather.

    Output pixel (x, y), taken relative to the image centre, reads input pixel
    (a x + b y + c, d x + e y + f); pixels from outside the image get `fill`. Each coefficient is
    a number (the same for all samples) or a (B,) tensor (one per sample).
    """
    B, _, H, W = img.shape
    coef = torch.broadcast_tensors(*(torch.as_tensor(k, device=img.device).reshape(-1)
                                     for k in (a, b, c, d, e, f)))
    return _gather_pixels(img, _source_index(H, W, *coef).expand(B, H * W), fill)


# RandAugment (Cubuk et al., 2020) as in torchvision's RandAugment (num_bins=31): each operation's
# magnitude at M=30, whether its sign is drawn, and the family of operations it runs in. One call
# per family handles all of its samples at once, each with its own operation and magnitude.
RANDAUG_OPS: dict[str, tuple[float, bool, str]] = {
    "Identity": (0.0, False, "identity"),
    "ShearX": (0.3, True, "affine"),
    "ShearY": (0.3, True, "affine"),
    "TranslateX": (0.45, True, "affine"),  # fraction of the image size
    "TranslateY": (0.45, True, "affine"),
    "Rotate": (30.0, True, "affine"),  # degrees
    "Brightness": (0.9, True, "blend"),  # factor 1 + v
    "Color": (0.9, True, "blend"),
    "Contrast": (0.9, True, "blend"),
    "Sharpness": (0.9, True, "blend"),
    "Posterize": (4.0, False, "posterize"),  # bits removed
    "Solarize": (255.0, False, "solarize"),  # threshold 255 - v
    "AutoContrast": (0.0, False, "autocontrast"),
    "Equalize": (0.0, False, "equalize"),
}
_OP = {name: i for i, name in enumerate(RANDAUG_OPS)}


def _affine_ops(img: Tensor, op: Tensor, v: Tensor, host_sync: bool = True) -> Tensor:
    """ShearX/Y, TranslateX/Y and Rotate, per sample, as one gather. With host_sync the sampling
    maps are built once per distinct (operation, magnitude) pair (torch.unique reads its count on
    the host); without, once per sample."""
    H, W = img.shape[-2:]
    which = None
    if host_sync:
        values, v_id = torch.unique(v, return_inverse=True)
        # distinct (op, v)
        pairs, which = torch.unique(op * len(values) + v_id, return_inverse=True)
        op, v = pairs // len(values), values[pairs % len(values)]  # (U,) each
    zero, one, t = torch.zeros_like(v), torch.ones_like(v), torch.deg2rad(v)
    rot = op == _OP["Rotate"]
    idx = _source_index(H, W,  # (U, H*W)
                        a=torch.where(rot, t.cos(), one),
                        b=torch.where(op == _OP["ShearX"], v, torch.where(rot, t.sin(), zero)),
                        c=torch.where(op == _OP["TranslateX"], (v * W).round(), zero),
                        d=torch.where(op == _OP["ShearY"], v, torch.where(rot, -t.sin(), zero)),
                        e=torch.where(rot, t.cos(), one),
                        f=torch.where(op == _OP["TranslateY"], (v * H).round(), zero))
    return _gather_pixels(img, idx if which is None else idx[which], fill=128)


def _sharpen(x: Tensor, q: Tensor) -> Tensor:
    """Sharpness in place on float images (k, C, H, W): smooth the interior, keep the border,
    x + (1 - r) (blur - x) with q = 1 - r of shape (k, 1, 1, 1)."""
    inner = x[..., 1:-1, 1:-1]
    box = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]  # 3-row sums (k, C, H-2, W)
    box = box[..., :-2] + box[..., 1:-1] + box[..., 2:]  # 3x3 sums (k, C, H-2, W-2), exact integers
    # kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13
    blur = box.add_(inner, alpha=4.0).div_(13.0).round_()
    inner += (blur - inner) * q
    return x


def _blend_ops(img: Tensor, op: Tensor, v: Tensor, host_sync: bool = True) -> Tensor:
    """Brightness, Color, Contrast and Sharpness, per sample: each blends the image x with a
    reference image by the factor r = 1 + v, out = r x + (1 - r) ref, with the same float steps as
    torchvision's adjust_* functions (reference: 0, the grey image, its mean, a 3x3 blur). With
    host_sync only the Sharpness samples are blurred (their indices read on the host); without,
    all."""
    n, C, H, W = img.shape
    r64 = 1.0 + v
    r, q = r64.float().view(n, 1, 1, 1), (1.0 - r64).float().view(n, 1, 1, 1)  # r, 1 - r
    x = img.float()  # (n, C, H, W)
    red, green, blue = img.unbind(1)
    gray = (red.mul(0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).floor_()
            .unsqueeze(1))  # (n, 1, H, W)
    ref = torch.where((op == _OP["Color"]).view(n, 1, 1, 1), gray,
                      gray.mean((1, 2, 3), keepdim=True) * (op == _OP["Contrast"]).view(n, 1, 1, 1))
    # Brightness (ref 0), Color, Contrast; one rounding, as torchvision
    out = torch.addcmul(x * r, ref, q)
    is_sharp = op == _OP["Sharpness"]
    if not host_sync:
        out = torch.where(is_sharp.view(n, 1, 1, 1), _sharpen(x, q), out)
    elif (sharp := is_sharp.nonzero().squeeze(1)).numel():
        out.index_copy_(0, sharp, _sharpen(x.index_select(0, sharp), q.index_select(0, sharp)))
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(img: Tensor, op: Tensor, v: Tensor, host_sync: bool = True) -> Tensor:
    bits = 8 - v.round().long()  # (n,) bits kept
    mask = ((255 << (8 - bits)) & 255).to(torch.uint8).view(-1, 1, 1, 1)
    return img & mask


def _solarize(img: Tensor, op: Tensor, v: Tensor, host_sync: bool = True) -> Tensor:
    threshold = (255.0 - v).float().view(-1, 1, 1, 1)
    return torch.where(img >= threshold, 255 - img, img)


# family -> fn(images, per-sample op, per-sample signed magnitude, host_sync)
_RANDAUG_FAMILIES: dict[str, Callable[..., Tensor]] = {
    "identity": lambda img, op, v, host_sync=True: img,
    "affine": _affine_ops,
    "blend": _blend_ops,
    "posterize": _posterize,
    "solarize": _solarize,
    "autocontrast": lambda img, op, v, host_sync=True: TF.autocontrast(img),
    "equalize": lambda img, op, v, host_sync=True: TF.equalize(img),
}


_RANDAUG_TABLE = (  # per operation: magnitude at M=30, signed, family number
    torch.tensor([m for m, _, _ in RANDAUG_OPS.values()], dtype=torch.float64),
    torch.tensor([s for _, s, _ in RANDAUG_OPS.values()]),
    torch.tensor([list(_RANDAUG_FAMILIES).index(f) for _, _, f in RANDAUG_OPS.values()]),
)


def apply_randaug_op(img: Tensor, name: str, v: float) -> Tensor:
    """One RandAugment operation with signed magnitude v on every sample of a uint8 batch."""
    n = img.shape[0]
    op = torch.full((n,), _OP[name], device=img.device)
    v_all = torch.full((n,), float(v), dtype=torch.float64, device=img.device)
    return _RANDAUG_FAMILIES[RANDAUG_OPS[name][2]](img, op, v_all)


# the table, copied once per device
_RANDAUG_ON: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}


def rand_augment(x: Tensor, num_ops: int = 2, magnitude: int = 9, host_sync: bool | None = None
                 ) -> Tensor:
    """RandAugment with the operation and its sign drawn per sample.

    With host_sync (the default on the CPU), each round sorts the batch by operation family (affine,
    blend, ...), runs every family once on its contiguous slice, with per-sample operation and
    magnitude, and puts the samples back: the least arithmetic, but the slice sizes are read on the
    host. Without (the default on CUDA), every family runs on the whole batch and each sample keeps
    its own family's result: more arithmetic, no host synchronisation, so the GPU never waits.
    Both give the same images for the same random draws.
    """
    B, dev = x.shape[0], x.device
    host_sync = dev.type == "cpu" if host_sync is None else host_sync
    families = list(_RANDAUG_FAMILIES.values())
    if dev not in _RANDAUG_ON:
        _RANDAUG_ON[dev] = tuple(t.to(dev) for t in _RANDAUG_TABLE)
    max_v, signed, family_of = _RANDAUG_ON[dev]
    for _ in range(num_ops):
        op = torch.randint(len(RANDAUG_OPS), (B,), device=dev)
        flip = signed[op] & (torch.rand(B, device=dev) < 0.5)
        v = max_v[op] * (magnitude / 30.0) * (1.0 - 2.0 * flip.double())  # (B,) signed magnitudes
        fam = family_of[op]
        if not host_sync:
            out = x
            for k, fn in enumerate(families):
                out = torch.where((fam == k).view(B, 1, 1, 1), fn(x, op, v, host_sync=False), out)
            x = out
            continue
        order = torch.argsort(fam, stable=True)
        counts = torch.bincount(fam, minlength=len(families)).tolist()
        xs, op, v = x.index_select(0, order), op[order], v[order]  # grouped by family
        parts, start = [], 0
        for fn, n in zip(families, counts, strict=True):
            part = xs[start:start + n]
            parts.append(fn(part, op[start:start + n], v[start:start + n]) if n else part)
            start += n
        x = torch.cat(parts).index_select(0, torch.argsort(order))  # back to the batch order
    return x


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W), per-channel standardised: (x/255 - mean) / std,
    computed in place on the float copy as x * 1/(255 std) + (-mean/std)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.float().mul_(1.0 / (255.0 * s)).add_(-m / s)


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


def _beta(alpha: float, n: int, device: torch.device) -> Tensor:
    """n draws of Beta(alpha, alpha) as g1 / (g1 + g2) with g ~ Gamma(alpha, 1), made on the device
    without argument checks: no host copy or synchronisation."""
    gamma = torch.distributions.Gamma(torch.full((2, n), max(alpha, 1e-3), device=device), 1.0,
                                      validate_args=False)
    g = gamma.sample()  # (2, n)
    return g[0] / (g[0] + g[1])


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
    lam_mix, lam_cut = (_beta(alpha, B, dev) for alpha in (mixup_alpha, cutmix_alpha))
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


# --------------------------------------------------------------------------------------------
# One epoch of training batches
# --------------------------------------------------------------------------------------------

@dataclass
class Augment:
    """The training-time transform of a uint8 batch (B, 3, H, W) with labels (B,): crop and flip,
    RandAugment, standardisation, random erasing, label smoothing, mixup/cutmix. Returns float
    images (B, 3, H, W) and soft targets (B, num_classes)."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int = 4
    flip: bool = True
    randaug_n: int = 0
    randaug_m: int = 9
    erase_prob: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mixing: bool = True  # off: no mixup / cutmix (the training loop's --mix-off-frac phase)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = random_crop_flip(x, self.crop_pad, self.flip)
        if self.randaug_n > 0:
            x = rand_augment(x, self.randaug_n, self.randaug_m)
        x = normalize(x, self.mean, self.std)
        if self.erase_prob > 0:
            x = random_erasing(x, self.erase_prob)
        target = torch.nn.functional.one_hot(y, self.num_classes).float()
        target = target * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        if self.mixing and (self.mixup > 0 or self.cutmix > 0):
            x, target = mixup_cutmix(x, target, self.mixup, self.cutmix, self.mix_prob)
        return x, target


class TrainBatches:
    """`for inputs, targets in batches.epoch(e)`: one epoch of augmented training batches.

    The order is a permutation drawn from (seed, epoch) alone, so every process of a DDP run draws
    the same one and a resumed run continues it; the last incomplete batch is dropped. Each global
    batch of batch_size images is split into `world` disjoint shards of batch_size / world, and this
    process (rank) gets its own. Images and labels stay on their device; the indices go there once
    per epoch. Each batch's augmentation draws from the global generator reseeded with (seed, rank,
    epoch, step): the same augmented images whatever the model drew in between (dropout, patch
    dropout), so two models trained with one seed (the ViT and the CNN of compare_configs.py's
    `data` study) see the same images in the same order.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int,
                 augment: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is not divisible by {world} processes")
        if len(x) < batch_size:
            raise ValueError(f"--batch-size {batch_size} is larger than the {len(x)} "
                             "training images")
        self.x, self.y, self.augment = x, y, augment
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.steps = len(x) // batch_size  # steps per epoch

    def __len__(self) -> int:
        return self.steps

    def indices(self, epoch: int) -> Tensor:
        """This process's sample indices for every step of the epoch,
        (steps, batch_size / world)."""
        perm = torch.randperm(len(self.x),
                              generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        local = self.batch_size // self.world
        perm = perm[: self.steps * self.batch_size].view(self.steps, self.batch_size)  # (steps, B)
        return perm[:, self.rank * local:(self.rank + 1) * local]  # (steps, B / world)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        for step, idx in enumerate(self.indices(epoch).to(self.x.device)):
            key = ((self.seed * 10_007 + self.rank) * 100_003 + epoch) * 1_000_003 + step
            torch.manual_seed(key % 2**63)  # in range for every --seed in [0, 2^32)
            yield self.augment(self.x[idx], self.y[idx])
