"""The web demo in a real browser (the system Chromium driven by Playwright) against a live server whose
generation is scripted, so that a detection must be drawn: upload, choose detect, run, read the canvas."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import palikit
from palikit.serve import background, create_app
from palikit.rle import _rle_counts_from_string, rle_encode

from .conftest import synthetic_image
from .test_serve import KEY, Scripted

pytestmark = pytest.mark.slow  # drives a browser

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    if os.environ.get("CI"):  # CI installs it (make test); a silent skip there would hide the test
        raise RuntimeError(f"CI has no {CHROMIUM}: `make test` should have installed Debian's chromium")
    pytest.skip(f"no system Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                               "playwright==1.65.2; no `playwright install` needed)")

# Without the background-networking flags Chromium reaches for the network at start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DETECTION = "<loc0100><loc0100><loc0500><loc0600> circle"
SEG_CODES = "".join(f"<seg{i:03d}>" for i in range(16))


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    answers = {"detect": DETECTION, "segment": f"<loc0100><loc0100><loc0900><loc0900>{SEG_CODES} triangle"}
    with pytest.MonkeyPatch.context() as mp:
        Scripted(pipe, answers, mp)
        with background(create_app(pipe, api_key=KEY)) as url:
            yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page per test: no test sees what another one typed or drew."""
    page = browser.new_page()
    page.goto(server + "/")
    yield page
    page.close()


def canvas_pixel(page, x: int, y: int) -> list[int]:
    """RGBA of the canvas at canvas pixel (x, y); the canvas is at screen resolution, not the image's."""
    return page.evaluate("([x, y]) => Array.from(document.getElementById('view')"
                         ".getContext('2d').getImageData(x, y, 1, 1).data)", [x, y])


def scale(page) -> float:
    return float(page.get_attribute("#view", "data-scale"))


def image_pixel(page, x: int, y: int) -> list[int]:
    """The canvas at the middle of image pixel (x, y)."""
    s = scale(page)
    return canvas_pixel(page, int((x + 0.5) * s), int((y + 0.5) * s))


def run_task(page, image_path, task: str, arg: str) -> None:
    """Upload an image, pick a task and its argument, run it and wait until the page says done."""
    page.fill("#key", KEY)
    page.set_input_files("#file", str(image_path))
    page.wait_for_selector("#run:not([disabled])")
    page.select_option("#task", task)
    page.fill("#arg", arg)
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)


def test_detect_draws_the_box(page, tmp_path):
    W, H = 200, 150
    image = synthetic_image(3, size=(W, H))
    path = tmp_path / "input.png"
    image.save(path)

    page.wait_for_selector("#key-row:not([hidden])")  # the server requires a key: the field shows
    run_task(page, path, "detect", "circle")
    assert page.text_content("#text") == DETECTION

    items = page.query_selector_all("#objects li")
    assert len(items) == 1 and "circle" in items[0].text_content()
    x1, y1, x2, y2 = map(int, items[0].get_attribute("data-box").split(","))
    expected = [round(100 / 1023 * W), round(100 / 1023 * H), round(600 / 1023 * W), round(500 / 1023 * H)]
    assert [x1, y1, x2, y2] == expected  # pixel boxes from <locY1><locX1><locY2><locX2>
    colour = items[0].get_attribute("data-color")
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    # The box's outline is on the canvas, in its colour, on all four sides...
    original = np.asarray(image)
    ym, xm = (y1 + y2) // 2, (x1 + x2) // 2
    s = scale(page)
    for x, y in [(x1, ym), (x2, ym), (xm, y2), (xm, y1)]:  # the outline runs through the corners' pixels
        assert canvas_pixel(page, round(x * s), round(y * s)) == rgb + [255], (x, y)
        assert list(original[y, x]) != rgb
    # ...and the image is still there inside it.
    inside = image_pixel(page, xm, ym)
    assert np.abs(np.array(inside[:3]) - original[ym, xm]).max() <= 2
    page.screenshot(path=str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_segment_draws_a_mask(page, tmp_path):
    """The fixture codec's mask fills the box: pixels inside it are tinted with the object's colour,
    pixels outside are the image's. Catches a mask that is not drawn, or drawn in the wrong place."""
    W, H = 200, 150
    image = synthetic_image(4, size=(W, H))
    path = tmp_path / "input.png"
    image.save(path)
    run_task(page, path, "segment", "triangle")
    (item,) = page.query_selector_all("#objects li")
    assert "+ mask" in item.text_content()
    x1, y1, x2, y2 = map(int, item.get_attribute("data-box").split(","))
    colour = item.get_attribute("data-color")
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    original = np.asarray(image).astype(int)
    alpha = 115 / 255  # maskLayer's alpha
    xm, ym = (x1 + x2) // 2, (y1 + y2) // 2
    # Inside, 3 px in from each side (below the label at the top). Outside, 3 px out from each side.
    for x, y in [(x1 + 3, ym), (x2 - 4, ym), (xm, y2 - 4), (xm, ym + 10)]:
        want = (1 - alpha) * original[y, x] + alpha * rgb
        assert np.abs(np.array(image_pixel(page, x, y)[:3]) - want).max() <= 3, (x, y)
    for x, y in [(x1 - 3, ym), (x2 + 3, ym), (xm, y2 + 3), (xm, y1 - 3), (W - 2, H - 2)]:
        assert np.abs(np.array(image_pixel(page, x, y)[:3]) - original[y, x]).max() <= 2, (x, y)


def test_js_rle_decoder_matches_python(page):
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 23)) > 0.5, np.ones((5, 7), bool), np.zeros((4, 4), bool),
             np.pad(np.ones((300, 500), bool), 700)]  # runs long enough to need many 5-bit chunks
    for mask in masks:
        rle = rle_encode(mask)
        assert page.evaluate("(s) => rleCounts(s)", rle["counts"]) == _rle_counts_from_string(rle["counts"])
        if mask.size < 10_000:
            alpha = page.evaluate("""(rle) => {
                const c = maskLayer(rle, '#ff0000');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                return Array.from(d.filter((_, i) => i % 4 === 3), (a) => (a > 0 ? 1 : 0));
            }""", rle)
            assert alpha == mask.astype(int).ravel().tolist()


def test_demo_shows_errors(page, tmp_path):
    path = tmp_path / "input.png"
    synthetic_image(5).save(path)
    page.fill("#key", "wrong")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#run:not([disabled])")
    page.select_option("#task", "ocr")
    page.click("#run")
    page.wait_for_selector("#status.error")
    assert "invalid API key" in page.text_content("#status")



@pytest.fixture(scope="module")
def open_server(tiny_model_dir):
    """A server without an API key."""
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    with pytest.MonkeyPatch.context() as mp:
        Scripted(pipe, {"detect": DETECTION, "ocr": "1234"}, mp)
        with background(create_app(pipe)) as url:
            yield url


def test_hidden_controls_are_not_shown(browser, open_server):
    """No key field on a server without a key, no text field for OCR. Catches the stylesheet's
    `display: flex` on labels overriding the `hidden` attribute."""
    page = browser.new_page()
    page.goto(open_server + "/")
    page.wait_for_selector("#task option[value=ocr]", state="attached")
    assert page.get_attribute("#key-row", "hidden") is not None and not page.is_visible("#key-row")
    page.select_option("#task", "ocr")
    assert not page.is_visible("#arg-row") and not page.is_visible("#arg")
    page.select_option("#task", "detect")
    assert page.is_visible("#arg-row")
    page.close()


def test_labels_are_readable_and_leave_the_object_visible(browser, open_server, tmp_path):
    """A 96 px image (the bundled model's size) is drawn at the canvas' screen size, and so are the
    labels: a label is its font's height, inside the image, not over the box it names, and the
    screenshot shows the box's colour in the label and the image inside the box. Catches labels
    drawn at image resolution and scaled up 7x over the object."""
    from PIL import Image

    page = browser.new_page()
    page.goto(open_server + "/")
    image = synthetic_image(6, size=(96, 96))
    image.save(tmp_path / "small.png")
    page.set_input_files("#file", str(tmp_path / "small.png"))
    page.wait_for_selector("#run:not([disabled])")
    page.select_option("#task", "detect")
    page.fill("#arg", "circle")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
    width, height = page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
    assert width >= 4 * 96 and width == height  # screen pixels, not the image's 96
    (item,) = page.query_selector_all("#objects li")
    s = scale(page)
    bx1, by1, bx2, by2 = (round(int(v) * s) for v in item.get_attribute("data-box").split(","))
    lx1, ly1, lx2, ly2 = map(int, item.get_attribute("data-label").split(","))
    assert 0 <= lx1 < lx2 <= width and 0 <= ly1 < ly2 <= height  # inside the image
    assert ly2 - ly1 <= 30  # a readable label, not one scaled with the image
    assert ly2 <= by1 or ly1 >= by2  # above or below the box: the object stays visible
    page.screenshot(path=str(tmp_path / "page.png"))
    left, top = page.evaluate("(() => { const v = document.getElementById('view'), r = v.getBoundingClientRect();"
                              " return [r.left + v.clientLeft, r.top + v.clientTop]; })()")
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)

    def shown(x, y):  # the screenshot at canvas pixel (x, y): one canvas pixel per screen pixel
        return shot[round(top + y), round(left + x)]

    colour = item.get_attribute("data-color")
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    assert np.abs(shown(lx1 + 2, (ly1 + ly2) // 2) - rgb).max() <= 8  # the label's background: the box's colour
    x, y = (bx1 + bx2) // 2, (by1 + by2) // 2
    want = np.asarray(image)[int(y / s), int(x / s)]
    assert np.abs(shown(x, y) - want).max() <= 8  # the object itself, uncovered
    page.close()


def test_an_error_clears_the_previous_result(page, tmp_path):
    """After a failed request nothing of the last answer stays on the page (text, list, boxes)."""
    W, H = 200, 150
    image = synthetic_image(7, size=(W, H))
    image.save(tmp_path / "input.png")
    run_task(page, tmp_path / "input.png", "detect", "circle")
    x1, y1, x2, y2 = map(int, page.query_selector("#objects li").get_attribute("data-box").split(","))
    s = scale(page)
    ym = (y1 + y2) // 2
    assert canvas_pixel(page, round(x1 * s), round((y1 + y2) / 2 * s))[:3] != list(np.asarray(image)[ym, x1])
    page.fill("#key", "wrong")
    page.click("#run")
    page.wait_for_selector("#status.error")
    assert page.text_content("#text") == "" and page.query_selector_all("#objects li") == []
    assert np.abs(np.array(image_pixel(page, x1, ym)[:3]) - np.asarray(image)[ym, x1]).max() <= 2  # no box


def test_api_docs_work_offline(browser, open_server):
    """/docs (linked from the demo as "API") renders every route with Swagger UI loaded from the
    server itself: nothing is fetched from a CDN. Catches a docs page that is blank without network."""
    page = browser.new_page()
    fetched = []
    page.on("request", lambda request: fetched.append(request.url))
    page.goto(open_server + "/docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    assert "/v1/chat/completions" in page.content() and "/v1/detect" in page.content()
    assert fetched and all(u.startswith(open_server) or u.startswith("data:") for u in fetched), fetched
    page.close()
