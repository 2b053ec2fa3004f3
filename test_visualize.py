"""Tests for visualize_attention.py: each computation against a hand-built case with a known
answer, then an end-to-end run on a tiny model and generated images."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import browser
import visualize_attention as va


def one_layer(B: int, H: int, N: int, fill: str) -> torch.Tensor:
    if fill == "identity":
        return torch.eye(N).expand(B, H, N, N).clone()
    return torch.full((B, H, N, N), 1.0 / N)


def test_rollout_of_identity_attention_stays_on_cls():
    attns = [one_layer(2, 3, 17, "identity") for _ in range(4)]
    rollout = va.attention_rollout(attns)
    torch.testing.assert_close(rollout, torch.eye(17).expand(2, 17, 17))
    patch_map = va.rollout_to_patch_map(rollout, num_prefix_tokens=1, grid_size=4)
    assert patch_map.shape == (2, 4, 4) and patch_map.abs().sum() == 0  # all mass on CLS itself


def test_rollout_of_uniform_attention_is_uniform():
    attns = [one_layer(1, 2, 10, "uniform") for _ in range(3)]
    for fusion in ("mean", "max", "min"):
        r = va.attention_rollout(attns, fusion)
        torch.testing.assert_close(r.sum(-1), torch.ones(1, 10))  # rows stay distributions
        patch = va.rollout_to_patch_map(r, 1, 3)
        torch.testing.assert_close(patch, torch.full_like(patch, patch[0, 0, 0].item()))


def test_rollout_follows_one_hand_computed_path():
    # layer 1: token 2 copies token 1; layer 2: token 0 copies token 2 -> 0 reads from 1 through 2
    N = 3
    a1, a2 = torch.eye(N), torch.eye(N)
    a1[2] = torch.tensor([0.0, 1.0, 0.0])
    a2[0] = torch.tensor([0.0, 0.0, 1.0])
    r = va.attention_rollout([a1.view(1, 1, N, N), a2.view(1, 1, N, N)])
    # with residual: A' = (A + I) / 2; R = A2' A1'
    A1, A2 = (a1 + torch.eye(N)) / 2, (a2 + torch.eye(N)) / 2
    torch.testing.assert_close(r[0], A2 @ A1)
    assert r[0, 0, 1] == pytest.approx(0.25)


def test_mean_attention_distance_of_self_attention_is_zero():
    N = 16
    attn = torch.zeros(2, 3, N + 1, N + 1)
    attn[:, :, 0, 0] = 1.0  # [CLS] is dropped from the measure
    attn[:, :, 1:, 1:] = torch.eye(N)
    d = va.mean_attention_distance([attn, attn], grid_size=4, patch_size=8, num_prefix_tokens=1)
    assert d.shape == (2, 3) and d.abs().max() == 0


def test_mean_attention_distance_right_neighbour_is_patch_size():
    g, P = 3, 16
    N = g * g
    attn = torch.zeros(1, 1, N, N)
    for q in range(N):
        row, col = divmod(q, g)
        target = row * g + col + 1 if col + 1 < g else row * g + col - 1  # right, else left
        attn[0, 0, q, target] = 1.0
    assert va.mean_attention_distance([attn], g, P, 0).item() == pytest.approx(P)


def test_position_similarity_is_symmetric_with_unit_diagonal():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 25, 12)
    sim = va.position_embedding_similarity(pe, 5, 1)
    flat = sim.reshape(25, 25)
    torch.testing.assert_close(flat, flat.T)
    torch.testing.assert_close(flat.diagonal(), torch.ones(25))
    assert sim[2, 3, 2, 3] == pytest.approx(1.0)


def test_filter_pca_recovers_a_planted_component():
    torch.manual_seed(0)
    u = torch.randn(3 * 4 * 4)
    u = u / u.norm()
    filters = torch.randn(64, 1) * 5 * u + 0.05 * torch.randn(64, 48)  # strong direction + noise
    pcs, var = va.patch_embedding_pcs(filters.view(64, 3, 4, 4), k=28)
    assert pcs.shape == (28, 3, 4, 4)
    assert abs(torch.dot(pcs[0].flatten(), u).item()) > 0.99
    assert var[0] > 0.9 and (var[:-1] >= var[1:]).all()
    assert va.patch_embedding_pcs(torch.randn(8, 3, 2, 2), k=28)[0].shape[0] == 8  # fewer if small


def test_end_to_end_writes_all_five_figures(tiny_checkpoint, tmp_path):
    path, images = tiny_checkpoint
    out = tmp_path / "figs"
    files = va.main(["--checkpoint-dir", str(path.parent.parent), "--images", *images,
                     "--out-dir", str(out), "--layers", "1", "3"])
    assert len(files) == 5
    for f in files.values():
        assert f.exists() and f.stat().st_size > 5000
        assert Image.open(f).size[0] > 300


def test_bad_input_gets_clear_errors(tiny_checkpoint, tmp_path):
    path, images = tiny_checkpoint

    def figures(*argv: str) -> dict:
        return va.make_figures(va.parse_args(list(argv)))

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        figures("--checkpoint", str(path), "--images", str(bad), "--out-dir", str(tmp_path / "o"))
    with pytest.raises(ValueError,
                       match=r"--layers \[7\] out of range: this model has layers 1..3"):
        figures("--checkpoint", str(path), "--images", *images, "--layers", "7",
                "--out-dir", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="head_fusion"):
        va.attention_rollout([torch.ones(1, 1, 2, 2)], "median")


def test_rollout_map_for_gap_models_averages_rows():
    r = torch.rand(2, 9, 9)
    torch.testing.assert_close(va.rollout_to_patch_map(r, 0, 3), r.mean(1).view(2, 3, 3))


def test_own_images_get_top3_and_a_rollout_at_their_own_resolution(tiny_checkpoint, tmp_path,
                                                                   capsys, monkeypatch):
    path, images = tiny_checkpoint  # two 40x50 images; the model sees them at 32x32
    shown = {}
    real = va.plot_rollout

    def spy(imgs, *args, **kwargs):
        shown["shapes"] = [tuple(i.shape) for i in imgs]
        return real(imgs, *args, **kwargs)

    monkeypatch.setattr(va, "plot_rollout", spy)
    va.main(["--checkpoint", str(path), "--images", *images, "--out-dir", str(tmp_path / "f")])
    assert shown["shapes"] == [(3, 40, 50)] * 2
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  img")]
    model = va.load_model(va.parse_args(["--checkpoint", str(path)])).model.eval()
    x = torch.stack([va.read_image(f, 32) for f in images])
    with torch.no_grad():
        # the checkpoint's normalisation
        probs = model(va.normalize(x, (0.5,) * 3, (0.25,) * 3)).softmax(-1)
    for line, p in zip(printed, probs, strict=True):
        top = p.topk(3)
        expected = ", ".join(f"{va.CIFAR10_CLASSES[int(i)]} {100 * v:.1f}%"
                             for v, i in zip(*top, strict=True))
        assert line.split(": ", 1)[1] == expected


@pytest.mark.slow
def test_make_figures_redraws_every_figure_the_guide_shows(batches_dir, trained_run, tmp_path,
                                                           repo):
    """One command regenerates every figures/*.png that README.md and docs/*.md show (the
    accuracy curve from a run's checkpoint), from files in the repository and CIFAR-10."""
    import re
    import shutil

    import make_figures

    results = tmp_path / "results"
    shutil.copytree(repo / "results", results, ignore=shutil.ignore_patterns("previous"))
    shown = {name for page in [repo / "README.md", *(repo / "docs").glob("*.md")]
             for name in re.findall(r"figures/([\w.-]+\.png)", page.read_text(encoding="utf-8"))}
    assert len(shown) >= 8
    no_browser = browser.unavailable()
    if no_browser:  # the explorer's screenshot needs headless Chromium; every other figure not
        print(f"explorer.png not checked: {no_browser}")
        shown.discard("explorer.png")
    out = tmp_path / "figures"
    make_figures.main(["--data-dir", str(batches_dir), "--out-dir", str(out), "--results",
                       str(results), "--run", str(trained_run / "last.pt")])
    drawn = {p.name for p in out.glob("*.png")}
    assert shown <= drawn, f"not regenerated: {sorted(shown - drawn)}"


def test_make_figures_checks_its_inputs_before_writing(tmp_path):
    import make_figures

    out = tmp_path / "figures"
    with pytest.raises(SystemExit) as e:
        make_figures.main(["--data-dir", str(tmp_path / "nothing"), "--out-dir", str(out)])
    assert e.value.code == 2 and not out.exists()


def test_the_guide_figures_name_the_shipped_model_by_its_path_in_the_repository(monkeypatch):
    """The figures' titles show the checkpoint's path: from the repository root it is the
    repository's own path, never the full path of the machine that drew them."""
    import make_figures
    from inference import SHIPPED_MODEL
    monkeypatch.chdir(SHIPPED_MODEL.parent.parent)
    assert make_figures.shipped_model() == "checkpoints/vit_cifar_tiny_cpu.pt"
