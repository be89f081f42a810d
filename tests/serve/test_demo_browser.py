"""The demo in a real browser: headless Debian Chromium, driven by Playwright, uploads a real MNIST
test digit and reads the predicted label off the page.

Set TOOLKIT_DEMO_SCREENSHOT=docs/demo.png to refresh the README's screenshot from this test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import draw, free_port, mnist_test_set

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as the machine's own browser tests run it: no sandbox as root, and no background calls out
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists():
    if os.environ.get("TOOLKIT_REQUIRE_BROWSER"):  # CI installs it: missing there is a failure
        raise RuntimeError(f"TOOLKIT_REQUIRE_BROWSER is set but {CHROMIUM} is missing (apt-get install chromium)")
    pytestmark = pytest.mark.skip(reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def demo_url(serving_export, mnist_root):
    from toolkit.serve.server import serve

    running, url = serve([serving_export], port=free_port(), data_dir=mnist_root, block=False, console=None)
    yield url
    running.close()


def test_browser_upload_shows_the_right_digit(demo_url, mnist_root, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    images, labels = mnist_test_set(mnist_root)
    index = 0  # a 7: any test digit the model gets right would do
    digit = tmp_path / "digit.png"
    Image.fromarray(images[index]).resize((140, 140), Image.Resampling.NEAREST).save(digit)
    shot = Path(os.environ.get("TOOLKIT_DEMO_SCREENSHOT") or tmp_path / "demo.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(demo_url, wait_until="domcontentloaded")
            page.get_by_role("tab", name="Upload").click()
            page.locator("#mnist-upload input[type=file]").set_input_files(str(digit))
            info = page.locator("#mnist-info")
            expect(info).to_contain_text("runtime", timeout=60_000)  # the upload event has run the model
            predicted = page.locator("#mnist-label .output-class").inner_text().strip()
            assert predicted == str(labels[index]), predicted
            assert "ort-cpu" in info.inner_text() and "ms" in info.inner_text()
            page.screenshot(path=str(shot), full_page=True)
            # a raw 28x28 test digit fills the upload box (enlarged pixel for pixel), not a 28-pixel thumbnail
            small = tmp_path / "small.png"
            Image.fromarray(images[1]).save(small)
            page.locator("#mnist-upload input[type=file]").set_input_files(str(small))
            expect(page.locator("#mnist-label .output-class")).to_have_text(str(labels[1]), timeout=60_000)
            shown = page.locator("#mnist-upload img").first.bounding_box()
            assert shown["width"] >= 200 and shown["height"] >= 200, shown
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty image


def test_browser_drawing_on_the_sketchpad_is_recognized(demo_url, mnist_root):
    """A 7 drawn with the mouse: the sketchpad's transparent canvas, the stroke, the preprocessing.
    Then the examples, which the Draw tab shows too: a click classifies one."""
    from playwright.sync_api import expect, sync_playwright

    from toolkit.serve.server import mnist_test_digits

    first_example = mnist_test_digits(mnist_root, 8)[0][1]  # the demo's first example (serve's default: 8 digits)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(demo_url, wait_until="domcontentloaded")
            canvas = page.locator("#mnist-sketch canvas").first
            expect(canvas).to_be_visible(timeout=30_000)
            # classifying before anything is drawn (e.g. drawing before picking the brush draws nothing) says what to do
            page.locator("#mnist-classify-drawing").click()
            expect(page.get_by_text("pick the brush", exact=False).first).to_be_visible(timeout=30_000)
            page.locator("#mnist-sketch button[aria-label=Brush]").click()  # as a person would: pick the brush
            draw(page, canvas, 80)  # a 7; the drawing area sits in the middle of the editor: within 80 px of its centre
            page.locator("#mnist-classify-drawing").click()
            expect(page.locator("#mnist-info")).to_contain_text("runtime", timeout=60_000)
            assert page.locator("#mnist-label .output-class").inner_text().strip() == "7"
            # the examples are there on the Draw tab too, and a click classifies one
            examples = page.locator("#mnist-examples")
            expect(examples).to_be_visible()
            examples.locator("button").first.click()
            expect(page.locator("#mnist-label .output-class")).to_have_text(str(first_example), timeout=60_000)
        finally:
            browser.close()


# a label's width in the dropdown's own font, the room its text box leaves it, and where that room ends
_LABEL_ROOM = """(e, labels) => {
  const s = getComputedStyle(e), c = document.createElement('canvas').getContext('2d');
  c.font = s.font;
  return {room: e.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight),
          text_right: e.getBoundingClientRect().right - parseFloat(s.paddingRight),
          widths: labels.map(l => c.measureText(l).width)};
}"""


def test_browser_artifact_labels_fit_their_dropdown(demo_url, serving_export):
    """#33: the artifact dropdown's arrow covered the end of its label ("(Δ +0.00)"). In a 1024-pixel
    window every served label, and the longest one with a failed gate, fits the text box, and the text
    box ends before the arrow begins (a label too long for a narrower window ends in an ellipsis)."""
    from playwright.sync_api import sync_playwright

    from toolkit.inference.catalog import Catalog

    labels = [entry.label for entry in Catalog.from_dirs([serving_export]).entries.values()]
    labels.append(max(labels, key=len).removesuffix("]") + ", FAILED its parity gate]")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 768})
            page.goto(demo_url, wait_until="domcontentloaded")
            box = page.locator("#mnist-choice input")
            box.wait_for(timeout=60_000)
            assert box.input_value() in labels
            measured = box.evaluate(_LABEL_ROOM, labels)
            arrow = page.locator("#mnist-choice .icon-wrap").bounding_box()
        finally:
            browser.close()
    assert measured["text_right"] <= arrow["x"], (measured, arrow)
    assert max(measured["widths"]) <= measured["room"], (labels, measured)
