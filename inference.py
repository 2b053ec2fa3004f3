"""Using a trained model: the CIFAR-10 model that ships with the repository in one line, and the
top-k classes of images or logits.

    from inference import load_pretrained_cifar, top_k
    model = load_pretrained_cifar()  # model.pretrained_cfg: classes, mean, std, card
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from checkpoint import (
    card_path,
    input_normalization,
    load_checkpoint,
    model_from_checkpoint,
    read_card,
)
from data import normalize

# The trained model that ships with the repository (weights only, half precision) and its card.
SHIPPED_MODEL = Path(__file__).resolve().parent / "checkpoints" / "vit_cifar_tiny_cpu.pt"


def load_pretrained_cifar(path: str | Path = SHIPPED_MODEL, check_hash: bool = True) -> nn.Module:
    """The shipped CIFAR-10 model, in eval mode. It expects images scaled to [0, 1] and
    normalised with model.pretrained_cfg's mean and std (data.normalize does both for uint8
    images). With check_hash the file must have a card and match its sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path} (the repository ships one as "
                                f"checkpoints/{SHIPPED_MODEL.name})")
    if check_hash and not card_path(path).is_file():
        raise FileNotFoundError(f"no card {card_path(path)} next to {path} to check its sha256 "
                                f"against")
    card = read_card(path) if card_path(path).is_file() else None
    ckpt = load_checkpoint(path, check_card=check_hash)
    model = model_from_checkpoint(ckpt).eval()
    mean, std = input_normalization(ckpt)
    model.pretrained_cfg = {"classes": list(ckpt.get("classes") or []), "mean": mean, "std": std,
                            "card": card}
    return model


@torch.inference_mode()
def top_k(model: nn.Module, images: Tensor, mean: tuple, std: tuple, classes: list[str] | None,
          k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each uint8 image (B, 3, H, W) with their softmax
    probabilities."""
    return top_classes(model(normalize(images, mean, std)), classes, k)


def top_classes(logits: Tensor, classes: list[str] | None, k: int = 3
                ) -> list[list[tuple[str, float]]]:
    """The k most probable classes of each row of logits (B, num_classes), with their
    probabilities."""
    probs = logits.float().softmax(-1)  # (B, num_classes)
    p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
    name = (lambda c: classes[c]) if classes else str
    return [[(name(int(c)), float(q)) for q, c in zip(pr, ix, strict=True)]
            for pr, ix in zip(p, i, strict=True)]
