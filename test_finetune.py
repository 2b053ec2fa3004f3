"""Tests for fine-tuning (--init, Sec. 3.2): each kind of source, written from a small random model
in that layout; the new head is zero, every other weight equals the source's, the position
embedding is resized, the classes are the new data set's; bad sources are one-line errors; the
finetune preset is the paper's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import checkpoint
import train_cifar10 as tc
from config import PRESETS, TrainConfig, preset
from vit_model import VisionTransformer, ViTConfig, resize_pos_embed, vit_cifar

D, HEADS = 32, 2


@pytest.fixture(scope="module")
def source() -> VisionTransformer:
    """A small pre-trained stand-in: random weights everywhere, the head and [CLS] included."""
    torch.manual_seed(0)
    model = vit_cifar("vit_cifar_tiny", num_classes=10, embed_dim=D, depth=2, num_heads=HEADS)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def jax_arrays(model: VisionTransformer) -> dict[str, np.ndarray]:
    """The model in Google's .npz layout (flax kernels (in, out), attention per head)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    h, dh = model.config.num_heads, D // model.config.num_heads
    out = {"cls": sd["cls_token"], "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
           "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"],
           "Transformer/encoder_norm/scale": sd["norm.weight"],
           "Transformer/encoder_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(model.config.depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        a = p + "MultiHeadDotProductAttention_1/"
        for j, n in enumerate(("query", "key", "value")):
            w = sd[b + "attn.qkv.weight"][j * D:(j + 1) * D]  # (out, in)
            out[a + n + "/kernel"] = w.T.reshape(D, h, dh)
            out[a + n + "/bias"] = sd[b + "attn.qkv.bias"][j * D:(j + 1) * D].reshape(h, dh)
        out[a + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, dh, D)
        out[a + "out/bias"] = sd[b + "attn.proj.bias"]
        for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[p + ln + "/scale"], out[p + ln + "/bias"] = sd[b + ours + ".weight"], sd[
                b + ours + ".bias"]
        for j in (0, 1):
            out[p + f"MlpBlock_3/Dense_{j}/kernel"] = sd[b + f"mlp.fc{j + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{j}/bias"] = sd[b + f"mlp.fc{j + 1}.bias"]
    return out


def torchvision_copy(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The same weights in torchvision's VisionTransformer, through its own module."""
    cfg = model.config
    tv = torchvision.models.VisionTransformer(image_size=cfg.img_size, patch_size=cfg.patch_size,
                                              num_layers=cfg.depth, num_heads=cfg.num_heads,
                                              hidden_dim=D, mlp_dim=int(D * cfg.mlp_ratio),
                                              num_classes=cfg.num_classes)
    sd = model.state_dict()
    own = {"class_token": sd["cls_token"], "encoder.pos_embedding": sd["pos_embed"],
           "conv_proj.weight": sd["patch_embed.proj.weight"],
           "conv_proj.bias": sd["patch_embed.proj.bias"], "encoder.ln.weight": sd["norm.weight"],
           "encoder.ln.bias": sd["norm.bias"], "heads.head.weight": sd["head.weight"],
           "heads.head.bias": sd["head.bias"]}
    names = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
             "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
             "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    for key, value in sd.items():
        if key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            stem = next(s for s in names if rest.startswith(s))
            own[f"encoder.layers.encoder_layer_{i}.{names[stem]}{rest[len(stem):]}"] = value
    tv.load_state_dict(own)  # strict: every torchvision weight is accounted for
    return tv.state_dict()


def write_source(kind: str, model: VisionTransformer, tmp_path) -> str:
    """The --init SOURCE of `model` saved in the layout of `kind`."""
    if kind == "ours":
        path = tmp_path / "ours.pt"
        torch.save({"model_config": model.config.to_dict(), "model": model.state_dict()}, path)
        return str(path)
    if kind == "npz":
        np.savez(tmp_path / "vit.npz", **jax_arrays(model))
        return str(tmp_path / "vit.npz")
    if kind == "torchvision":
        torch.save(torchvision_copy(model), tmp_path / "tv.pth")
        return "torchvision:small=" + str(tmp_path / "tv.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "timm.pth")  # timm's names = ours
    return "timm:" + str(tmp_path / "timm.pth")


@pytest.mark.parametrize("kind", ["ours", "npz", "torchvision", "timm"])
def test_every_source_kind_gives_the_paper_transfer(source, tmp_path, kind):
    src = write_source(kind, source, tmp_path)
    config, weights = checkpoint.load_pretrained(src, num_heads=HEADS)
    cfg = TrainConfig(init=src, num_heads=HEADS, img_size=48)  # fine-tune at a higher resolution
    mcfg = tc.model_config_of(cfg, num_classes=3, source=config)
    assert (mcfg.embed_dim, mcfg.depth, mcfg.num_heads, mcfg.num_classes, mcfg.img_size) == (
        D, 2, HEADS, 3, 48)
    model = VisionTransformer(mcfg)
    checkpoint.init_from_pretrained(model, weights)
    new, old = model.state_dict(), source.state_dict()
    assert new["head.weight"].shape == (3, D) and not new["head.weight"].any()
    assert not new["head.bias"].any()
    for key in old:  # every other weight is the source's
        if key == "pos_embed":  # 8x8 grid -> 12x12 by 2-D interpolation (Sec. 3.2)
            expected = resize_pos_embed(old[key], 12, 1)
            torch.testing.assert_close(new[key], expected, atol=1e-6, rtol=1e-5)
        elif not key.startswith("head."):
            torch.testing.assert_close(new[key], old[key], atol=1e-6, rtol=1e-5, msg=key)
    logits = model.eval()(torch.randn(2, 3, 48, 48))
    assert logits.shape == (2, 3) and not logits.any()  # a zero head: all logits zero


def test_the_npz_source_computes_what_the_source_computes(source, tmp_path):
    config, weights = checkpoint.load_pretrained(write_source("npz", source, tmp_path))
    model = VisionTransformer(ViTConfig(**config))  # the source's own head: the same function
    model.load_state_dict(weights)
    x = torch.randn(2, 3, 32, 32)
    # Google's models use the tanh form of GELU; ours the exact one: close, not equal
    torch.testing.assert_close(model.eval()(x), source.eval()(x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("make, message", [
    (lambda p: f"timm:{p / 'text.pth'}", "cannot read"),
    (lambda p: f"timm:{p / 'tensor.pth'}", "is not a state dict"),
    (lambda p: f"timm:{p / 'other.pth'}", "is not a timm ViT state dict"),
    (lambda p: f"torchvision:vit_b_16={p / 'other.pth'}", "is not a torchvision ViT state dict"),
    (lambda p: f"torchvision:small={p / 'tv.pth'}", "is not one of torchvision's ViTs"),
    (lambda p: f"timm:{p / 'missing.pth'}", "no state dict file"),
    (lambda p: str(p / "text.pth"), "cannot read checkpoint"),
])
def test_a_source_of_the_wrong_kind_is_one_clear_error(tmp_path, make, message):
    (tmp_path / "text.pth").write_text("not weights")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "tv.pth")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        checkpoint.load_pretrained(make(tmp_path), num_heads=None if 'small' in make(tmp_path)
                                   else 2)


def test_the_number_of_heads_is_explicit(source, tmp_path):
    src = write_source("timm", source, tmp_path)
    with pytest.raises(ValueError, match="shapes cannot tell the number of heads"):
        checkpoint.load_pretrained(src)
    with pytest.raises(ValueError, match="divisible by num_heads"):  # 32 is not divisible by 3
        checkpoint.load_pretrained(src, num_heads=3)
    with pytest.raises(ValueError, match="architecture is the pre-trained model's"):
        TrainConfig(init=src, embed_dim=64).replace()


def test_the_finetune_preset_is_the_papers():
    # Appendix B.1.1 and Table 4: SGD, momentum 0.9, batch 512, no weight decay, clipping at
    # global norm 1, cosine decay, a learning rate from {0.001, 0.003, 0.01, 0.03}, 10,000 steps
    # for CIFAR-10 (500 of them warmup in the official code), fine-tuning at 384
    cfg = preset("finetune", init="x.pt")
    assert (cfg.optimizer, cfg.momentum, cfg.batch_size, cfg.weight_decay, cfg.clip_grad) == (
        "sgd", 0.9, 512, 0.0, 1.0)
    assert cfg.decay == "cosine" and cfg.min_lr == 0.0 and cfg.img_size == 384
    assert cfg.lr in (0.001, 0.003, 0.01, 0.03)
    steps_per_epoch = 50_000 // cfg.batch_size
    assert abs(cfg.epochs * steps_per_epoch - 10_000) < steps_per_epoch
    assert round(cfg.warmup_epochs * steps_per_epoch) == 500
    assert PRESETS["finetune"]["label_smoothing"] == 0.0
    opt, = tc.build_optimizers(vit_cifar("vit_cifar_tiny"), cfg)
    assert isinstance(opt[0], torch.optim.SGD) and opt[0].defaults["momentum"] == 0.9


@pytest.mark.slow
def test_pretrain_then_finetune_end_to_end(tiny, tmp_path, monkeypatch, make_image_folder):
    pre = tc.train(tiny(epochs=1, run_name="pre"))  # 10 classes
    shapes = make_image_folder(tmp_path / "three", 60, 30)
    for name in ("bird", "cat", "deer", "dog", "frog", "horse", "ship"):  # keep 3 classes
        for split in ("train", "test"):
            for f in (shapes / split / name).iterdir():
                f.unlink()
            (shapes / split / name).rmdir()
    first = []
    step = tc.Learner.step

    def record(self, x, target, lr):
        if not first:
            with torch.no_grad():
                first.append(self.forward(x))
        return step(self, x, target, lr)

    monkeypatch.setattr(tc.Learner, "step", record)
    res = tc.train(tiny(init=pre["run_dir"] + "/best.pt", embed_dim=None, depth=None,
                        num_heads=None, data_dir=str(shapes), img_size=48,
                        run_name="fine", optimizer="sgd", lr=0.01, batch_size=6,
                        eval_batch_size=9))
    assert not first[0].any() and first[0].shape == (6, 3)  # the zero head's first logits
    ckpt = torch.load(tmp_path / "fine" / "last.pt", weights_only=True)
    assert ckpt["classes"] == ["airplane", "automobile", "truck"]
    assert ckpt["model_config"]["img_size"] == 48 and ckpt["model"]["pos_embed"].shape[1] == 145
    assert 0 <= res["best_acc"] <= 1
    tc.main(["--resume", str(tmp_path / "fine" / "last.pt"), "--epochs", "2"])  # resumable
    assert torch.load(tmp_path / "fine" / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_the_shipped_model_fine_tunes_on_a_users_folder(tmp_path, make_image_folder):
    # the guide's worked example: a few classes of one's own, in an ImageFolder tree
    from inference import SHIPPED_MODEL

    folder = make_image_folder(tmp_path / "mine", 40, 20)
    for name in ("bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
        for split in ("train", "test"):
            for f in (folder / split / name).iterdir():
                f.unlink()
            (folder / split / name).rmdir()
    res = tc.train(preset("finetune", init=str(SHIPPED_MODEL), data_dir=str(folder),
                          out_dir=str(tmp_path), run_name="mine", img_size=0, epochs=2,
                          batch_size=4, warmup_epochs=0, lr=0.01, wandb="off",
                          eval_batch_size=100, measure_speed=False))
    ckpt = torch.load(tmp_path / "mine" / "best.pt", weights_only=True)
    shipped = torch.load(SHIPPED_MODEL, weights_only=True)
    assert ckpt["classes"] == ["airplane", "automobile"]
    assert ckpt["model"]["head.weight"].shape[0] == 2
    assert ckpt["model_config"]["classifier"] == "gap" == shipped["model_config"]["classifier"]
    assert len(res["history"]) == 2
