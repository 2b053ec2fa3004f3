"""Exercise: write the five modules of a ViT yourself, then check them against vit_model.py:

    python check_exercise.py              # checks this file, module by module
    python check_exercise.py my_vit.py    # or any file with these five classes

Fill in every `raise NotImplementedError`. Keep the constructor signatures and the attribute names
given in each docstring (`proj`, `qkv`, `fc1`, `norm1`, ...): the checker copies the reference
weights into your modules by these names, feeds both the same input and compares the outputs
(to 1e-5). Shapes use B (batch), C (channels), H, W (image), P (patch), N = HW/P^2 (patches),
T (tokens through the encoder: N + 1 with [CLS]), D (embed_dim), k (heads), D_h = D/k, M (MLP size).
The guide to read alongside: vit_architecture.md, sections 3-5.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Eq. 1, x_p^i E: cut the image into P x P patches and project each one to D dimensions.

    Attribute: `proj`, an nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size).
    forward: (B, C, H, W) -> (B, N, D), the patches in row-major order (row 0 left to right, then
    row 1...).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        raise NotImplementedError("PatchEmbed.__init__")

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, D, H/P, W/P) -> (B, N, D)
        raise NotImplementedError("PatchEmbed.forward")


class Attention(nn.Module):
    """Multi-head self-attention, Appendix A, Eq. 5-8.

    Attributes: `qkv`, nn.Linear(dim, 3 * dim, bias=qkv_bias), whose output is [q | k | v] along the
    last axis, each of them the k heads side by side (head i is columns i*D_h to (i+1)*D_h - 1);
    `proj`, nn.Linear(dim, dim), the output projection U_msa.
    forward: (B, T, D) -> (B, T, D).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        raise NotImplementedError("Attention.__init__")

    def forward(self, x: Tensor) -> Tensor:
        # [q, k, v] = z U_qkv (Eq. 5)                         3 x (B, k, T, D_h)
        # A = softmax(q k^T / sqrt(D_h)) (Eq. 6)              (B, k, T, T), each row sums to 1
        # SA = A v (Eq. 7)                                    (B, k, T, D_h)
        # MSA = [SA_1; ...; SA_k] U_msa (Eq. 8)               (B, T, D)
        raise NotImplementedError("Attention.forward")


class MLP(nn.Module):
    """The MLP of every block (Sec. 3.1): dense, GELU (the exact erf form), dense.

    Attributes: `fc1`, nn.Linear(dim, hidden_dim); `fc2`, nn.Linear(hidden_dim, dim).
    forward: (B, T, D) -> (B, T, M) -> (B, T, D).
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        raise NotImplementedError("MLP.__init__")

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError("MLP.forward")


class Block(nn.Module):
    """One Transformer encoder layer, Eq. 2-3 (pre-norm, two residual connections).

    Attributes: `norm1`, `norm2`: nn.LayerNorm(dim, eps=1e-6); `attn`: Attention(dim, num_heads);
    `mlp`: MLP(dim, int(dim * mlp_ratio)).
    forward: (B, T, D) -> (B, T, D).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        raise NotImplementedError("Block.__init__")

    def forward(self, x: Tensor) -> Tensor:
        # z' = MSA(LN(z)) + z (Eq. 2);  z = MLP(LN(z')) + z' (Eq. 3)
        raise NotImplementedError("Block.forward")


class VisionTransformer(nn.Module):
    """ViT with a [CLS] token and a learned 1D position embedding (Sec. 3.1, Eq. 1-4).

    Attributes: `patch_embed` (PatchEmbed); `cls_token`, nn.Parameter of shape (1, 1, D);
    `pos_embed`, nn.Parameter of shape (1, N + 1, D); `blocks`, nn.ModuleList of `depth` Blocks;
    `norm`, nn.LayerNorm(D, eps=1e-6); `head`, nn.Linear(D, num_classes).
    forward: (B, C, H, W) -> (B, num_classes).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        raise NotImplementedError("VisionTransformer.__init__")

    def forward(self, x: Tensor) -> Tensor:
        # z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos (Eq. 1)     (B, N + 1, D)
        # z_l = Block(z_{l-1}), l = 1..L (Eq. 2-3)                    (B, N + 1, D)
        # y = LN(z_L^0) (Eq. 4), then the head                        (B, D) -> (B, num_classes)
        raise NotImplementedError("VisionTransformer.forward")


if __name__ == "__main__":
    torch.manual_seed(0)
    print(VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2,
                            num_heads=4)
          (torch.randn(2, 3, 32, 32)).shape)  # torch.Size([2, 10]) once everything is written
