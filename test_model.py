"""Tests for vit_model.py. `pytest test_model.py` runs them; `python test_model.py` prints the
model structure, a shape trace of one forward pass and the parameter table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from vit_model import (
    CIFAR_PRESETS,
    MIMETIC_QK,
    MIMETIC_VPROJ,
    MLP,
    Attention,
    Block,
    DropPath,
    PatchEmbed,
    VisionTransformer,
    ViTConfig,
    convert_jax_state_dict,
    convert_torchvision_state_dict,
    estimate_flops,
    load_jax_npz,
    load_state_dict_checked,
    load_torchvision_pretrained,
    resize_pos_embed,
    sincos_pos_embed_2d,
    vit_base,
    vit_cifar,
    vit_huge,
    vit_large,
)


def tiny(**kw) -> VisionTransformer:
    cfg = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=4)
    return VisionTransformer(**{**cfg, **kw})


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b16() -> VisionTransformer:
    torch.manual_seed(0)
    return vit_base().eval()


def test_vit_b16_shapes_at_every_stage(vit_b16):
    x = torch.randn(2, 3, 224, 224)  # (B, 3, 224, 224)
    with torch.no_grad():
        patches = vit_b16.patch_embed(x)
        assert patches.shape == (2, 196, 768)  # 14 x 14 patches of 16 x 16 x 3
        tokens, attns = vit_b16.forward_features(x, return_attention=True)
        assert tokens.shape == (2, 197, 768)  # [CLS] + 196 patches through the encoder
        assert len(attns) == 12 and all(a.shape == (2, 12, 197, 197) for a in attns)
        pooled = vit_b16.forward_head(tokens, pre_logits=True)
        assert pooled.shape == (2, 768)
        assert vit_b16.forward_head(tokens).shape == (2, 1000)
        assert vit_b16(x).shape == (2, 1000)


def test_each_module_alone():
    x = torch.randn(3, 3, 32, 32)
    assert PatchEmbed(32, 4, 3, 48)(x).shape == (3, 64, 48)
    z = torch.randn(3, 65, 48)
    out, attn = Attention(48, num_heads=6)(z, return_attention=True)
    assert out.shape == (3, 65, 48) and attn.shape == (3, 6, 65, 65)
    assert MLP(48, 96)(z).shape == (3, 65, 48)
    out, attn = Block(48, 6)(z)
    assert out.shape == (3, 65, 48) and attn is None


# ---------------------------------------------------------------------------------------------
# Parameter counts (meta device: no memory allocated)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory, expected", [
    (vit_base, 86_567_656), (vit_large, 304_326_632), (vit_huge, 632_045_800)])
def test_paper_parameter_counts(factory, expected):
    with torch.device("meta"):
        model = factory()
    assert n_params(model) == expected


@pytest.mark.parametrize("D", [768, 1024, 1280, 192])
def test_block_parameter_formula(D):
    # qkv: 3D^2 + 3D, proj: D^2 + D, fc1: DM + M, fc2: MD + D, two LayerNorms: 4D
    # -> 4D^2 + 2DM + 9D + M
    for ratio, closed_form in ((4.0, 12 * D * D + 13 * D), (2.0, 8 * D * D + 11 * D)):
        M = int(D * ratio)
        with torch.device("meta"):
            block = Block(D, num_heads=D // 64, mlp_ratio=ratio)
        weights = sum(p.numel() for name, p in block.named_parameters() if name.endswith("weight"))
        assert weights == 4 * D * D + 2 * D * M + 2 * D  # the guide's table, column by column
        assert n_params(block) - weights == 7 * D + M
        assert n_params(block) == 4 * D * D + 2 * D * M + 9 * D + M == closed_form


def test_total_parameter_formula_for_every_preset():
    for name in CIFAR_PRESETS:
        model = vit_cifar(name)
        c = model.config
        D, P, C = c.embed_dim, c.patch_size, c.in_chans
        hidden = int(D * c.mlp_ratio)
        block = 4 * D * D + 4 * D + 2 * D * hidden + hidden + D + 4 * D
        expected = ((C * P * P * D + D) + D + c.num_tokens * D + c.depth * block + 2 * D
                    + D * 10 + 10)
        assert n_params(model) == expected, name


@pytest.mark.parametrize("kw", [dict(), dict(classifier="gap", mlp_ratio=2.0),
                                dict(representation_size=24)])
def test_flops_formula_matches_pytorch_flop_counter(kw):
    from torch.utils.flop_counter import FlopCounterMode

    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=4,
                              num_classes=10, **kw).eval()
    # the explicit attention path, whose Q K^T and A V are plain matmuls the counter sees on
    # any device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 32, 32), return_attention=True)
    assert counter.get_total_flops() == 2 * estimate_flops(model.config)["total"]  # batch of 2


# ---------------------------------------------------------------------------------------------
# Equivalence with independent computations
# ---------------------------------------------------------------------------------------------

def test_patch_embed_is_a_linear_map_of_flattened_patches():
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=20)
    x = torch.randn(2, 3, 32, 32)
    # cut 8x8 patches by hand, row-major, each flattened as (C, P, P)
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, C, 4, 4, 8, 8)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 8 * 8)  # (B, N, C*P*P)
    E = pe.proj.weight.reshape(20, -1)  # (D, C*P*P)
    expected = patches @ E.T + pe.proj.bias
    torch.testing.assert_close(pe(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_attention_equals_explicit_formula():
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4).eval()
    x = torch.randn(3, 17, 64)
    fused, none = attn(x)
    explicit, weights = attn(x, return_attention=True)
    assert none is None
    assert (fused - explicit).abs().max() < 1e-5
    # and both equal softmax(q k^T / sqrt(d)) v written from scratch on the raw weights
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
    heads = [slice(h * 16, (h + 1) * 16) for h in range(4)]
    out = torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 4.0, -1) @ v[..., s]
                     for s in heads], dim=-1)
    torch.testing.assert_close(explicit, out @ attn.proj.weight.T + attn.proj.bias,
                               atol=1e-5, rtol=1e-5)


def test_attention_rows_sum_to_one_and_model_returns_every_layer():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    logits, attns = model(x, return_attention=True)
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)  # fused path, same answer
    assert len(attns) == 2
    for a in attns + model.get_attention_maps(x):
        assert a.shape == (2, 4, 17, 17)
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 17))


def test_matches_torchvision_vit_b_16():
    torch.manual_seed(0)
    ref = torchvision.models.vit_b_16().eval()
    with torch.no_grad():  # torchvision zero-initialises its head; randomise it to test the mapping
        ref.heads.head.weight.normal_(std=0.02)
        ref.heads.head.bias.normal_(std=0.02)
    model = vit_base().eval()
    load_state_dict_checked(model, convert_torchvision_state_dict(ref.state_dict()))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff < 1e-4, diff


def test_matches_torchvision_with_pre_logits_and_legacy_keys():
    torch.manual_seed(0)
    ref = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=40,
                                               num_classes=7, representation_size=12).eval()
    with torch.no_grad():
        ref.heads.head.weight.normal_()
    sd = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
          for k, v in ref.state_dict().items()}  # the layout of older torchvision files
    model = VisionTransformer(img_size=32, patch_size=8, depth=2, num_heads=2, embed_dim=16,
                              mlp_ratio=2.5, num_classes=7, representation_size=12).eval()
    load_state_dict_checked(model, convert_torchvision_state_dict(sd))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-5


def _jax_checkpoint(D=8, H=2, depth=2, P=4, img=8, C=3, K=3, M=16, seed=0) -> dict[str, np.ndarray]:
    """Random arrays with the names and layouts of Google's ViT .npz files."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.normal(size=s).astype(np.float32) * 0.3  # noqa: E731
    N = (img // P) ** 2 + 1
    a = {"embedding/kernel": r(P, P, C, D), "embedding/bias": r(D), "cls": r(1, 1, D),
         "Transformer/posembed_input/pos_embedding": r(1, N, D),
         "Transformer/encoder_norm/scale": 1 + r(D), "Transformer/encoder_norm/bias": r(D),
         "head/kernel": r(D, K), "head/bias": r(K)}
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[p + ln + "/scale"], a[p + ln + "/bias"] = 1 + r(D), r(D)
        for n in ("query", "key", "value"):
            a[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = r(D, H, D // H)
            a[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = r(H, D // H)
        a[p + "MultiHeadDotProductAttention_1/out/kernel"] = r(H, D // H, D)
        a[p + "MultiHeadDotProductAttention_1/out/bias"] = r(D)
        a[p + "MlpBlock_3/Dense_0/kernel"], a[p + "MlpBlock_3/Dense_0/bias"] = r(D, M), r(M)
        a[p + "MlpBlock_3/Dense_1/kernel"], a[p + "MlpBlock_3/Dense_1/bias"] = r(M, D), r(D)
    return a


def _np_layernorm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def _np_gelu(x, form="tanh"):
    """GELU as flax's nn.gelu computes it: the tanh approximation by default, erf when exact."""
    if form == "erf":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _np_jax_forward(a: dict[str, np.ndarray], img: np.ndarray, P: int, gelu: str = "tanh"
                    ) -> np.ndarray:
    """The JAX model's forward pass written with numpy in the checkpoint's own layouts (NHWC)."""
    B, Hh, Ww, C = img.shape
    g = Hh // P
    patches = img.reshape(B, g, P, g, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, P, P, C)
    x = np.einsum("bnijc,ijcd->bnd", patches, a["embedding/kernel"]) + a["embedding/bias"]
    x = np.concatenate([np.broadcast_to(a["cls"], (B, 1, x.shape[-1])), x], 1)
    x = x + a["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        p = f"Transformer/encoderblock_{i}/"
        m = p + "MultiHeadDotProductAttention_1/"
        y = _np_layernorm(x, a[p + "LayerNorm_0/scale"], a[p + "LayerNorm_0/bias"])
        q, k, v = (np.einsum("bnd,dhk->bnhk", y, a[m + n + "/kernel"]) + a[m + n + "/bias"]
                   for n in ("query", "key", "value"))
        s = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhqt,bthk->bqhk", w, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, a[m + "out/kernel"]) + a[m + "out/bias"]
        y = _np_layernorm(x, a[p + "LayerNorm_2/scale"], a[p + "LayerNorm_2/bias"])
        y = _np_gelu(y @ a[p + "MlpBlock_3/Dense_0/kernel"] + a[p + "MlpBlock_3/Dense_0/bias"],
                     gelu)
        x = x + y @ a[p + "MlpBlock_3/Dense_1/kernel"] + a[p + "MlpBlock_3/Dense_1/bias"]
        i += 1
    x = _np_layernorm(x, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    return x[:, 0] @ a["head/kernel"] + a["head/bias"]


def test_google_npz_loads_and_matches_hand_computation(tmp_path):
    arrays = _jax_checkpoint()
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **arrays)
    model = load_jax_npz(str(path), num_heads=2).eval()
    assert model.config.depth == 2 and model.config.img_size == 8 and model.config.num_classes == 3
    img = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    expected = _np_jax_forward(arrays, img, P=4)
    with torch.no_grad():
        got = model(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert model.config.gelu == "tanh"  # flax's default, the form Google's models were trained with
    exact = load_jax_npz(str(path), num_heads=2, gelu="erf").eval()
    with torch.no_grad():
        got_erf = exact(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got_erf, _np_jax_forward(arrays, img, P=4, gelu="erf"),
                               atol=1e-4, rtol=1e-4)
    assert np.abs(got_erf - got).max() > 1e-4  # the two forms differ measurably on these weights
    # one block alone: the converted block equals the hand computation of encoderblock_0
    one = {k: v for k, v in arrays.items() if "encoderblock_1" not in k}
    with torch.no_grad():
        one_model = VisionTransformer(ViTConfig(img_size=8, patch_size=4, embed_dim=8, depth=1,
                                                num_heads=2, mlp_ratio=2.0, num_classes=3,
                                                gelu="tanh")).eval()
        load_state_dict_checked(one_model, convert_jax_state_dict(one))
        got1 = one_model(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got1, _np_jax_forward(one, img, P=4), atol=1e-4, rtol=1e-4)


def test_resize_pos_embed():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 7 * 7, 16)
    torch.testing.assert_close(resize_pos_embed(pe, 7), pe)  # same grid: identity
    big = resize_pos_embed(pe, 12)
    assert big.shape == (1, 1 + 144, 16)
    torch.testing.assert_close(big[:, 0], pe[:, 0])  # the CLS slot is kept
    # a constant field stays constant under interpolation
    const = torch.ones(1, 1 + 49, 4) * 3.0
    torch.testing.assert_close(resize_pos_embed(const, 10), torch.ones(1, 101, 4) * 3.0)


def test_change_resolution_and_load_at_new_size():
    torch.manual_seed(0)
    model = vit_cifar("vit_cifar_tiny").eval()
    model.set_image_size(48)  # Sec. 3.2: 8x8 -> 12x12 patch grid
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    assert model.pos_embed.shape == (1, 1 + 144, 128)
    other = vit_cifar("vit_cifar_tiny", img_size=48).eval()
    load_state_dict_checked(other, vit_cifar("vit_cifar_tiny").state_dict())  # 65 -> 145 tokens
    assert other.pos_embed.shape == (1, 145, 128)
    sincos = vit_cifar("vit_cifar_tiny", pos_embed="sincos")
    sincos.set_image_size(48)
    torch.testing.assert_close(sincos.pos_embed[0, 1:], sincos_pos_embed_2d(12, 128))


def _np_big_vision_sincos(h, w, width, temperature=10_000.0):
    """big_vision's posemb_sincos_2d (models/vit.py), transcribed to numpy."""
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


def test_sincos_embedding_values():
    pe = sincos_pos_embed_2d(4, 8)  # (16, 8): [sin x, cos x, sin y, cos y], 2 frequencies each
    assert pe.shape == (16, 8)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    row1_col2 = pe[1 * 4 + 2]  # y = 1, x = 2, frequencies 1 and 1/10000
    expected = torch.tensor([math.sin(2), math.sin(2e-4), math.cos(2), math.cos(2e-4),
                             math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)])
    torch.testing.assert_close(row1_col2, expected)
    for g, D in ((4, 8), (8, 128), (14, 768)):
        np.testing.assert_allclose(sincos_pos_embed_2d(g, D).numpy(),
                                   _np_big_vision_sincos(g, g, D), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4 and at least 8"):
        sincos_pos_embed_2d(4, 4)
    model = tiny(pos_embed="sincos")
    assert "pos_embed" not in dict(model.named_parameters())
    assert tiny(pos_embed="none").pos_embed is None


# ---------------------------------------------------------------------------------------------
# Options, training behaviour, initialisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(classifier="gap"), dict(pos_embed="sincos"),
                                dict(representation_size=24),
                                dict(drop_path_rate=0.2, drop_rate=0.1)])
def test_every_parameter_gets_a_gradient(kw):
    torch.manual_seed(0)
    model = tiny(**kw).train()
    with torch.no_grad():
        model.head.weight.normal_()  # a zero head would stop the gradient to the body
    model(torch.randn(4, 3, 16, 16)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gap_classifier_averages_tokens():
    torch.manual_seed(0)
    model = tiny(classifier="gap").eval()
    assert model.cls_token is None
    x = torch.randn(2, 3, 16, 16)
    tokens, _ = model.forward_features(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(1))


def test_eval_mode_is_deterministic_and_train_mode_is_not():
    torch.manual_seed(0)
    model = tiny(drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3, patch_drop_rate=0.5)
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(x), model(x))


def test_patch_dropout_keeps_cls_and_a_fraction_of_patches():
    torch.manual_seed(0)
    model = tiny(patch_drop_rate=0.75).train()
    tokens, attns = model.forward_features(torch.randn(2, 3, 16, 16), return_attention=True)
    assert tokens.shape == (2, 1 + 4, 32) and attns[0].shape == (2, 4, 5, 5)
    model.eval()
    assert model.forward_features(torch.randn(2, 3, 16, 16))[0].shape == (2, 17, 32)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    out = dp(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_initialisation_follows_the_official_models():
    torch.manual_seed(0)
    model = vit_cifar("vit_cifar_small")
    D = model.embed_dim
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert abs(model.pos_embed.std().item() - 0.02 * 0.88) < 0.002  # truncated at 2 std
    for w in model.blocks[0].attn.qkv.weight.chunk(3):  # each D x D: xavier bound sqrt(6 / 2D)
        bound = math.sqrt(6 / (2 * D))
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    fc1 = model.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (D + fc1.shape[0]))
    assert all(torch.count_nonzero(b.attn.qkv.bias) == 0 for b in model.blocks)
    w = model.patch_embed.proj.weight
    assert abs(w.std().item() - math.sqrt(1 / w[0].numel())) < 0.1 * math.sqrt(1 / w[0].numel())


# Mimetic initialisation (Trockman & Kolter, ICML 2023), an option that is off by default

def _qk_products(attn: Attention) -> list[torch.Tensor]:
    """Per head, the D x D bilinear form of its scores: (x W_q^T)(y W_k^T)^T = x (W_q^T W_k) y^T,
    with the head's rows taken as Attention.forward splits the fused qkv output."""
    D, Dh = attn.qkv.in_features, attn.head_dim
    w = attn.qkv.weight.detach().reshape(3, attn.num_heads, Dh, D)  # (q/k/v, h, D_h, D)
    return [w[0, h].T @ w[1, h] for h in range(attn.num_heads)]


def _vproj_product(attn: Attention) -> torch.Tensor:
    """All heads together: x -> proj(v(x)) = x (W_proj W_v)^T, W_proj W_v of shape D x D."""
    D = attn.qkv.in_features
    return attn.proj.weight.detach() @ attn.qkv.weight.detach()[2 * D:]


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m[~torch.eye(m.shape[0], dtype=torch.bool)]


def _expected_qk_diagonal(d: int, k: int, alpha: float, beta: float, n: int = 40) -> float:
    """Mean diagonal of the best rank-k approximation of alpha Z + beta I, Z with N(0, 1/d)
    entries (numpy Monte Carlo): what a head's W_q^T W_k should have, a head having rank k."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        m = alpha * rng.standard_normal((d, d)) / np.sqrt(d) + beta * np.eye(d)
        u, s, vt = np.linalg.svd(m)
        out.append(np.trace(u[:, :k] @ np.diag(s[:k]) @ vt[:k]) / d)
    return float(np.mean(out))


def test_mimetic_init_is_off_by_default_and_leaves_the_default_model_alone():
    assert ViTConfig().mimetic_init is False
    assert all(not vit_cifar(n).config.mimetic_init for n in CIFAR_PRESETS)
    models, draws = [], []
    for kw in (dict(), dict(mimetic_init=False), dict(mimetic_init=True)):
        torch.manual_seed(0)
        models.append(vit_cifar("vit_cifar_tiny", **kw).state_dict())
        draws.append(torch.rand(4))
    default, off, on = models
    # off: the same parameters and the same random draws afterwards (no extra draw when off)
    assert default.keys() == off.keys() == on.keys()
    assert all(torch.equal(default[k], off[k]) for k in default) and torch.equal(*draws[:2])
    # on: applied after the usual init, only the attention matrices change (biases stay zero)
    changed = {k for k in default if not torch.equal(default[k], on[k])}
    assert changed == {f"blocks.{i}.attn.{n}.weight" for i in range(6) for n in ("qkv", "proj")}


def test_mimetic_init_query_key_near_identity_value_projection_near_minus_identity():
    torch.manual_seed(0)
    (a1, b1), (a2, b2) = MIMETIC_QK, MIMETIC_VPROJ
    on = vit_cifar("vit_cifar_tiny", mimetic_init=True)  # D = 128, 4 heads of 32, 6 blocks
    off = vit_cifar("vit_cifar_tiny")
    D, Dh = on.embed_dim, on.blocks[0].attn.head_dim
    expected = _expected_qk_diagonal(D, Dh, a1, b1)  # about 0.31 here; beta_1 * Dh / D = 0.175
    assert expected > 1.5 * b1 * Dh / D  # the SVD keeps the directions closest to the identity
    for i, (blk_on, blk_off) in enumerate(zip(on.blocks, off.blocks, strict=True)):
        for h, (p_on, p_off) in enumerate(zip(_qk_products(blk_on.attn),
                                              _qk_products(blk_off.attn), strict=True)):
            diag, off_diag = p_on.diagonal().mean().item(), _off_diagonal(p_on).abs().mean().item()
            assert diag == pytest.approx(expected, rel=0.05), (i, h)
            assert diag > 4 * off_diag, (i, h)  # a clear positive diagonal
            assert abs(p_off.diagonal().mean().item()) < 0.05, (i, h)  # xavier: none
        m_on, m_off = _vproj_product(blk_on.attn), _vproj_product(blk_off.attn)
        assert m_on.diagonal().mean().item() == pytest.approx(-b2, abs=0.02), i
        # the rest is alpha_2 Z, entries N(0, 1/D) scaled by alpha_2
        assert _off_diagonal(m_on).std().item() == pytest.approx(a2 / math.sqrt(D), rel=0.1), i
        assert abs(m_off.diagonal().mean().item()) < 0.05, i


def test_mimetic_init_makes_tokens_attend_to_themselves():
    """What the identity-like W_q^T W_k does: on normalised tokens (as after norm1) every head puts
    most of a token's attention on itself, where the default init spreads it about evenly."""
    torch.manual_seed(0)
    T = 65
    x = torch.nn.functional.layer_norm(torch.randn(2, T, 128), (128,))
    for mimetic, low, high in ((True, 0.5, 1.0), (False, 0.0, 3 / T)):
        attn = vit_cifar("vit_cifar_tiny", mimetic_init=mimetic).blocks[0].attn
        with torch.no_grad():
            weights = attn(x, return_attention=True)[1]  # (2, heads, T, T)
        self_attention = weights.diagonal(dim1=-2, dim2=-1).mean(dim=(0, 2))  # per head
        assert ((low < self_attention) & (self_attention < high)).all(), (mimetic, self_attention)


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError that says what was expected and what arrived
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, match", [
    ((3, 16, 16), r"4D image batch \(B, C, H, W\), got shape \(3, 16, 16\)"),
    ((2, 1, 16, 16), "expected 3 input channels, got 1"),
    ((2, 3, 24, 24), "expected images of 16x16, got 24x24.*set_image_size"),
    ((2, 3, 18, 18), "expected images of 16x16, got 18x18.*not divisible by patch size 4"),
])
def test_bad_images_raise(shape, match):
    with pytest.raises(ValueError, match=match):
        tiny()(torch.randn(*shape))


@pytest.mark.parametrize("kw, match", [
    (dict(embed_dim=30, num_heads=4), r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
    (dict(classifier="mean"), "classifier must be one of .*'mean'"),
    (dict(pos_embed="rope"), "pos_embed must be one of .*'rope'"),
    (dict(img_size=18), r"img_size \(18\) must be divisible by patch_size \(4\)"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\)"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_state_dict_names_the_keys():
    model = tiny()
    sd = dict(model.state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_state_dict_checked(model, sd)
    msg = str(e.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "extra.weight" in msg
    assert "blocks.0.attn.qkv.weight: expected (96, 32), got (5, 5)" in msg


def test_skip_head_loads_body_for_new_classes():
    src = tiny(num_classes=5)
    dst = tiny(num_classes=3)
    load_state_dict_checked(dst, src.state_dict(), skip_head=True)
    torch.testing.assert_close(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)


def test_pretrained_download_offline_fails_clearly(monkeypatch):
    def no_network(self, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(RuntimeError,
                       match="could not download vit_b_16 IMAGENET1K_V1.*network access"):
        load_torchvision_pretrained("vit_b_16")
    with pytest.raises(ValueError, match="unknown torchvision ViT"):
        load_torchvision_pretrained("vit_b_16", weights="NOPE")


# ---------------------------------------------------------------------------------------------
# `python test_model.py`: structure, shape trace, parameter table
# ---------------------------------------------------------------------------------------------

def test_shape_trace_of_vit_b16(vit_b16, shape_trace):
    trace = {key: shape for key, _, shape in shape_trace(vit_b16, torch.randn(1, 3, 224, 224))}
    assert trace["patch_embed.proj"] == (1, 768, 14, 14)
    assert trace["z0"] == (1, 197, 768) and trace["blocks.11"] == (1, 197, 768)
    assert trace["pool"] == (1, 768) and trace["head"] == (1, 1000)


if __name__ == "__main__":
    from conftest import parameter_table, shape_trace

    model = vit_base()
    print("ViT-B/16 structure:\n", model, "\n", sep="")
    print("Shape trace of one forward pass, ViT-B/16, batch 2:")
    for key, text, shape in shape_trace(model, torch.randn(2, 3, 224, 224)):
        print(f"  {key:<18s}{text:<32s}{shape}")
    small = vit_cifar("vit_cifar_tiny")
    print("\nShape trace, vit_cifar_tiny on 32x32, batch 2:")
    for key, text, shape in shape_trace(small, torch.randn(2, 3, 32, 32)):
        print(f"  {key:<18s}{text:<32s}{shape}")
    print(f"\n{'model':<16s}{'image':>6s}{'patch':>6s}{'layers':>7s}{'D':>6s}{'MLP':>6s}{'heads':>6s}"
          f"{'tokens':>7s}{'parameters':>14s}")
    for name, c, n in parameter_table():
        print(f"{name:<16s}{c.img_size:>6d}{c.patch_size:>6d}{c.depth:>7d}{c.embed_dim:>6d}"
              f"{int(c.embed_dim * c.mlp_ratio):>6d}{c.num_heads:>6d}{c.num_tokens:>7d}{n:>14,d}")


def test_without_position_embedding_a_pooled_vit_sees_a_bag_of_patches():
    """docs/studies.md: with no position embedding and global average pooling, shuffling the
    patches of an image leaves the logits unchanged; with a learned embedding it does not."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    P, g = 4, 8
    tiles = x.unfold(2, P, P).unfold(3, P, P).reshape(2, 3, g * g, P, P)  # (B, C, N, P, P)
    perm = torch.randperm(g * g)
    shuffled = (tiles[:, :, perm].reshape(2, 3, g, g, P, P).permute(0, 1, 2, 4, 3, 5)
                .reshape(2, 3, 32, 32))
    for pos_embed, same in (("none", True), ("learned", False)):
        model = vit_cifar("vit_cifar_tiny", classifier="gap", pos_embed=pos_embed).eval()
        torch.nn.init.normal_(model.head.weight)  # the head starts at zero: every logit would be 0
        with torch.no_grad():
            a, b = model(x), model(shuffled)
        assert torch.allclose(a, b, atol=1e-5) is same, pos_embed
