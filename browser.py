"""Headless Chromium driven through Selenium, for the attention explorer page
(`visualize_attention.py --html`): the guide's screenshot figures/explorer.png (make_figures.py)
and the test that clicks through the page in a real browser (test_explorer.py).

Optional: without selenium (pip), Chromium or its driver (Debian: apt-get install chromium
chromium-driver), unavailable() says what is missing, make_figures.py leaves the screenshot out
and the browser test skips. Everything runs offline: the driver is the installed chromedriver,
never a download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def unavailable() -> str | None:
    """Why no headless Chromium can be driven here, or None when it can."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    if _browser() is None:
        return f"no Chromium on the PATH ({', '.join(BROWSERS)}; Debian: apt-get install chromium)"
    if shutil.which("chromedriver") is None:
        return "no chromedriver on the PATH (Debian: apt-get install chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1180, height: int = 800) -> Iterator[Any]:
    """A headless Chromium (a Selenium WebDriver) with a width x height viewport in CSS pixels at
    device scale 1, recording the page's console (driver.get_log("browser"))."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"no headless browser: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _browser()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(arg)  # --no-sandbox: CI and containers run as root
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1,
                                "mobile": False})
        yield driver
    finally:
        driver.quit()


def open_explorer(driver: Any, page: Path, timeout: float = 60) -> None:
    """Load an explorer page from disk; wait until it has drawn itself (window.explorer.ready)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(page).resolve().as_uri())
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return Boolean(window.explorer && window.explorer.ready)"))


def screenshot_explorer(page: Path, png: Path, select: dict[str, Any],
                        width: int = 1180, height: int = 800) -> None:
    """A screenshot of the page after explorer.select(select) ({image, query, layer, head}: what
    a reader would click), in 256 colours to keep the PNG small."""
    from PIL import Image

    with chromium(width, height) as driver:
        open_explorer(driver, page)
        driver.execute_script("window.explorer.select(arguments[0])", select)
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot.quantize(256).save(png, optimize=True)
