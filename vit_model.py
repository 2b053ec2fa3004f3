"""Vision Transformer, written from scratch.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. Equation numbers (Eq. 1-4 in Sec. 3.1, Eq. 5-8 in Appendix A), sections and appendices
refer to that paper. Shapes: B batch, N = HW/P^2 patches (the paper's N), T tokens through the
encoder (N + 1 with [CLS], N with global average pooling), D = embed_dim, h heads, D_h = D / h.

    x -> PatchEmbed (Eq. 1) -> [CLS; patches] + pos_embed (Eq. 1)
      -> depth x Block (Eq. 2-3) -> LayerNorm -> CLS output or mean (Eq. 4) -> head

Parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.norm1`,
`blocks.{i}.attn.qkv`, ...), so timm, torchvision and Google JAX checkpoints map one to one
(see `convert_torchvision_state_dict` and `convert_jax_state_dict`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASSIFIERS = ("token", "gap")
POS_EMBEDS = ("learned", "sincos", "none")
GELUS = ("erf", "tanh")
# Mimetic initialisation (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers",
# ICML 2023, arXiv:2305.09828): (alpha, beta) of W_q W_k^T ~ alpha_1 Z_1 + beta_1 I and of
# W_v W_proj ~ alpha_2 Z_2 - beta_2 I, at the values for ViTs (alpha_1 = beta_1 = 0.7,
# alpha_2 = beta_2 = 0.4); see VisionTransformer.init_mimetic.
MIMETIC_QK = (0.7, 0.7)
MIMETIC_VPROJ = (0.4, 0.4)


@dataclass
class ViTConfig:
    """Everything needed to rebuild a model; stored inside every checkpoint."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768  # D in the paper
    depth: int = 12  # L in the paper
    num_heads: int = 12  # k in the paper (Appendix A)
    mlp_ratio: float = 4.0  # MLP size / D (Table 1)
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after every dense layer except qkv (Appendix B.1)
    attn_drop_rate: float = 0.0  # dropout on the attention weights
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth
    patch_drop_rate: float = 0.0  # training only: drop this fraction of patch tokens (PatchDropout)
    # "token": [CLS] (Eq. 4); "gap": global average pooling (Appendix D.3)
    classifier: str = "token"
    pos_embed: str = "learned"  # "learned" | "sincos" (fixed 2D) | "none" (Appendix D.4)
    representation_size: int | None = None  # pre-logits layer of the pre-training head (Sec. 3.1)
    # accept any square multiple of patch_size, pos_embed interpolated (Sec. 3.2)
    dynamic_img_size: bool = False
    # MLP activation: "erf" (exact, as torchvision and timm) or "tanh" (flax's nn.gelu default)
    gelu: str = "erf"
    # Not in the ViT paper: after the usual init, set each head's query-key product close to the
    # identity and the value-projection product close to minus the identity (Trockman & Kolter
    # 2023, "mimetic initialization"; VisionTransformer.init_mimetic). Off: the paper's model.
    mimetic_init: bool = False

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.mlp_ratio > 0 or self.num_classes < 0:
            raise ValueError(f"mlp_ratio must be positive and num_classes 0 or more, got "
                             f"{self.mlp_ratio} and {self.num_classes}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        if not isinstance(self.mimetic_init, bool):
            raise ValueError(f"mimetic_init must be True or False, got {self.mimetic_init!r}")
        if self.gelu not in GELUS:
            raise ValueError(f"gelu must be one of {GELUS}, got {self.gelu!r}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {self.pos_embed!r}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate", "patch_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """Sequence length T through the encoder: patches plus [CLS] if used."""
        return self.num_patches + (1 if self.classifier == "token" else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PatchEmbed(nn.Module):
    """Eq. 1, x_p^i E: split the image into P x P patches and project each one to D dims.

    A Conv2d with kernel = stride = P applies the same (D, C*P*P) matrix E to every
    non-overlapping patch: exactly the paper's "linear projection of flattened patches".
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, dynamic_img_size: bool = False) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(
                f"img_size ({img_size}) must be divisible by patch_size ({patch_size})"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.dynamic_img_size = dynamic_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a 4D image batch (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got {c} (shape {tuple(x.shape)})"
            )
        dynamic_ok = self.dynamic_img_size and h == w and h % self.patch_size == 0
        if (h != self.img_size or w != self.img_size) and not dynamic_ok:
            hint = (f"; {h}x{w} is not divisible by patch size {self.patch_size}"
                    if h % self.patch_size or w % self.patch_size
                    else "; call model.set_image_size() to change resolution (Sec. 3.2)")
            raise ValueError(
                f"expected images of {self.img_size}x{self.img_size}, got {h}x{w}{hint}"
            )
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    """Multi-head self-attention (Appendix A, Eq. 5-8) with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads  # D_h = D / k
        self.scale = self.head_dim**-0.5  # 1 / sqrt(D_h), Eq. 6
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # [q, k, v] = z U_qkv, Eq. 5
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)  # U_msa, Eq. 8
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """Returns the output (B, T, D) and, if asked, the attention weights (B, heads, T, T)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, h, D_h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, D_h)
        if return_attention:
            # Readable path: A = softmax(q k^T / sqrt(D_h)) (Eq. 6), SA(z) = A v (Eq. 7)
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, T, T)
            attn = attn.softmax(dim=-1)  # rows sum to 1
            x = self.attn_drop(attn) @ v  # (B, h, T, D_h)
        else:
            # Fused kernel (flash / memory-efficient): same maths, no (T, T) matrix kept
            attn = None
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )  # (B, h, T, D_h)
        # concatenate heads, [SA_1; ...; SA_k] (Eq. 8)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        x = self.proj_drop(self.proj(x))  # (B, T, D)
        return x, attn


class MLP(nn.Module):
    """Two dense layers with a GELU between them (Sec. 3.1). gelu="erf" is the exact form
    (torchvision and timm); "tanh" is the approximation that flax's nn.gelu uses by default, so the
    official JAX models were trained with it."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, gelu: str = "erf") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="none" if gelu == "erf" else "tanh")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, T, mlp_dim)
        return self.drop2(self.fc2(x))  # (B, T, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (Huang et al., 2016)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """One pre-norm Transformer encoder layer (Eq. 2-3)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 gelu: str = "erf") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop, gelu)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path1(y)  # Eq. 2: z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        x = x + self.drop_path2(self.mlp(self.norm2(x)))  # Eq. 3: z_l = MLP(LN(z'_l)) + z'_l
        return x, attn  # (B, T, D), (B, h, T, T) or None


def sincos_pos_embed_2d(grid_size: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2D sine-cosine position embedding, shape (grid_size**2, dim), as big_vision's
    `posemb_sincos_2d` (later ViT work and MAE). Not one of the paper's variants: its "2-D"
    embedding (Appendix D.4, Table 8) is learned, an X table and a Y table of D/2 each,
    concatenated.

    A quarter of the channels each for sin(x), cos(x), sin(y), cos(y) (x: column, y: row), at the
    frequencies 1 / temperature^(i / (dim/4 - 1)), i = 0 .. dim/4 - 1.
    """
    if dim % 4 != 0 or dim < 8:
        raise ValueError("embed_dim must be a multiple of 4 and at least 8 for sincos position "
                         f"embedding, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each, row-major like the patches
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4 - 1))
    y = y.flatten()[:, None] * omega[None, :]  # (g*g, D/4)
    x = x.flatten()[:, None] * omega[None, :]  # (g*g, D/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()  # (g*g, D)


def resize_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1,
                     mode: str = "bicubic") -> Tensor:
    """Sec. 3.2: 2D-interpolate a learned position embedding to a new patch grid.

    pos_embed: (1, num_prefix_tokens + g*g, D). The [CLS] slot is kept as it is; the g x g grid of
    patch embeddings is resized to new_grid x new_grid. Returns
    (1, num_prefix_tokens + new_grid**2, D).
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected pos_embed of shape (1, T, D), got {tuple(pos_embed.shape)}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = math.isqrt(grid.shape[1])
    if old_grid**2 != grid.shape[1]:
        raise ValueError(f"{grid.shape[1]} patch positions do not form a square grid")
    D = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode=mode, align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_grid**2, D)  # (1, g'*g', D)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    """ViT (Sec. 3.1). `forward(x)` gives logits; `forward(x, return_attention=True)` also gives
    every layer's attention weights, a list of `depth` tensors of shape (B, heads, T, T)."""

    def __init__(self, config: ViTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is not None and kwargs:
            raise ValueError("pass either a ViTConfig or keyword arguments, not both")
        self.config = cfg = config if config is not None else ViTConfig(**kwargs)
        D = self.embed_dim = self.num_features = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_prefix_tokens = 1 if cfg.classifier == "token" else 0

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D,
                                      cfg.dynamic_img_size)
        # x_class (Eq. 1); absent for global average pooling (Appendix D.3)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.classifier == "token" else None
        if cfg.pos_embed == "learned":  # E_pos (Eq. 1)
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D))
        elif cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", self._sincos(cfg.grid_size), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.patch_drop_rate = cfg.patch_drop_rate  # may be changed during training

        # drop-path rate per block: linear rule
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_rate, cfg.attn_drop_rate,
                  dpr[i], cfg.gelu)
            for i in range(cfg.depth)
        ])
        self.norm = nn.LayerNorm(D, eps=1e-6)  # LN before the head (Eq. 4)
        if cfg.representation_size:  # pre-training head: one hidden layer with tanh (Sec. 3.1)
            self.pre_logits = nn.Sequential(OrderedDict(
                fc=nn.Linear(D, cfg.representation_size), act=nn.Tanh()))
            self.num_features = cfg.representation_size
        else:
            self.pre_logits = nn.Identity()
        self.head = (nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0
                     else nn.Identity())
        self.init_weights()
        if cfg.mimetic_init:  # after the usual init, which it leaves as it is when off
            self.init_mimetic()

    def _sincos(self, grid_size: int) -> Tensor:
        pe = sincos_pos_embed_2d(grid_size, self.embed_dim)  # (g*g, D)
        if self.num_prefix_tokens:
            # CLS slot: 0
            pe = torch.cat([pe.new_zeros(self.num_prefix_tokens, self.embed_dim), pe])
        return pe.unsqueeze(0)  # (1, T, D)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Close to the official JAX models (vit_jax/models_vit.py), with two small differences
        of ours.

        As there: linear weights xavier-uniform (the Dense layers of the MLP and attention; q, k and
        v are separate D x D kernels in JAX, so each third of our fused qkv gets xavier-uniform of
        its own fan, where xavier on the whole (3D, D) matrix would give a smaller bound); patch
        embedding LeCun normal (flax Conv default); [CLS] zeros; classification head zeros, so
        training starts from uniform logits. Ours: every bias zero (the official MLP biases are
        normal, std 1e-6), and the position embedding a normal of std 0.02 truncated at 2 std
        (official: not truncated).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            for w in blk.attn.qkv.weight.chunk(3, dim=0):  # W_q, W_k, W_v, each (D, D)
                nn.init.xavier_uniform_(w)
        w = self.patch_embed.proj.weight  # (D, C, P, P)
        std = math.sqrt(1.0 / w[0].numel()) / 0.87962566  # unit variance after truncation at 2 std
        nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def init_mimetic(self, qk: tuple[float, float] = MIMETIC_QK,
                     vproj: tuple[float, float] = MIMETIC_VPROJ) -> None:
        """Mimetic initialisation of every attention layer (Trockman & Kolter, "Mimetic
        Initialization of Self-Attention Layers", ICML 2023): make the products of weights look
        like those of pre-trained ViTs, a query-key product near the identity (so a token first
        attends to itself and to tokens like it) and a value-projection product near minus it.

        In this module's orientation (a Linear weight W maps x to x W^T; D_h = D / heads):
          - head h: scores are (x W_q,h^T)(y W_k,h^T)^T = x (W_q,h^T W_k,h) y^T, a D x D bilinear
            form of rank D_h. Draw M = alpha_1 Z + beta_1 I, Z of N(0, 1/D) entries, a new Z for
            every head and layer; with M = U S V^T, set W_q,h = (U_k S_k^1/2)^T and
            W_k,h = (V_k S_k^1/2)^T (k = D_h leading singular values), so W_q,h^T W_k,h is the
            best rank-D_h approximation of M;
          - all heads together: the value and output projections form the full-rank D x D map
            x -> proj(v(x)) = x (W_proj W_v)^T. Draw M = alpha_2 Z - beta_2 I = U S V^T and set
            W_proj = U S^1/2, W_v = S^1/2 V^T, so W_proj W_v = M exactly.
        The q, k, v rows of the fused qkv weight are split by heads as Attention.forward splits
        its output: rows s*D + h*D_h .. s*D + (h+1)*D_h - 1 for s = 0 (q), 1 (k), 2 (v). Biases
        keep their zeros, and everything outside qkv.weight and proj.weight is untouched.
        """
        (a1, b1), (a2, b2) = qk, vproj
        D = self.embed_dim
        eye = torch.eye(D, dtype=torch.float64)

        def factors(alpha: float, beta: float) -> tuple[Tensor, Tensor, Tensor]:
            z = torch.randn(D, D).double() / math.sqrt(D)  # Z: entries N(0, 1/D)
            return torch.linalg.svd(alpha * z + beta * eye)  # U (D, D), S (D,), V^T (D, D)

        for blk in self.blocks:
            attn = blk.attn
            Dh = attn.head_dim
            w = attn.qkv.weight  # (3D, D)
            for h in range(attn.num_heads):
                U, S, Vt = factors(a1, b1)
                root = S[:Dh].sqrt()  # (D_h,)
                w[h * Dh:(h + 1) * Dh].copy_(root[:, None] * U[:, :Dh].T)  # W_q,h (D_h, D)
                w[D + h * Dh:D + (h + 1) * Dh].copy_(root[:, None] * Vt[:Dh])  # W_k,h (D_h, D)
            U, S, Vt = factors(a2, -b2)
            root = S.sqrt()  # (D,)
            w[2 * D:].copy_(root[:, None] * Vt)  # W_v (D, D)
            attn.proj.weight.copy_(U * root)  # W_proj (D, D)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: Tensor, return_attention: bool = False
                         ) -> tuple[Tensor, list[Tensor]]:
        """(B, C, H, W) -> normalised tokens (B, T, D) and the per-layer attention (if asked)."""
        grid = x.shape[-1] // self.patch_embed.patch_size
        x = self.patch_embed(x)  # (B, N, D), Eq. 1
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N + 1, D)
        if self.pos_embed is not None:
            x = x + self._pos_embed_at(grid)  # (B, T, D), Eq. 1
        x = self.pos_drop(x)
        if self.training and self.patch_drop_rate > 0:
            x = self._patch_dropout(x)  # (B, T', D), T' < T
        attentions = []
        for blk in self.blocks:
            x, attn = blk(x, return_attention)  # (B, T, D), Eq. 2-3
            if return_attention:
                attentions.append(attn)  # (B, h, T, T)
        return self.norm(x), attentions  # (B, T, D)

    def _pos_embed_at(self, grid: int) -> Tensor:
        """E_pos for a grid x grid patch grid: the model's own, or for another grid
        (dynamic_img_size) the learned one 2D-interpolated (Sec. 3.2; differentiable, so training
        updates the original) or the fixed one recomputed. Returns (1, T, D)."""
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        if isinstance(self.pos_embed, nn.Parameter):
            return resize_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)
        return self._sincos(grid).to(self.pos_embed)

    def _patch_dropout(self, x: Tensor) -> Tensor:
        """Keep a random subset of patch tokens per sample, [CLS] always kept (Liu et al., 2022).

        Cost is linear in the number of tokens, so dropping half of them about halves training
        time; the position embedding was added before, so kept patches still know where they are.
        """
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        B, N, D = patches.shape
        keep = max(1, round(N * (1.0 - self.patch_drop_rate)))
        idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep]  # (B, keep)
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, D))  # (B, keep, D)
        return torch.cat([prefix, patches], dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Normalised tokens (B, T, D) -> logits (B, num_classes), Eq. 4."""
        x = x[:, 0] if self.config.classifier == "token" else x.mean(dim=1)  # (B, D): y = LN(z_L^0)
        x = self.pre_logits(x)  # (B, representation_size) or (B, D)
        return x if pre_logits else self.head(x)  # (B, num_classes)

    def forward(self, x: Tensor, return_attention: bool = False
                ) -> Tensor | tuple[Tensor, list[Tensor]]:
        feats, attentions = self.forward_features(x, return_attention)
        logits = self.forward_head(feats)
        return (logits, attentions) if return_attention else logits

    def get_attention_maps(self, x: Tensor) -> list[Tensor]:
        """Every layer's attention weights, `depth` tensors of shape (B, heads, T, T)."""
        return self.forward_features(x, return_attention=True)[1]

    def set_image_size(self, img_size: int) -> None:
        """Sec. 3.2: run at a new resolution; a learned position embedding is 2D-interpolated.

        The position embedding is resized in place: it stays the same Parameter object, so an
        optimiser built before still trains it. Call it before the optimiser's first step (or build
        the optimiser after it): moment estimates already kept for the old shape do not fit the new
        one.
        """
        cfg = ViTConfig(**{**self.config.to_dict(), "img_size": img_size})  # validates divisibility
        self.patch_embed.img_size = img_size
        self.patch_embed.grid_size = cfg.grid_size
        self.patch_embed.num_patches = cfg.num_patches
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed.data = resize_pos_embed(self.pos_embed.data, cfg.grid_size,
                                                   self.num_prefix_tokens)
            self.pos_embed.grad = None
        elif self.pos_embed is not None:
            self.pos_embed = self._sincos(cfg.grid_size).to(self.pos_embed)
        self.config = cfg


# --------------------------------------------------------------------------------------------
# Named configurations and factories: Table 1 of the paper, and small presets for 32x32 images
# --------------------------------------------------------------------------------------------

# One registry of named configurations: Table 1 of the paper (ImageNet sizes, patch 16/14 at 224)
# and small presets for 32x32 images (patch 4: an 8x8 grid, 64 patches, 65 tokens with [CLS]).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # parameters: 86.6M as B/16, 304.3M as L/16, 632.0M as H/14
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_size=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, patch_size=14),
    "vit_cifar_tiny": dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, patch_size=4,
                           img_size=32, num_classes=10),
    "vit_cifar_small": dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0, patch_size=4,
                            img_size=32, num_classes=10),
    "vit_cifar_base": dict(embed_dim=256, depth=12, num_heads=8, mlp_ratio=4.0, patch_size=4,
                           img_size=32, num_classes=10),
}
CIFAR_PRESETS = tuple(name for name in MODEL_CONFIGS if name.startswith("vit_cifar"))


def model_config(name: str, **overrides: Any) -> ViTConfig:
    """The named configuration of MODEL_CONFIGS with some fields replaced (None keeps the
    preset's)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_CONFIGS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return ViTConfig(**{**MODEL_CONFIGS[name], **given})


def vit_base(patch_size: int = 16, img_size: int = 224, num_classes: int = 1000, **kwargs: Any
             ) -> VisionTransformer:
    """ViT-Base (Table 1): 12 layers, D=768, MLP 3072, 12 heads; 86.6M parameters as B/16."""
    return VisionTransformer(model_config("vit_base", patch_size=patch_size, img_size=img_size,
                                          num_classes=num_classes, **kwargs))


def vit_large(patch_size: int = 16, img_size: int = 224, num_classes: int = 1000, **kwargs: Any
              ) -> VisionTransformer:
    """ViT-Large (Table 1): 24 layers, D=1024, MLP 4096, 16 heads; 304.3M parameters as L/16."""
    return VisionTransformer(model_config("vit_large", patch_size=patch_size, img_size=img_size,
                                          num_classes=num_classes, **kwargs))


def vit_huge(patch_size: int = 14, img_size: int = 224, num_classes: int = 1000, **kwargs: Any
             ) -> VisionTransformer:
    """ViT-Huge (Table 1): 32 layers, D=1280, MLP 5120, 16 heads; 632.0M parameters as H/14."""
    return VisionTransformer(model_config("vit_huge", patch_size=patch_size, img_size=img_size,
                                          num_classes=num_classes, **kwargs))


def vit_cifar(name: str = "vit_cifar_small", num_classes: int = 10, **kwargs: Any
              ) -> VisionTransformer:
    """A small ViT for 32x32 images with 4x4 patches; `name` is one of CIFAR_PRESETS."""
    if name not in CIFAR_PRESETS:
        raise ValueError(f"unknown CIFAR preset {name!r}; choose from {sorted(CIFAR_PRESETS)}")
    return VisionTransformer(model_config(name, num_classes=num_classes, **kwargs))


def estimate_flops(cfg: ViTConfig) -> dict[str, int]:
    """Forward-pass FLOPs for one image, counting a multiply-add as 2 (matrix products only).

    With T tokens through the encoder, D channels, MLP size M, N patches of C*P*P values:
      patch embedding 2 N (C P^2) D;  per block: qkv 6 T D^2, scores Q K^T 2 T^2 D,
      weighted sum A V 2 T^2 D, output projection 2 T D^2, MLP 4 T D M;  head 2 D K.
    The T^2 terms are the quadratic cost of attention.
    """
    T, D, M = cfg.num_tokens, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    linear = 8 * T * D * D + 4 * T * D * M  # qkv + proj + fc1 + fc2
    attention = 4 * T * T * D  # Q K^T and A V
    out = {
        "patch_embed": 2 * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * D,
        "blocks_linear": cfg.depth * linear,
        "blocks_attention": cfg.depth * attention,
        "pre_logits": 2 * D * cfg.representation_size if cfg.representation_size else 0,
        "head": 2 * (cfg.representation_size or D) * cfg.num_classes,
    }
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------
# Loading weights: checked loading, torchvision and Google JAX checkpoints
# --------------------------------------------------------------------------------------------

def load_state_dict_checked(model: VisionTransformer, state_dict: Mapping[str, Tensor],
                            skip_head: bool = False) -> None:
    """Load weights, naming every missing, unexpected or mis-shaped key in one ValueError.

    A learned `pos_embed` for another square grid is resized to the model's (Sec. 3.2), so weights
    trained at 224 load into a model built for 384. With skip_head the classifier weights are not
    loaded and the model keeps its zero-initialised head (fine-tuning on new classes).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError("expected a state dict (parameter name -> tensor), got "
                         f"{type(state_dict).__name__}")
    own = model.state_dict()
    if ("cls_token" in state_dict) != ("cls_token" in own):  # Eq. 4 vs Appendix D.3
        kinds = {True: "a [CLS] token (classifier='token')",
                 False: "global average pooling (classifier='gap')"}
        raise ValueError(f"the weights are of a model with {kinds['cls_token' in state_dict]}, "
                         f"this model uses {kinds['cls_token' in own]}: build it with the "
                         "weights' classifier")
    sd = {k: v for k, v in state_dict.items() if not (skip_head and k.startswith("head."))}
    expected = {k for k in own if not (skip_head and k.startswith("head."))}
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape \
            and pe.ndim == 3 and pe.shape[-1] == own["pos_embed"].shape[-1]:
        sd["pos_embed"] = resize_pos_embed(pe, model.patch_embed.grid_size, model.num_prefix_tokens)
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - own.keys())
    shapes = sorted(f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
                    for k in expected & sd.keys() if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        parts = [f"missing keys: {missing}"] if missing else []
        parts += [f"unexpected keys: {unexpected}"] if unexpected else []
        parts += [f"shape mismatch: {shapes}"] if shapes else []
        raise ValueError("state dict does not fit this model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=not skip_head)


def _block_keys(i: int) -> dict[str, str]:
    return {name: f"blocks.{i}.{name}" for name in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")}


def convert_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision `VisionTransformer` state dict (vit_b_16, ...) to this model's names."""
    out = {
        "cls_token": state_dict["class_token"],  # (1, 1, D)
        "pos_embed": state_dict["encoder.pos_embedding"],  # (1, T, D)
        "patch_embed.proj.weight": state_dict["conv_proj.weight"],  # (D, C, P, P)
        "patch_embed.proj.bias": state_dict["conv_proj.bias"],
        "norm.weight": state_dict["encoder.ln.weight"],
        "norm.bias": state_dict["encoder.ln.bias"],
    }
    tv_names = {  # ours -> torchvision's, inside encoder.layers.encoder_layer_{i}
        "norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
        "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
        "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3",
    }
    state_dict = {k.replace("mlp.linear_1.", "mlp.0.").replace("mlp.linear_2.", "mlp.3."): v
                  for k, v in state_dict.items()}  # files saved before torchvision 0.14
    depth = sum(1 for k in state_dict if k.endswith(".ln_1.weight"))
    for i in range(depth):
        for ours, key in _block_keys(i).items():
            stem = next(s for s in tv_names if ours.startswith(s))
            tv_key = f"encoder.layers.encoder_layer_{i}.{tv_names[stem]}{ours[len(stem):]}"
            out[key] = state_dict[tv_key]
    for ours, tv in (("head", "heads.head"), ("pre_logits.fc", "heads.pre_logits")):
        for p in ("weight", "bias"):
            if f"{tv}.{p}" in state_dict:
                out[f"{ours}.{p}"] = state_dict[f"{tv}.{p}"]
    return out


def convert_jax_state_dict(arrays: Mapping[str, Any]) -> dict[str, Tensor]:
    """Convert a Google ViT checkpoint (the arrays of its `.npz`, e.g. `np.load("ViT-B_16.npz")`).

    Flax Dense kernels are (in, out), so they are transposed; attention kernels are per head:
    query/key/value (D, h, D_h) and out (h, D_h, D); the patch kernel is (P, P, C, D).
    """
    t = {k: torch.as_tensor(v).float() for k, v in arrays.items()}
    out = {
        "cls_token": t["cls"],  # (1, 1, D)
        "pos_embed": t["Transformer/posembed_input/pos_embedding"],  # (1, T, D)
        "patch_embed.proj.weight": t["embedding/kernel"].permute(3, 2, 0, 1),  # (D, C, P, P)
        "patch_embed.proj.bias": t["embedding/bias"],
        "norm.weight": t["Transformer/encoder_norm/scale"],
        "norm.bias": t["Transformer/encoder_norm/bias"],
    }
    depth = sum(1 for k in t if k.endswith("LayerNorm_0/scale"))
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        a = p + "MultiHeadDotProductAttention_1/"
        D = t[a + "query/kernel"].shape[0]
        b = f"blocks.{i}."
        out[b + "norm1.weight"], out[b + "norm1.bias"] = (t[p + "LayerNorm_0/scale"],
                                                          t[p + "LayerNorm_0/bias"])
        out[b + "attn.qkv.weight"] = torch.cat(
            [t[a + n + "/kernel"].reshape(D, D).T for n in ("query", "key", "value")])  # (3D, D)
        out[b + "attn.qkv.bias"] = torch.cat(
            [t[a + n + "/bias"].reshape(D) for n in ("query", "key", "value")])  # (3D,)
        out[b + "attn.proj.weight"] = t[a + "out/kernel"].reshape(D, D).T  # (h, D_h, D) -> (D, D)
        out[b + "attn.proj.bias"] = t[a + "out/bias"]
        out[b + "norm2.weight"], out[b + "norm2.bias"] = (t[p + "LayerNorm_2/scale"],
                                                          t[p + "LayerNorm_2/bias"])
        for j in (0, 1):
            out[b + f"mlp.fc{j + 1}.weight"] = t[p + f"MlpBlock_3/Dense_{j}/kernel"].T
            out[b + f"mlp.fc{j + 1}.bias"] = t[p + f"MlpBlock_3/Dense_{j}/bias"]
    for ours, jax in (("head", "head"), ("pre_logits.fc", "pre_logits")):
        if f"{jax}/kernel" in t:
            out[f"{ours}.weight"] = t[f"{jax}/kernel"].T
            out[f"{ours}.bias"] = t[f"{jax}/bias"]
    return out


def config_from_state_dict(sd: Mapping[str, Tensor], **overrides: Any) -> ViTConfig:
    """Infer a ViTConfig from converted weights. The number of heads cannot be inferred: give it
    (num_heads=...), else it is the paper's for D = 768, 1024, 1280 (Table 1) and D / 64
    otherwise."""
    D, C, P, _ = sd["patch_embed.proj.weight"].shape
    depth = sum(1 for k in sd if k.endswith("norm1.weight"))
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    fields = dict(img_size=grid * P, patch_size=P, in_chans=C, embed_dim=D, depth=depth,
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
                  num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                  representation_size=(sd["pre_logits.fc.weight"].shape[0]
                                       if "pre_logits.fc.weight" in sd else None),
                  num_heads={768: 12, 1024: 16, 1280: 16}.get(D, max(1, D // 64)))
    return ViTConfig(**{**fields, **overrides})


def load_jax_npz(path: str, **overrides: Any) -> VisionTransformer:
    """Build a model from a Google `.npz` checkpoint
    (github.com/google-research/vision_transformer), with the tanh GELU those models were trained
    with (pass gelu="erf" for the exact form)."""
    import zipfile

    import numpy as np

    try:
        npz = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {path} as an .npz file: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, not an .npz archive of a ViT checkpoint")
    with npz:
        arrays = dict(npz)
    try:
        sd = convert_jax_state_dict(arrays)
    except KeyError as e:
        raise ValueError(f"{path} is not a Google ViT checkpoint: it has no array {e} "
                         f"(found {sorted(arrays)[:5]}...)") from e
    query = arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    model = VisionTransformer(config_from_state_dict(  # the query kernel is (D, heads, D_h)
        sd, **{"gelu": "tanh", "num_heads": query.shape[1], **overrides}))
    load_state_dict_checked(model, sd, skip_head="head.weight" not in sd)
    return model


class DownloadError(RuntimeError):
    """Pretrained weights could not be downloaded (no network)."""


def load_torchvision_pretrained(arch: str = "vit_b_16", weights: str = "IMAGENET1K_V1",
                                progress: bool = True) -> VisionTransformer:
    """Real ImageNet weights in one call, downloaded through torchvision and converted.

    arch: vit_b_16 | vit_b_32 | vit_l_16 | vit_l_32 | vit_h_14; weights: a torchvision weights name.
    """
    from torchvision.models import get_model_weights  # optional dependency of the model module

    try:
        w = get_model_weights(arch)[weights]
    except (ValueError, KeyError) as e:
        raise ValueError(f"unknown torchvision ViT {arch!r} / weights {weights!r}: {e}") from e
    try:
        sd = w.get_state_dict(progress=progress)
    except OSError as e:  # URLError, socket errors, DNS failures are all OSErrors
        raise DownloadError(
            f"could not download {arch} {weights} from {w.url}: {e}. This needs network access; "
            "offline, download the file elsewhere and use "
            "convert_torchvision_state_dict(torch.load(path)) with load_state_dict_checked()."
        ) from e
    sd = convert_torchvision_state_dict(sd)
    model = VisionTransformer(config_from_state_dict(sd))
    load_state_dict_checked(model, sd)
    return model
