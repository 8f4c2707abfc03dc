"""The page in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Nothing downloads a browser: Playwright is pointed at the system Chromium, which ``.ci/run``
installs when it is missing. Elsewhere, without it, the test is skipped and says why.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import png_bytes, served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def open_page(playwright, url: str, width: int, height: int):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    return browser, page


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium; .ci/run installs it)")
@pytest.mark.parametrize(("width", "height"), [(1280, 800), (390, 844)], ids=["laptop", "phone"])
def test_upload_shows_the_overlay_and_the_apis_percentage(
    server: str,
    xray: np.ndarray,
    tmp_path: Path,
    width: int,
    height: int,
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(xray))
    api = httpx.post(f"{server}/api/predict", files={"file": ("chest.png", image.read_bytes())}).json()
    assert api["infected_pixels"] > 0  # the phantom's lesion is found, so the overlay has something to show
    with sync_api.sync_playwright() as playwright:
        browser, page = open_page(playwright, server, width, height)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            sync_api.expect(page.locator("#model")).to_contain_text(api["model"])
            page.set_input_files("#file", str(image))
            sync_api.expect(page.locator("#result")).to_be_visible(timeout=30_000)
            assert page.locator("#infected-percent").inner_text() == str(api["infected_percent"])
            overlay = page.locator("#infection-layer")
            assert overlay.evaluate("layer => layer.complete && layer.naturalWidth") == api["width"]
            page.locator("#opacity").fill("80")
            assert overlay.evaluate("layer => getComputedStyle(layer).opacity") == "0.8"
            page.locator("#show-infection").uncheck()
            sync_api.expect(overlay).to_be_hidden()
            scroll_width = page.evaluate("document.documentElement.scrollWidth")
            assert scroll_width <= width  # nothing wider than the screen, on a phone too
            assert page.locator("#download-mask").get_attribute("download") == "chest.mask.png"
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
            sync_api.expect(page.locator("#status")).to_contain_text("judged by its content")
            assert errors == []  # no script error on the page
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (apt-get install chromium; .ci/run installs it)")
def test_a_lung_model_shows_severity_and_lung_outlines(tmp_path: Path, cache_dir: Path, xray: np.ndarray) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    from conftest import train_tiny

    from covidseg.inference.loader import INFERENCE_KEYS
    from covidseg.inference.segment import load_backend
    from covidseg.serving.app import ServeSettings, create_app

    checkpoint = train_tiny(tmp_path / "train", cache_dir, "data.targets=[lung,infection]")
    model = load_backend(str(checkpoint), tmp_path, "torch", dict.fromkeys(INFERENCE_KEYS), False, tmp_path)
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(xray))
    with served(create_app(model, ServeSettings())) as url:
        severity = httpx.post(f"{url}/api/predict", files={"file": ("chest.png", image.read_bytes())}).json()[
            "severity"
        ]
        with sync_api.sync_playwright() as playwright:
            browser, page = open_page(playwright, url, 1280, 800)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            try:
                page.set_input_files("#file", str(image))
                sync_api.expect(page.locator("#severity")).to_be_visible(timeout=30_000)
                assert page.locator("#zone-score").inner_text() == str(severity["zone_score"])
                sync_api.expect(page.locator("#lung-toggle")).to_be_visible()
                assert page.locator("#lung-layer").evaluate("layer => layer.complete && layer.naturalWidth") == 280
                page.locator("#show-lungs").uncheck()
                sync_api.expect(page.locator("#lung-layer")).to_be_hidden()
                assert errors == []
            finally:
                browser.close()
