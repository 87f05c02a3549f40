"""The page in a real browser: headless Chromium opens the app, uploads a photo, presses Caption, reads the caption.

SCREENSHOT=docs/screenshot.png python -m pytest tests/test_browser.py   # also refreshes the README's screenshot
"""

import os
import shutil
import time

import pytest
from conftest import ROOT, start_app, stop_app

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHIPPED_MODEL = ROOT / "captioner.pt"
# Without these, Chromium keeps trying to reach Google's servers, which this network refuses.
QUIET_CHROMIUM = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def page_url(app_server):
    """The shipped model where it exists (so the screenshot shows a real caption), else the tiny test model."""
    if not SHIPPED_MODEL.exists():
        yield app_server, False
        return
    url, process = start_app(SHIPPED_MODEL)
    yield url, True
    stop_app(process)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium); .ci/run installs it")
def test_uploading_a_photo_and_pressing_caption_shows_the_caption(page_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, shipped = page_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=QUIET_CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(ROOT / "examples" / "astronaut.jpg"))
        started = time.perf_counter()
        page.locator("#caption-button").click()
        caption = page.locator("#caption-text textarea")
        expect(caption).not_to_have_value("", timeout=60_000)
        text = caption.input_value()
        print(f"click to caption: {time.perf_counter() - started:.2f} s ({'shipped' if shipped else 'tiny'} model)")
        assert text.strip()
        if shipped:
            assert set(text.lower().split()) & {"man", "woman", "person", "girl", "boy", "child", "astronaut"}, text
        page.wait_for_timeout(500)  # let the attention image paint
        page.screenshot(path=os.environ.get("SCREENSHOT", str(tmp_path / "screenshot.png")), full_page=True)
        browser.close()


@pytest.fixture(scope="module")
def unfamiliar_url(tmp_path_factory, captioning_model, tiny_tokenizer):
    """UNFAMILIAR_MODEL (e.g. a released model), else a tiny model that knows only the cat photo, with the real
    ImageNet recogniser (labels.py)."""
    import torch

    from captioner import Captioner
    from checkpoint import save_captioner
    from distill import load_teacher
    from familiarity import FamiliarityModel

    path = os.environ.get("UNFAMILIAR_MODEL")
    if not path:
        features = Captioner(captioning_model, tiny_tokenizer, device="cpu").encode([ROOT / "examples" / "cat.jpg"])
        near_cat = features.class_tokens + 0.01 * torch.randn(500, features.class_tokens.shape[1])
        familiarity = FamiliarityModel.fit(near_cat[:400], near_cat[400:])
        path = tmp_path_factory.mktemp("model") / "knows-the-cat.pt"
        recogniser = {name: tensor.half() for name, tensor in load_teacher().state_dict().items()}
        metadata = {"familiarity": familiarity.to_dict(), "recogniser": recogniser}
        save_captioner(path, captioning_model, tiny_tokenizer, metadata)
    url, process = start_app(path)
    yield url
    stop_app(process)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium); .ci/run installs it")
def test_a_photo_unlike_the_training_photos_gets_a_note_and_its_labels_beside_its_caption(unfamiliar_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    note = "looks unlike the photos this model learned from"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=QUIET_CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        for photo, unfamiliar in (("coffee.jpg", True), ("cat.jpg", False)):
            page.goto(unfamiliar_url)
            page.locator("input[type=file]").first.set_input_files(str(ROOT / "examples" / photo))
            page.locator("#caption-button").click()
            confidence = page.locator("#caption-confidence")
            expect(confidence).to_contain_text("Confidence", timeout=60_000)
            if unfamiliar:
                expect(confidence).to_contain_text(note, timeout=10_000)
                expect(confidence).to_contain_text("It looks like: espresso (89%)", timeout=10_000)
                page.wait_for_timeout(500)
                page.screenshot(
                    path=os.environ.get("SCREENSHOT_UNFAMILIAR", str(tmp_path / "note.png")), full_page=True
                )
            elif not os.environ.get("UNFAMILIAR_MODEL"):  # a real model may find the cat unfamiliar too
                expect(confidence).not_to_contain_text(note, timeout=10_000)
        browser.close()
