"""Tests for the attention explorer, `visualize_attention.py --html`: the numbers read back out of
the written page are the model's own (recomputed here with its forward pass), the page needs
nothing from outside, and the command refuses what it should. Then, in a real headless Chromium
(skipped where none is installed; browser.py): the page loads with no console error, a click on a
patch shows that patch's attention row (read back from the drawn pixels too), the layer and head
controls change it, and the page's own rollout equals attention_rollout()."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import browser
import visualize_attention as va
from checkpoint import load_checkpoint, model_from_checkpoint
from data import CIFAR10_CLASSES, normalize, read_image

DATA_BLOCK = re.compile(r'<script type="application/json" id="explorer-data">(.*?)</script>',
                        re.S)
CLASSIFIERS = {"token": 1, "gap": 0}  # classifier: prefix tokens ([CLS] or none)


def page_data(page: Path) -> dict:
    """The JSON the page holds."""
    (blob,) = DATA_BLOCK.findall(page.read_text(encoding="utf-8"))
    return json.loads(blob)


def write_page(make_tiny_checkpoint, folder: Path, classifier: str, *flags: str
               ) -> tuple[Path, list[str], Path]:
    """A tiny model's checkpoint, its two images and the explorer page written for them."""
    path, images = make_tiny_checkpoint(folder, classifier=classifier)
    page = folder / "explorer.html"
    assert va.main(["--checkpoint", str(path), "--images", *images, "--html", str(page),
                    *flags]) == {"explorer": page}
    return path, images, page


def own_attention(path: Path, images: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The softmax (B, classes) and every layer's attention (B, h, T, T) of the images, straight
    from the model's forward pass (the tiny checkpoint's normalisation: mean 0.5, std 0.25)."""
    model = model_from_checkpoint(load_checkpoint(path)).eval()
    x = normalize(torch.stack([read_image(f, 32) for f in images]), (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        logits, attentions = model(x, return_attention=True)
    return logits.softmax(-1), attentions


def page_attention(data: dict, image: int) -> torch.Tensor:
    """One image's attention as the page holds it, (L, h, T, T) in float64."""
    return torch.tensor(data["images"][image]["attention"], dtype=torch.float64) * \
        data["attention_unit"]


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_the_page_holds_the_models_own_numbers(make_tiny_checkpoint, tmp_path, classifier):
    path, images, page = write_page(make_tiny_checkpoint, tmp_path, classifier)
    data = page_data(page)
    probs, attentions = own_attention(path, images)
    pre, G = CLASSIFIERS[classifier], 4  # 32 px, patch 8
    assert (data["prefix_tokens"], data["grid"], data["layers"], data["heads"]) == (pre, G, 3, 2)
    assert len(data["images"]) == 2
    for i, image in enumerate(data["images"]):
        assert (image["width"], image["height"]) == (50, 40)  # the file's own size
        # every weight within the rounding to integers of attention_unit
        torch.testing.assert_close(page_attention(data, i),
                                   torch.stack([a[i] for a in attentions]).double(),
                                   atol=data["attention_unit"] / 2 + 1e-7, rtol=0)
        p, c = probs[i].topk(3)
        assert [name for name, _ in image["top3"]] == [CIFAR10_CLASSES[k] for k in c]
        assert [q for _, q in image["top3"]] == pytest.approx(p.tolist(), rel=5e-4)
        for fusion in va.HEAD_FUSIONS:  # the Python rollout the page checks itself against
            ref = va.rollout_to_patch_map(va.attention_rollout(attentions, fusion), pre, G)
            assert image["rollout"][fusion] == pytest.approx(ref[i].flatten().tolist(), rel=5e-4)
    dist = va.mean_attention_distance(attentions, G, 8, pre)
    assert data["distance"]["pixels"] == [pytest.approx(r, rel=5e-4) for r in dist.tolist()]
    assert data["distance"]["uniform"] == pytest.approx(va.uniform_attention_distance(G, 8),
                                                        rel=5e-4)
    assert data["distance"]["images"] == 2


def test_the_page_needs_nothing_from_outside(make_tiny_checkpoint, tmp_path):
    *_, page = write_page(make_tiny_checkpoint, tmp_path, "gap")
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"\b(?:https?|ftp|wss?):", html, re.I)  # no address at all
    assert not re.search(r"@import|url\(", html)  # no style sheet or font from anywhere
    linked = re.findall(r"\b(?:src|href|srcset|poster|action)\s*=\s*[\"']([^\"']*)", html)
    assert linked and all(link.startswith("data:") for link in linked), linked
    assert va.EXPLORER_GENERATOR in html[:4096]  # what lets a later --html replace it
    assert "image/png;base64," in html


def test_html_writes_only_the_page_and_refuses_other_files(make_tiny_checkpoint, tmp_path,
                                                           monkeypatch, capsys):
    path, images = make_tiny_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)

    def run(*flags: str) -> str:
        with pytest.raises(SystemExit) as e:
            va.main(["--checkpoint", str(path), "--images", *images, *flags])
        assert e.value.code == 2
        return capsys.readouterr().err

    # --html alone: outputs/explorer.html (the folder made), of the first --show images; no PNG
    assert va.main(["--checkpoint", str(path), "--images", *images, "--html", "--show", "1"]
                   ) == {"explorer": Path(va.DEFAULT_HTML)}
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["explorer.html"]
    assert len(page_data(Path(va.DEFAULT_HTML))["images"]) == 1
    assert page_data(Path(va.DEFAULT_HTML))["distance"]["images"] == 2
    va.main(["--checkpoint", str(path), "--images", *images, "--html"])  # its own page: replaced
    assert len(page_data(Path(va.DEFAULT_HTML))["images"]) == 2

    assert "the folder nowhere does not exist" in run("--html", "nowhere/page.html")
    assert "name an .html file" in run("--html", "page.png")
    (tmp_path / "folder.html").mkdir()
    assert "is a folder" in run("--html", "folder.html")
    mine = tmp_path / "mine.html"
    mine.write_text("<p>my own notes</p>")
    assert "is not an explorer page written by this script" in run("--html", str(mine))
    assert mine.read_text() == "<p>my own notes</p>"
    assert "name an .html file" in run("--html", "")  # an empty $VAR: no figures instead
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["explorer.html"]
    # the page is written to a temporary file of its own first: never to one of the user's
    (tmp_path / ".page.html.tmp").write_text("my own notes")
    va.main(["--checkpoint", str(path), "--images", *images, "--html", "page.html"])
    assert (tmp_path / ".page.html.tmp").read_text() == "my own notes"
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".page.html.tmp"]
    assert not list((tmp_path / "outputs").glob(".*"))


@pytest.mark.parametrize("weight", ["blocks.0.attn.qkv.weight", "head.weight"])
def test_a_broken_model_gets_an_error_not_an_empty_page(make_tiny_checkpoint, tmp_path, capsys,
                                                         weight):
    """NaN weights (a diverged run) make NaN attention or class probabilities: JSON.parse
    refuses NaN, so the page would stay empty."""
    path, images = make_tiny_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"][weight] = torch.full_like(ckpt["model"][weight], float("nan"))
    torch.save(ckpt, path)
    page = tmp_path / "explorer.html"
    with pytest.raises(SystemExit) as e:
        va.main(["--checkpoint", str(path), "--images", *images, "--html", str(page)])
    assert e.value.code == 2
    what = "the attention of layer(s) 1, 2, 3" if "attn" in weight else "the class probabilities"
    assert f"gives NaN or infinite values in {what}" in capsys.readouterr().err
    assert not page.exists()


def test_a_page_too_large_for_a_browser_is_refused(make_tiny_checkpoint, tmp_path, monkeypatch,
                                                   capsys):
    """A browser cannot read a string over EXPLORER_MAX_CHARS (512 MB in Chromium): such a page
    (a ViT-B/16 at 384 px has 48M weights an image) is refused before the work when the estimate
    says so, and after it, with nothing written, when the page itself is too long."""
    path, images = make_tiny_checkpoint(tmp_path)  # 3 layers x 2 heads x 17 x 17 tokens
    page = tmp_path / "explorer.html"

    def run(*flags: str) -> tuple[str, str]:
        with pytest.raises(SystemExit) as e:
            va.main(["--checkpoint", str(path), "--images", *images, "--html", str(page), *flags])
        assert e.value.code == 2
        return tuple(capsys.readouterr())  # (out, err)

    weights = 3 * 2 * 17 * 17
    monkeypatch.setattr(va, "EXPLORER_MAX_CHARS", 3 * va.CHARS_PER_WEIGHT * weights // 2)
    out, err = run()
    assert "1,734 weights an image" in err and "use --show 1 or fewer" in err
    assert "model:" not in out  # refused before the model ran
    monkeypatch.setattr(va, "EXPLORER_MAX_CHARS", 20_000)  # 1 image fits the estimate, not the page
    assert "nothing was written: use a smaller --show" in run("--show", "1")[1]
    assert not page.exists() and not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    reason = browser.unavailable()
    if reason:
        pytest.skip(f"the explorer's browser test needs headless Chromium: {reason}")
    with browser.chromium() as driver:
        yield driver


def heat_map(driver, image: int, panel: str, grid: int) -> list[list[float]]:
    """The colour a panel of an image (a CSS selector within its card) shows in the centre of
    each patch cell, (N_p, 3), with the picture under it taken out: the heat map as drawn."""
    pixels = driver.execute_script("""
        const [i, selector, G] = arguments;
        const card = document.querySelectorAll("article.card")[i];
        const cv = card.querySelector(selector), pic = card.querySelector(".f-picture canvas");
        const at = (c, x, y) => Array.from(c.getContext("2d").getImageData(x, y, 1, 1).data);
        return Array.from({length: G * G}, (_, p) => {
          const x = Math.floor((p % G + 0.5) * cv.width / G);
          const y = Math.floor((Math.floor(p / G) + 0.5) * cv.height / G);
          return [at(cv, x, y).slice(0, 3), at(pic, x, y).slice(0, 3)];
        });""", image, panel, grid)
    alpha = 1.0 if panel.startswith("canvas[title") else 0.72  # thumbnails: no picture under them
    return [[(d - (1 - alpha) * b) / alpha for d, b in zip(shown, under, strict=True)]
            for shown, under in pixels]


def assert_heat_map(driver, image: int, panel: str, grid: int, values: list[float],
                    top: float | None = None) -> None:
    """The panel shows values, coloured from 0 to top (their maximum unless given) by the page's
    colour map, within the rounding of 8-bit colour."""
    top = top or max(values)
    want = driver.execute_script("return arguments[0].map(t => colour(t))",
                                 [v / top for v in values])
    got = heat_map(driver, image, panel, grid)
    assert got == [pytest.approx(c, abs=3) for c in want], panel


def click_patch(driver, canvas, row: int, col: int, grid: int, click: bool = True) -> None:
    """Move the mouse to the centre of patch (row, col) of a canvas (0-based), and click."""
    from selenium.webdriver.common.action_chains import ActionChains

    w, h = canvas.size["width"], canvas.size["height"]
    actions = ActionChains(driver).move_to_element_with_offset(
        canvas, round((col + 0.5) * w / grid - w / 2), round((row + 0.5) * h / grid - h / 2))
    (actions.click() if click else actions).perform()


@pytest.mark.slow
@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_clicking_through_the_page_in_chromium(chromium, make_tiny_checkpoint, tmp_path,
                                               classifier):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, _, page = write_page(make_tiny_checkpoint, tmp_path, classifier)
    data = page_data(page)
    pre, G, L = data["prefix_tokens"], data["grid"], data["layers"]
    chromium.get_log("browser")  # what an earlier page left
    browser.open_explorer(chromium, page)

    def shown(i: int) -> dict:
        return chromium.execute_script("return explorer.shown(arguments[0])", i)

    def row(i: int, layer: int, head: int | str, q: int) -> list[float]:
        """The JSON's row of query q over the patches (layer and head 1-based, or "mean")."""
        a = page_attention(data, i)[layer - 1, :, q, pre:]  # (h, N_p)
        return (a.mean(0) if head == "mean" else a[head - 1]).tolist()

    # at first: the last layer, the mean over heads, [CLS] (or the centre patch) as the query
    first_query = 0 if pre else pre + (G // 2) * G + G // 2
    assert (shown(1)["layer"], shown(1)["head"], shown(1)["query"]) == (L, "mean", first_query)
    cards = chromium.find_elements(By.CSS_SELECTOR, "article.card")
    assert [c.find_element(By.TAG_NAME, "h2").text for c in cards] == ["img0.png", "img1.png"]
    top = cards[1].find_element(By.CSS_SELECTOR, ".top3 li").text.split()
    assert top[0] == data["images"][1]["top3"][0][0]

    # a click on patch (row 2, column 3) of the second image shows that patch's row
    canvas = cards[1].find_element(By.CSS_SELECTOR, "canvas.attention")
    click_patch(chromium, canvas, 1, 2, G)
    q = pre + 1 * G + 2
    now = shown(1)
    assert (now["query"], now["layer"], now["head"]) == (q, L, "mean")
    assert canvas.get_attribute("data-query") == str(q)
    assert now["values"] == pytest.approx(row(1, L, "mean", q), abs=1e-12)
    assert_heat_map(chromium, 1, "canvas.attention", G, row(1, L, "mean", q))  # as drawn
    assert shown(0)["query"] == first_query  # the other image keeps its own
    # hovering shows another patch's row; leaving goes back to the clicked one
    click_patch(chromium, cards[1].find_element(By.CSS_SELECTOR, "canvas.image"), 3, 0, G,
                click=False)
    assert shown(1)["query"] == pre + 3 * G
    click_patch(chromium, cards[0].find_element(By.CSS_SELECTOR, "canvas.image"), 0, 0, G,
                click=False)
    assert shown(1)["query"] == q

    # the layer and head controls change it again
    Select(chromium.find_element(By.ID, "layer")).select_by_value("1")
    assert (shown(1)["layer"], shown(1)["values"]) == (1, pytest.approx(row(1, 1, "mean", q)))
    Select(chromium.find_element(By.ID, "head")).select_by_value("2")
    now = shown(1)
    assert (now["layer"], now["head"], now["query"]) == (1, 2, q)
    assert now["values"] == pytest.approx(row(1, 1, 2, q), abs=1e-12)
    assert now["values"] != pytest.approx(row(1, 1, 1, q), abs=1e-6)
    assert_heat_map(chromium, 1, "canvas.attention", G, row(1, 1, 2, q))
    # the thumbnails: one colour scale for the layer's heads and their mean
    top = max(max(row(1, 1, h, q)) for h in [*range(1, data["heads"] + 1), "mean"])
    for head, title in ((2, "head 2"), ("mean", f"mean over {data['heads']} heads")):
        assert_heat_map(chromium, 1, f'canvas[title="layer 1, {title}"]', G, row(1, 1, head, q),
                        top=top)
    # so does a thumbnail of the heads grid
    cards[1].find_element(By.CSS_SELECTOR, 'canvas[title="layer 2, head 1"]').click()
    assert (shown(1)["layer"], shown(1)["head"]) == (2, 1)

    # rollout in the page = attention_rollout(): through all layers against the numbers Python
    # wrote (from unrounded attention), and layers 2-3 fused by max against attention_rollout()
    # on the page's own numbers
    assert chromium.execute_script("return explorer.check.ok")
    for i, image in enumerate(data["images"]):
        for fusion in va.HEAD_FUSIONS:
            js = chromium.execute_script("return explorer.rolloutMap(...arguments)",
                                         i, fusion, 1, L)
            assert js == pytest.approx(image["rollout"][fusion], rel=2e-3)
    Select(chromium.find_element(By.ID, "fusion")).select_by_value("max")
    Select(chromium.find_element(By.ID, "first")).select_by_value("2")
    layers = page_attention(data, 1)[1:3].unsqueeze(1).unbind(0)  # 2 x (1, h, T, T)
    ref = va.rollout_to_patch_map(va.attention_rollout(list(layers), "max"), pre, G)  # float32
    rollout = cards[1].find_element(By.CSS_SELECTOR, "canvas.rollout")
    assert (rollout.get_attribute("data-fusion"), rollout.get_attribute("data-first")) == ("max",
                                                                                           "2")
    assert shown(1)["rollout"] == pytest.approx(ref[0].flatten().tolist(), rel=1e-5)
    assert_heat_map(chromium, 1, "canvas.rollout", G, ref[0].flatten().tolist())
    # the mean attention distance table: the numbers of the page's data
    cells = [c.text for c in chromium.find_elements(By.CSS_SELECTOR, "#distance-table td")]
    assert cells == [f"{v:.1f}" for r in data["distance"]["pixels"] for v in r]

    errors = [e for e in chromium.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    shot = tmp_path / "explorer.png"
    chromium.save_screenshot(str(shot))
    assert Image.open(shot).size == (1180, 800)


@pytest.mark.slow
def test_a_strip_of_an_image_still_has_patches_to_click(chromium, make_tiny_checkpoint, tmp_path):
    """A 600 x 3 image keeps its shape on the page, but not down to cells of a pixel: each side
    at least 60 CSS pixels, so its patches can be clicked."""
    from selenium.webdriver.common.by import By

    path, _ = make_tiny_checkpoint(tmp_path)
    strip, page = tmp_path / "strip.png", tmp_path / "explorer.html"
    Image.new("RGB", (600, 3), (200, 120, 40)).save(strip)
    va.main(["--checkpoint", str(path), "--images", str(strip), "--html", str(page)])
    browser.open_explorer(chromium, page)
    canvas = chromium.find_element(By.CSS_SELECTOR, "canvas.attention")
    assert canvas.size["width"] == 240 and canvas.size["height"] >= 60
    click_patch(chromium, canvas, 2, 1, 4)
    assert chromium.execute_script("return explorer.shown(0).query") == 1 + 2 * 4 + 1
