"""A small ResNet for 32x32 images: the CNN that the `data` study of compare_configs.py sets
against the ViT (the paper's Figures 3-4 lesson, ViT vs ResNet as the training set grows).

Built from torchvision's own ResNet block (`BasicBlock`, He et al. 2016), adapted to CIFAR-sized
inputs as is usual: a 3x3 stem with stride 1 and no max-pool (the 7x7/2 stem and the pool of the
ImageNet ResNet would leave an 8x8 map after the first layer), then three stages that halve the
map and double the width. The default, widths (32, 64, 128) with two blocks each, has 696,618
parameters for 10 classes, close to vit_cifar_tiny's 810,890. It has the same interface as
VisionTransformer where the training loop needs one (`config`, `num_classes`, `no_weight_decay`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1


@dataclass
class ResNetConfig:
    """Everything needed to rebuild the CNN; stored inside checkpoints like ViTConfig. `arch` tells
    the two kinds of model_config apart."""

    arch: str = "resnet"
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    blocks: tuple[int, ...] = (2, 2, 2)

    def __post_init__(self) -> None:
        # lists when read from JSON
        self.widths, self.blocks = tuple(self.widths), tuple(self.blocks)
        if self.arch != "resnet":
            raise ValueError(f"arch must be 'resnet', got {self.arch!r}")
        if not (self.widths and len(self.widths) == len(self.blocks) and min(self.widths) >= 1
                and min(self.blocks) >= 1):
            raise ValueError(f"widths and blocks must be equally long lists of positive numbers, "
                             f"got {self.widths} and {self.blocks}")
        if self.img_size % 2 ** (len(self.widths) - 1):
            raise ValueError(f"img_size {self.img_size} must be divisible by "
                             f"2^{len(self.widths) - 1} (each stage after the first halves "
                             f"the map)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resnet_param_count(cfg: ResNetConfig) -> int:
    """Parameters by formula: a k x k conv from a to b channels has k^2 a b weights (no bias), a
    BatchNorm 2b (weight and bias); a block a->b has two 3x3 convs with their norms, plus a 1x1 conv
    and norm on the shortcut when the shape changes; the head is a linear layer."""
    total = 9 * cfg.in_chans * cfg.widths[0] + 2 * cfg.widths[0]  # stem
    a = cfg.widths[0]
    for i, (b, n) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
        for j in range(n):
            total += 9 * a * b + 9 * b * b + 4 * b
            if a != b or (i > 0 and j == 0):
                total += a * b + 2 * b
            a = b
    return total + a * cfg.num_classes + cfg.num_classes


class ResNetCIFAR(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.num_classes = cfg.num_classes
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_chans, w0, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        stages, a = [], w0
        for i, (b, n) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                shortcut = (nn.Sequential(conv1x1(a, b, stride), nn.BatchNorm2d(b))
                            if stride != 1 or a != b else None)
                layers.append(BasicBlock(a, b, stride, shortcut))
                a = b
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(a, cfg.num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def no_weight_decay(self) -> set[str]:
        return set()  # biases and norms are already excluded by the optimiser's grouping

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, C0, H, W)
        x = self.stages(x)  # (B, C_last, H / 2^(S-1), W / 2^(S-1))
        return self.head(torch.flatten(x.mean(dim=(2, 3)), 1))  # global average pool -> (B, K)
