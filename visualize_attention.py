"""Look inside a ViT: the paper's Figure 7 (three panels), Figure 6 (attention rollout) and
per-head attention maps, from the model's own attention output (no hooks).

    python visualize_attention.py                # newest trained checkpoint, else the shipped model
    python visualize_attention.py --images my_cat.jpg                    # top-3 classes and rollout
    python visualize_attention.py --checkpoint checkpoints/RUN/best.pt --data-dir data
    python visualize_attention.py --torchvision-weights vit_b_16 --images cat.jpg dog.png
    python visualize_attention.py --npz ViT-B_16.npz --images cat.jpg
    python visualize_attention.py --out-dir figures    # regenerate the guide's figures/
    python visualize_attention.py --html               # the attention explorer: one HTML page

The PNG files go to outputs/figures/ (not tracked by git) unless --out-dir says otherwise. With
--html the script writes only the explorer instead: one self-contained page (no server, no network;
it opens from disk and can be e-mailed) where a click on a patch shows its attention row for any
layer and head, the heads of every layer, attention rollout with its choices, the top-3 classes and
the mean attention distance; outputs/explorer.html unless a path follows --html.

The computations (rollout, mean attention distance, position-embedding similarity, filter PCA) are
plain tensor functions, separate from the plotting below them.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from checkpoint import (
    atomic_write,
    check_writable,
    find_latest_checkpoint,
    input_normalization,
    load_checkpoint,
    model_from_checkpoint,
)
from data import (
    BUNDLED_SAMPLES,
    CIFAR10_CLASSES,
    DataNotFoundError,
    image_files,
    load_dataset,
    normalize,
    read_image,
)
from inference import SHIPPED_MODEL, top_classes
from plots import pyplot
from runtime import run_cli
from vit_model import VisionTransformer, ViTConfig, load_jax_npz, load_torchvision_pretrained

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision weights
GOOGLE_MEAN, GOOGLE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # Google .npz checkpoints: [-1, 1]
HEAD_FUSIONS = ("mean", "max", "min")  # how attention_rollout combines the heads of a layer

# The explorer page (--html): a template filled with the data as JSON. The page stores attention
# weights as integers in ATTENTION_UNIT: off by at most 5e-6, so 3-4 significant digits for the
# weights of a 64-patch row (mean 1/64), in 40% fewer bytes than decimal fractions. The generator
# line marks a page this script wrote, which a later --html may replace.
EXPLORER_TEMPLATE = Path(__file__).resolve().parent / "assets" / "explorer_template.html"
EXPLORER_SLOT = "__EXPLORER_DATA__"
EXPLORER_GENERATOR = "vit_from_scratch visualize_attention.py --html"
DEFAULT_HTML = "outputs/explorer.html"
ATTENTION_UNIT = 1e-5
# The longest string Chromium's JavaScript holds (V8, 64-bit): a page whose data is longer cannot be
# read by the browser. A weight takes about 4 characters of it (digits and a comma; 4.0-4.4 measured
# for the shipped model and random ones with 64-577 tokens).
EXPLORER_MAX_CHARS = 2**29 - 24
CHARS_PER_WEIGHT = 4


# --------------------------------------------------------------------------------------------
# Computations: tensors in, tensors out
# --------------------------------------------------------------------------------------------

def attention_rollout(attentions: list[Tensor], head_fusion: str = "mean") -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): the attention from every output token to every
    input token through all layers, (B, N, N).

    Each layer's heads are fused (mean, max or min), the residual connection is accounted for by
    adding the identity and renormalising rows: A' = (A + I) / rowsum, and the layers are
    multiplied: R = A'_L ... A'_2 A'_1.
    """
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion must be one of {sorted(fuse)}, got {head_fusion!r}")
    B, _, N, _ = attentions[0].shape
    eye = torch.eye(N, device=attentions[0].device)
    rollout = eye.expand(B, N, N)
    for attn in attentions:
        a = fuse[head_fusion](attn.float()) + eye  # (B, N, N)
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout  # (B, N, N)
    return rollout


def rollout_to_patch_map(rollout: Tensor, num_prefix_tokens: int, grid_size: int) -> Tensor:
    """(B, N, N) rollout -> (B, g, g): what the output attends to in each input patch.

    With a [CLS] token the output is its row; with global average pooling it is the mean of the
    patch rows.
    """
    if num_prefix_tokens:
        rel = rollout[:, 0, num_prefix_tokens:]  # (B, N_p)
    else:
        rel = rollout.mean(1)  # (B, N_p)
    return rel.reshape(-1, grid_size, grid_size)


def patch_distances(grid_size: int, patch_size: int) -> Tensor:
    """(N, N) distances in pixels between the centres of the patches of a grid, row-major."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size),
                                        indexing="ij"), -1).reshape(-1, 2).double()  # (N, 2)
    return torch.cdist(coords, coords) * patch_size  # (N, N)


def mean_attention_distance(attentions: list[Tensor], grid_size: int, patch_size: int,
                            num_prefix_tokens: int = 1) -> Tensor:
    """Appendix D.7: for each query patch, the image-space distance (pixels) to every key patch,
    weighted by the attention weight; averaged over queries and images. Returns (layers, heads).

    Only patch-to-patch attention is used (the [CLS] query and key are dropped and each row is
    renormalised over the patches), so a head looking only at its own patch scores 0 and one
    looking only at the next patch scores patch_size.
    """
    dist = patch_distances(grid_size, patch_size).float()  # (N, N)
    out = []
    for attn in attentions:
        a = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].float()  # (B, h, N_p, N_p)
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)
        per_query = (a * dist.to(a.device)).sum(-1)  # (B, h, N_p)
        out.append(per_query.mean(dim=(0, 2)))  # (h,)
    return torch.stack(out)  # (L, h)


def uniform_attention_distance(grid_size: int, patch_size: int) -> float:
    """The mean attention distance of a head that attends uniformly to all patches: the mean
    distance between two patch centres of the grid, in pixels. A head near it is effectively global;
    one far below it is local (Figure 7, right)."""
    return patch_distances(grid_size, patch_size).mean().item()


def position_embedding_similarity(pos_embed: Tensor, grid_size: int, num_prefix_tokens: int = 1
                                  ) -> Tensor:
    """Figure 7 (center): cosine similarity between the position embedding of every patch and
    every other one, (g, g, g, g): entry [i, j] is a g x g tile for the patch in row i, column j."""
    pe = pos_embed.reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:].float()  # (N_p, D)
    pe = F.normalize(pe, dim=-1)
    sim = pe @ pe.T  # (N_p, N_p)
    return sim.reshape(grid_size, grid_size, grid_size, grid_size)


def patch_embedding_pcs(weight: Tensor, k: int = 28) -> tuple[Tensor, Tensor]:
    """Figure 7 (left): principal components of the patch-embedding filters.

    weight: (D, C, P, P), the D filters of E. Returns the top k components as (k, C, P, P) and
    the fraction of variance each explains, (k,).
    """
    D = weight.shape[0]
    flat = weight.reshape(D, -1).float()  # (D, C*P*P)
    flat = flat - flat.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)  # vh: (min(D, CPP), C*P*P)
    k = min(k, vh.shape[0])
    var = s**2 / (s**2).sum().clamp(min=1e-12)
    return vh[:k].reshape(k, *weight.shape[1:]), var[:k]


# --------------------------------------------------------------------------------------------
# Model and images
# --------------------------------------------------------------------------------------------

@dataclass
class Source:
    """A model to look into, where it came from, its input normalisation, class names (None when
    unknown) and the seed its initialisation was drawn with."""

    model: VisionTransformer
    name: str
    mean: tuple
    std: tuple
    classes: list[str] | None
    seed: int = 0


def load_model(args: argparse.Namespace) -> Source:
    """--torchvision-weights, --npz or --checkpoint if given; else the newest trained checkpoint
    under --checkpoint-dir; else the model that ships with the repository."""
    if args.torchvision_weights:
        return Source(load_torchvision_pretrained(args.torchvision_weights),
                      f"torchvision {args.torchvision_weights} (ImageNet)", IMAGENET_MEAN,
                      IMAGENET_STD, None)
    if args.npz:
        return Source(load_jax_npz(args.npz), f"Google {Path(args.npz).name}", GOOGLE_MEAN,
                      GOOGLE_STD, None)
    path = Path(args.checkpoint) if args.checkpoint else find_latest_checkpoint(args.checkpoint_dir)
    name = f"checkpoint {path}"
    if path is None and SHIPPED_MODEL.is_file():
        path, name = (SHIPPED_MODEL,
                      f"shipped model {SHIPPED_MODEL.parent.name}/{SHIPPED_MODEL.name}")
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"no checkpoint found ({args.checkpoint or args.checkpoint_dir + '/*/*.pt'}) and no "
            f"shipped model ({SHIPPED_MODEL}). Train one, e.g. `python train_cifar10.py --preset "
            f"cpu --data-dir DATA`, or pass --checkpoint, --torchvision-weights vit_b_16 or "
            f"--npz FILE")
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{path} holds a {type(model).__name__} (the CNN baseline): attention "
                         f"maps need a ViT checkpoint; pass one with --checkpoint")
    classes = ckpt.get("classes") or (list(CIFAR10_CLASSES)
                                      if model.num_classes == len(CIFAR10_CLASSES) else None)
    seed = int((ckpt.get("config") or {}).get("seed", 0))
    return Source(model, name, *input_normalization(ckpt), classes, seed)


@dataclass
class Images:
    """uint8 images at the model's input size (B, 3, S, S), a label for each, the same images at
    their own resolution when they came from files (for display), and where they came from."""

    x: Tensor
    labels: list[str]
    originals: list[Tensor] | None
    name: str

    def shown(self, n: int) -> list[Tensor]:
        """The first n images as a reader sees them: at their own resolution when they came
        from files, each (3, H, W)."""
        return self.originals[:n] if self.originals is not None else list(self.x[:n])


def _from_files(files: list[Path], size: int, labels: list[str], name: str) -> Images:
    originals = [read_image(f) for f in files]
    # the model's view: resized to size x size
    x = torch.stack([read_image(f, size) for f in files])
    return Images(x, labels, originals, name)


def load_images(args: argparse.Namespace, size: int) -> Images:
    """--images; else CIFAR-10 test images from --data-dir (downloaded only with --download); else
    the sample photos bundled with the repository."""
    if args.images:
        files = [Path(p) for p in args.images]
        return _from_files(files, size, [f.name for f in files], f"{len(files)} image file(s)")
    try:
        data = load_dataset(args.data_dir, download=args.download, with_train=False)
    except DataNotFoundError:
        if args.download or not BUNDLED_SAMPLES.is_dir():
            raise
        files = image_files(BUNDLED_SAMPLES)
        print(f"no CIFAR-10 in {args.data_dir!r}: using the {len(files)} sample photos in "
              f"{BUNDLED_SAMPLES.parent.name}/{BUNDLED_SAMPLES.name} (--data-dir DIR or "
              f"--download for CIFAR-10)")
        return _from_files(files, size, [f.name.split("_")[0] for f in files],
                           f"{len(files)} bundled sample photos")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(data.test_x), generator=g)[: args.num_images]
    x = data.test_x[idx]
    if x.shape[-1] != size:
        x = (F.interpolate(x.float(), size=(size, size), mode="bicubic").clamp(0, 255)
             .to(torch.uint8))
    return Images(x, [data.classes[i] for i in data.test_y[idx]], None,
                  f"{len(x)} CIFAR-10 test images")


@torch.inference_mode()
def collect_attention(model: VisionTransformer, x: Tensor, mean: tuple, std: tuple,
                      batch_size: int = 64) -> tuple[list[Tensor], Tensor]:
    """Attention of every layer (B, h, T, T) for uint8 images x, and the logits (B, classes)."""
    dev = next(model.parameters()).device
    layers: list[list[Tensor]] = [[] for _ in model.blocks]
    logits = []
    for i in range(0, len(x), batch_size):
        xb = normalize(x[i:i + batch_size].to(dev), mean, std)  # (b, 3, H, W)
        out, attns = model(xb, return_attention=True)
        logits.append(out.cpu())
        for store, a in zip(layers, attns, strict=True):
            store.append(a.cpu())
    return [torch.cat(a) for a in layers], torch.cat(logits)


@dataclass
class Look:
    """What the figures and the explorer page are drawn from: the model, the images, every layer's
    attention of all images (B, h, T, T), their mean attention distance (layers, heads), each
    image's top-3 classes, and the seconds the attention and distances took."""

    src: Source
    imgs: Images
    attentions: list[Tensor]
    dist: Tensor
    tops: list[list[tuple[str, float]]]
    seconds: float


def look_inside(args: argparse.Namespace, src: Source) -> Look:
    """Load the images, run the model over them once and measure the mean attention distance;
    prints the top-3 classes of image files."""
    model, cfg = src.model.eval(), src.model.config
    imgs = load_images(args, cfg.img_size)
    print(f"model: {src.name}; images: {imgs.name}")
    t0 = time.perf_counter()
    attentions, logits = collect_attention(model, imgs.x, src.mean, src.std)
    dist = mean_attention_distance(attentions, cfg.grid_size, cfg.patch_size,
                                   model.num_prefix_tokens)
    seconds = time.perf_counter() - t0
    tops = top_classes(logits, src.classes)
    if imgs.originals is not None:
        for label, top in zip(imgs.labels, tops, strict=True):
            print(f"  {label}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in top))
    return Look(src, imgs, attentions, dist, tops, seconds)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def plot_filters(panels: list[tuple[str, Tensor, Tensor]], path: Path, source: str) -> None:
    """One block of principal components per (title, pcs, variance) panel, side by side."""
    plt = pyplot()
    k = max(pcs.shape[0] for _, pcs, _ in panels)
    cols = min(7, k)
    rows = -(-k // cols)
    fig = plt.figure(figsize=(1.3 * cols * len(panels) + 0.3 * (len(panels) - 1),
                              1.45 * rows + 1.0))
    for sub, (title, pcs, var) in zip(fig.subfigures(1, len(panels), squeeze=False)[0], panels,
                                      strict=True):
        axes = sub.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i in range(pcs.shape[0]):
            pc = pcs[i]
            # each component to [0, 1]
            pc = (pc - pc.min()) / (pc.max() - pc.min()).clamp(min=1e-12)
            img = pc.permute(1, 2, 0) if pc.shape[0] == 3 else pc.mean(0)
            axes.flat[i].imshow(img.numpy(), interpolation="nearest",
                                cmap=None if pc.shape[0] == 3 else "gray")
            axes.flat[i].set_title(f"PC{i + 1} {100 * var[i]:.0f}%", fontsize=7)
        sub.suptitle(title, fontsize=9)
    fig.suptitle(f"RGB embedding filters: first {k} principal components\n{source}", fontsize=9,
                 y=1.06)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_position_similarity(sim: Tensor, path: Path, source: str) -> None:
    plt = pyplot()
    g = sim.shape[0]
    fig, axes = plt.subplots(g, g, figsize=(0.75 * g + 1.6, 0.75 * g + 0.9), squeeze=False)
    for i in range(g):
        for j in range(g):
            im = axes[i, j].imshow(sim[i, j].numpy(), vmin=-1, vmax=1, cmap="viridis")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(str(i + 1), fontsize=7, rotation=0, labelpad=8)
            if i == g - 1:
                axes[i, j].set_xlabel(str(j + 1), fontsize=7)
    fig.supxlabel("Input patch column")
    fig.supylabel("Input patch row")
    fig.subplots_adjust(right=0.86, wspace=0.08, hspace=0.08)
    cax = fig.add_axes([0.89, 0.15, 0.025, 0.7])
    fig.colorbar(im, cax=cax, label="Cosine similarity")
    fig.suptitle(f"Position embedding similarity\n{source}", fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_attention_distance(dist: Tensor, n_images: int, path: Path, source: str,
                            patch_size: int, img_size: int) -> None:
    plt = pyplot()
    L, H = dist.shape
    uniform = uniform_attention_distance(img_size // patch_size, patch_size)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for h in range(H):
        ax.scatter(torch.arange(L) + 1, dist[:, h], s=14,
                   label=f"Head {h + 1}" if H <= 16 else None)
    ax.axhline(uniform, ls="--", color="gray", lw=1, label=f"uniform attention ({uniform:.1f} px)")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_ylim(0, img_size * 0.75)
    ax.set_xticks(range(1, L + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title(f"Size of attended area by head and network depth\n{n_images} images, "
                 f"{img_size}x{img_size} input, patch {patch_size}; {source}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_rollout(images: list[Tensor], maps: Tensor, labels: list[str], preds: list[str],
                 path: Path, head_fusion: str, source: str) -> None:
    """Each image (3, H, W), at whatever resolution it has, under its rollout map (g, g) stretched
    to its size."""
    plt = pyplot()
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.6), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        m = F.interpolate(maps[i][None, None], size=images[i].shape[1:], mode="bilinear",
                          align_corners=False)[0, 0]
        m = (m - m.min()) / (m.max() - m.min()).clamp(min=1e-12)
        axes[0, i].imshow(img)
        axes[0, i].set_title(f"{labels[i]}\n(pred: {preds[i]})", fontsize=8)
        axes[1, i].imshow(img)
        im = axes[1, i].imshow(m.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02,
                 label="attention to the input (rescaled)")
    fig.suptitle(f"Attention rollout from the output token to the input (head fusion: "
                 f"{head_fusion})\n{source}", fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def plot_heads(image: Tensor, attentions: list[Tensor], layers: list[int], num_prefix_tokens: int,
               grid: int, path: Path, source: str) -> Any:
    plt = pyplot()
    H = attentions[0].shape[1]
    fig, axes = plt.subplots(len(layers), H + 1, figsize=(1.6 * (H + 1), 1.7 * len(layers) + 0.9),
                             squeeze=False)
    what = "[CLS] -> patch" if num_prefix_tokens else "mean over queries -> patch"
    for r, layer in enumerate(layers):
        a = attentions[layer][0]  # (h, N, N)
        maps = a[:, 0, num_prefix_tokens:] if num_prefix_tokens else a[:, :, :].mean(1)
        maps = maps.reshape(H, grid, grid)
        axes[r, 0].imshow(image.permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(f"layer {layer + 1}", fontsize=8)
        top = maps.max().item()  # one scale for the row, so its heads can be compared by colour
        for h in range(H):
            im = axes[r, h + 1].imshow(maps[h].numpy(), cmap="inferno", vmin=0, vmax=top)
            if r == 0:
                axes[r, h + 1].set_title(f"head {h + 1}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes[r].tolist(), fraction=0.015, pad=0.01)
    fig.suptitle(f"Attention weights per head ({what}, each patch one cell; one colour scale per "
                 f"layer)\n{source}", fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return fig


# --------------------------------------------------------------------------------------------
# The explorer page: one HTML file, the same numbers as the figures
# --------------------------------------------------------------------------------------------

def _rounded(x: Tensor | list | float, digits: int = 4) -> Any:
    """x as nested lists of floats with `digits` significant digits (the page's JSON)."""
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    return float(f"{x:.{digits}g}")


def png_data_url(image: Tensor, max_side: int = 256) -> tuple[str, int, int]:
    """A uint8 image (3, H, W) as a base64 PNG data URL, scaled down (never up) to fit
    max_side x max_side; with its width and height."""
    from PIL import Image

    im = Image.fromarray(image.permute(1, 2, 0).numpy())
    im.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return ("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            im.width, im.height)


def explorer_data(look: Look, n: int, head_fusion: str = "mean") -> dict[str, Any]:
    """What the explorer page shows, as JSON-ready values: for each of the first n images, the
    image, its top-3 classes, every layer's attention (L, h, T, T) in integers of ATTENTION_UNIT,
    and attention_rollout through all layers for each head fusion, as the patch map of
    rollout_to_patch_map (N_p,). The page computes rollout itself for the layers the reader
    picks and checks itself against these. The mean attention distance is over all images."""
    model, cfg = look.src.model, look.src.model.config
    # NaN would make the page's JSON unreadable (an empty page) and its weights garbage integers
    layers = [l + 1 for l, a in enumerate(look.attentions) if not torch.isfinite(a).all()]
    broken = [f"the attention of layer(s) {', '.join(map(str, layers))}"] if layers else []
    if not all(math.isfinite(p) for top in look.tops for _, p in top):
        broken.append("the class probabilities")
    if broken:
        raise ValueError(f"{look.src.name} gives NaN or infinite values in {', '.join(broken)}: "
                         f"its weights are broken (a diverged run?); no page was written")
    pre = model.num_prefix_tokens
    first = [a[:n] for a in look.attentions]  # L x (n, h, T, T)
    rollouts = {f: rollout_to_patch_map(attention_rollout(first, f), pre, cfg.grid_size)
                .flatten(1) for f in HEAD_FUSIONS}  # (n, N_p) each
    images = []
    for i, image in enumerate(look.imgs.shown(n)):
        url, width, height = png_data_url(image)
        attention = torch.stack([a[i] for a in first])  # (L, h, T, T)
        images.append({
            "label": look.imgs.labels[i], "png": url, "width": width, "height": height,
            "top3": [[c, _rounded(p)] for c, p in look.tops[i]],
            "attention": (attention.double() / ATTENTION_UNIT).round().int().tolist(),
            "rollout": {f: _rounded(r[i]) for f, r in rollouts.items()}})
    return {"model": look.src.name, "images_from": look.imgs.name, "img_size": cfg.img_size,
            "patch_size": cfg.patch_size, "grid": cfg.grid_size, "layers": cfg.depth,
            "heads": cfg.num_heads, "prefix_tokens": pre, "attention_unit": ATTENTION_UNIT,
            "head_fusion": head_fusion,
            "distance": {"pixels": _rounded(look.dist, 6), "images": len(look.imgs.x),
                         "uniform": _rounded(uniform_attention_distance(cfg.grid_size,
                                                                        cfg.patch_size), 6)},
            "images": images}


def render_explorer(data: dict[str, Any]) -> str:
    """The page: the template with the data in its JSON script block (every `<` escaped as
    \\u003c, so no label can end the block)."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return EXPLORER_TEMPLATE.read_text(encoding="utf-8").replace(EXPLORER_SLOT, blob)


def check_html_path(path: Path, create_folder: bool = False) -> None:
    """--html PATH names a new .html file in a folder that exists (or is created, for the default
    outputs/), or a page this script wrote before, which is replaced; never any other file."""
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--html {path}: name an .html file (the page is one HTML file)")
    if path.is_dir():
        raise ValueError(f"--html {path} is a folder: name an .html file")
    if not create_folder and not path.parent.is_dir():
        raise ValueError(f"--html {path}: the folder {path.parent} does not exist; create it "
                         f"first (or give --html alone to write {DEFAULT_HTML})")
    check_writable(path.parent)
    if path.exists():
        with open(path, "rb") as f:
            ours = EXPLORER_GENERATOR.encode() in f.read(4096)
        if not ours:
            raise ValueError(f"--html {path} exists and is not an explorer page written by this "
                             f"script; it was left as it is: choose another path")


def check_explorer_size(cfg: ViTConfig, num_prefix_tokens: int, n: int) -> None:
    """Refuse, before any work (a page too large takes minutes and GBs to make), a page of n
    images that no browser could read: its data holds L x h x T x T weights an image."""
    tokens = num_prefix_tokens + cfg.grid_size**2
    weights = cfg.depth * cfg.num_heads * tokens**2  # per image
    fit = EXPLORER_MAX_CHARS // (CHARS_PER_WEIGHT * weights)
    if n > fit:
        what = (f"use --show {fit} or fewer" if fit else
                "this model's attention is too large for the page; use the PNG figures")
        size = CHARS_PER_WEIGHT * n * weights / 2**20
        raise ValueError(f"--html: {n} image(s) of this model ({cfg.depth} layers x "
                         f"{cfg.num_heads} heads x {tokens}x{tokens} tokens, {weights:,} weights "
                         f"an image) make a page of about {size:.0f} MB, more than a browser "
                         f"reads ({EXPLORER_MAX_CHARS / 2**20:.0f} MB): {what}")


def write_explorer(args: argparse.Namespace) -> dict[str, Path]:
    """--html: the explorer page of the first --show images, and nothing else."""
    path = Path(args.html)
    check_html_path(path, create_folder=args.html == DEFAULT_HTML)
    src = load_model(args)
    check_explorer_size(src.model.config, src.model.num_prefix_tokens,
                        min(args.show, len(args.images)) if args.images else args.show)
    look = look_inside(args, src)
    n = min(args.show, len(look.imgs.x))
    page = render_explorer(explorer_data(look, n, args.head_fusion))
    if len(page) > EXPLORER_MAX_CHARS:
        raise ValueError(f"--html: the page of {n} image(s) would be {len(page) / 2**20:.0f} MB, "
                         f"more than a browser reads ({EXPLORER_MAX_CHARS / 2**20:.0f} MB); "
                         f"nothing was written: use a smaller --show")
    atomic_write(path, page.encode("utf-8"))  # an interrupted run leaves the earlier page as it was
    print(f"explorer page of {n} image(s), mean attention distance over {len(look.imgs.x)}: "
          f"{path} ({len(page.encode()) / 2**20:.1f} MB; open it in a web browser, no server or "
          f"network needed)")
    return {"explorer": path}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", help="a checkpoint from train_cifar10.py (default: the newest "
                                          "best.pt/last.pt under --checkpoint-dir)")
    src.add_argument("--checkpoint-dir", default="checkpoints",
                     help="where to look for the newest checkpoint")
    src.add_argument("--torchvision-weights", metavar="ARCH",
                     help="ImageNet weights through torchvision, e.g. vit_b_16 (needs the network)")
    src.add_argument("--npz", help="a Google ViT .npz checkpoint, e.g. ViT-B_16.npz")
    img = p.add_argument_group("images")
    img.add_argument("--images", nargs="+", help="image files, any size: prints each one's top-3 "
                     "classes (default: CIFAR-10 test images, else the bundled samples)")
    img.add_argument("--data-dir", default="data", help="CIFAR-10 location, as in "
                     "train_cifar10.py; without it, the sample photos in assets/samples are used")
    img.add_argument("--download", action="store_true",
                     help="download CIFAR-10 into --data-dir when it is not there")
    img.add_argument("--num-images", type=int, default=128,
                     help="images for the mean attention distance (the paper uses 128)")
    img.add_argument("--show", type=int, default=6,
                     help="images shown in the rollout figure and in the --html page")
    p.add_argument("--html", nargs="?", const=DEFAULT_HTML, metavar="PATH",
                   help="write the attention explorer instead of the PNG figures: one "
                        "self-contained HTML page (no server, no network) of the first --show "
                        "images, with the mean attention distance over all the images; PATH "
                        f"defaults to {DEFAULT_HTML} (a page written earlier is replaced, any "
                        "other file is left alone; another PATH's folder must exist). --out-dir, "
                        "--layers, --num-pcs and --wandb are for the figures")
    p.add_argument("--head-fusion", default="mean", choices=HEAD_FUSIONS,
                   help="how the heads of a layer are combined in attention rollout (the "
                        "--html page starts with it)")
    p.add_argument("--layers", type=int, nargs="+", help="layers (1-based) for attention_heads.png "
                                                         "(default: first, middle, last)")
    p.add_argument("--num-pcs", type=int, default=28,
                   help="principal components of the filters to show")
    p.add_argument("--out-dir", default="outputs/figures", help="where the PNG files go (the "
                   "guide's own figures/ are regenerated with --out-dir figures)")
    p.add_argument("--wandb", default="off", choices=("off", "offline", "online"),
                   help="also log the figures to a W&B run")
    p.add_argument("--seed", type=int, default=0, help="which test images are drawn")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (or set VIT_DEBUG=1)")
    args = p.parse_args(argv)
    for name in ("num_images", "show", "num_pcs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got "
                             f"{getattr(args, name)}")
    return args


def default_layers(depth: int) -> list[int]:
    """First, middle and last layer (0-based), without repeats: fits every depth."""
    return sorted({0, max(depth // 2 - 1, 0), depth - 1})


def make_figures(args: argparse.Namespace) -> dict[str, Path]:
    src = load_model(args)
    model, source, cfg = src.model.eval(), src.name, src.model.config
    grid, P, pre = cfg.grid_size, cfg.patch_size, model.num_prefix_tokens
    layers = [l - 1 for l in args.layers] if args.layers else default_layers(cfg.depth)
    bad = [l + 1 for l in layers if not 0 <= l < cfg.depth]
    if bad:
        raise ValueError(f"--layers {bad} out of range: this model has layers 1..{cfg.depth}")
    out = Path(args.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out}: {e}") from e
    look = look_inside(args, src)
    imgs, attentions, dist, tops = look.imgs, look.attentions, look.dist, look.tops

    files = {name: out / f"{name}.png" for name in (
        "fig7_embedding_filters", "fig7_position_similarity", "fig7_attention_distance",
        "fig6_attention_rollout", "attention_heads")}
    torch.manual_seed(src.seed)  # the untrained model, drawn with the training run's seed
    init = VisionTransformer(ViTConfig(**cfg.to_dict())).patch_embed.proj.weight.detach()
    panels = [("trained",
               *patch_embedding_pcs(model.patch_embed.proj.weight.detach(), args.num_pcs)),
              (f"at initialisation (seed {src.seed})", *patch_embedding_pcs(init, args.num_pcs))]
    plot_filters(panels, files["fig7_embedding_filters"], source)
    if model.pos_embed is None:
        print("note: this model has no position embedding; fig7_position_similarity.png is skipped")
        files.pop("fig7_position_similarity")
    else:
        sim = position_embedding_similarity(model.pos_embed.detach(), grid, pre)
        plot_position_similarity(sim, files["fig7_position_similarity"], source)
    plot_attention_distance(dist, len(imgs.x), files["fig7_attention_distance"], source, P,
                            cfg.img_size)
    n = min(args.show, len(imgs.x))
    maps = rollout_to_patch_map(attention_rollout([a[:n] for a in attentions], args.head_fusion),
                                pre, grid)
    plot_rollout(imgs.shown(n), maps, imgs.labels[:n], [top[0][0] for top in tops[:n]],
                 files["fig6_attention_rollout"], args.head_fusion, source)
    plot_heads(imgs.x[0], [a[:1] for a in attentions], layers, pre, grid, files["attention_heads"],
               source)
    print(f"attention of {len(imgs.x)} images and their mean distances: {look.seconds:.2f} s "
          f"(Figure 7 right averages over these {len(imgs.x)} images)")
    for path in files.values():
        print(f"  {path}")
    if args.wandb != "off":
        try:
            import wandb

            run = wandb.init(project="vit_from_scratch", job_type="visualize", mode=args.wandb,
                             dir=str(out), config={"source": source, "num_images": len(imgs.x)})
            run.log({name: wandb.Image(str(path)) for name, path in files.items()})
            run.finish()
        except Exception as e:
            print(f"warning: W&B logging failed: {e}", file=sys.stderr)
    return files


def run(args: argparse.Namespace) -> dict[str, Path]:
    """The explorer page with --html, else the figures; the files written."""
    return write_explorer(args) if args.html is not None else make_figures(args)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """The command line: our errors become one line `error: ...` and exit code 2 (--debug:
    traceback)."""
    return run_cli(lambda args: run(parse_args(args)), argv)


if __name__ == "__main__":
    main()
