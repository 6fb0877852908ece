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


def detection_box(W: int, H: int) -> list[float]:
    """DETECTION's box in image pixels, unrounded: <locY1><locX1><locY2><locX2>, each / 1023."""
    return [100 / 1023 * W, 100 / 1023 * H, 600 / 1023 * W, 500 / 1023 * H]


def upload(page, image_path) -> None:
    """Choose a file and wait until the page shows it (Run is disabled while a file is read)."""
    page.set_input_files("#file", str(image_path))
    page.wait_for_selector("#run:not([disabled])")


def run_task(page, image_path, task: str, arg: str) -> None:
    """Upload an image, pick a task and its argument, run it and wait until the page says done."""
    page.fill("#key", KEY)
    upload(page, image_path)
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
    fx1, fy1, fx2, fy2 = detection_box(W, H)
    for x, y in [(fx1, ym), (fx2, ym), (xm, fy2), (xm, fy1)]:  # the outline runs through the corners' pixels
        assert canvas_pixel(page, round(x * s), round(y * s)) == rgb + [255], (x, y)
        assert list(original[int(y), int(x)]) != rgb
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
    # Inside, 3 px in from each side (below the label at the top): tinted, or on a stripe, tinted and then
    # whitened. Outside, 3 px out from each side: the image.
    for x, y in [(x1 + 3, ym), (x2 - 4, ym), (xm, y2 - 4), (xm, ym + 10)]:
        tinted = (1 - alpha) * original[y, x] + alpha * rgb
        striped = (1 - alpha) * tinted + alpha * 255
        got = np.array(image_pixel(page, x, y)[:3])
        assert min(np.abs(got - tinted).max(), np.abs(got - striped).max()) <= 3, (x, y)
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
    upload(page, tmp_path / "small.png")
    page.select_option("#task", "detect")
    page.fill("#arg", "circle")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
    width, height = page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
    assert width >= 4 * 96 and width == height  # screen pixels, not the image's 96
    (item,) = page.query_selector_all("#objects li")
    s = scale(page)
    bx1, by1, bx2, by2 = (round(v * s) for v in detection_box(96, 96))
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
    side = canvas_pixel(page, round(detection_box(W, H)[0] * s), round(ym * s))
    assert side[:3] != list(np.asarray(image)[ym, x1])
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


# ----------------------------------------------------------------------------- drawing, files, the opening page


def draw_objects(page, objects: list[dict]) -> list[dict]:
    """Draw `objects` (as the API returns them) over the page's image with the page's own draw();
    -> each listed object's data attributes (box, color, label)."""
    return page.evaluate("(objects) => { draw(objects); return Array.from(document.querySelectorAll("
                         "'#objects li'), (li) => ({...li.dataset})); }", objects)


def canvas_size(page) -> list[int]:
    return page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")


def hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])


def canvas_region(page, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """[y2 - y1, x2 - x1, 3] of the canvas."""
    data = page.evaluate("([x, y, w, h]) => Array.from(document.getElementById('view').getContext('2d')"
                         ".getImageData(x, y, w, h).data)", [x1, y1, x2 - x1, y2 - y1])
    return np.array(data).reshape(y2 - y1, x2 - x1, 4)[..., :3]


def test_the_text_field_resets_when_the_task_changes(page):
    """Labels typed for detect must not become segment's labels or a question: the field empties,
    showing the new task's example."""
    page.wait_for_selector("#task option[value=segment]", state="attached")
    page.select_option("#task", "detect")
    page.fill("#arg", "circle ; star")
    page.select_option("#task", "segment")
    assert page.input_value("#arg") == ""
    assert page.get_attribute("#arg", "placeholder")  # the task's example shows instead
    page.fill("#arg", "triangle")
    page.select_option("#task", "detect")
    assert page.input_value("#arg") == ""


def test_an_unreadable_file_clears_the_image_and_disables_run(page, tmp_path):
    """Choosing a file that is not an image leaves no old image to run on by mistake: the canvas is
    empty, Run is disabled and the status says which file and why. A good file enables Run again."""
    synthetic_image(8, size=(64, 48)).save(tmp_path / "input.png")
    upload(page, tmp_path / "input.png")
    (tmp_path / "notes.txt").write_text("not an image")
    page.set_input_files("#file", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#status.error")
    status = page.text_content("#status")
    assert "notes.txt" in status and "not an image" in status, status
    assert page.is_disabled("#run")
    assert canvas_size(page) == [0, 0]
    page.screenshot(path=str(tmp_path / "unreadable.png"))
    upload(page, tmp_path / "input.png")
    assert "input.png" in page.text_content("#status") and not page.is_disabled("#run")


def test_boxes_are_scaled_before_rounding(page, tmp_path):
    """A box's sides are at round(side x scale) canvas pixels, not round(round(side) x scale): on a 96 px
    image shown 7.5x, rounding first moves a side by up to 4 canvas pixels."""
    synthetic_image(9, size=(96, 96)).save(tmp_path / "small.png")
    upload(page, tmp_path / "small.png")
    box = [9.4, 12.45, 60.4, 50.42]
    (item,) = draw_objects(page, [{"label": "circle", "confidence": None, "box": box}])
    s = scale(page)
    assert all(abs(round(v * s) - round(round(v) * s)) >= 2 for v in box), s  # the two ways differ
    x1, y1, x2, y2 = (round(v * s) for v in box)
    xm, ym = (x1 + x2) // 2, (y1 + y2) // 2
    rgb = list(hex_rgb(item["color"]))
    for x, y in [(x1, ym), (x2, ym), (xm, y1), (xm, y2)]:  # the outline is 2 px wide, ending at the side
        assert canvas_pixel(page, x, y)[:3] == rgb, (x, y)
    page.screenshot(path=str(tmp_path / "scaled.png"))


def test_js_colours_match_python(page):
    """The web demo and palikit.draw colour objects by one rule: the same colours for the same labels."""
    labels = ["cat", "cat", "dog", "", "café", "日本語", "cat", "a b", "circle", "circle", "cat", "cat", "cat"]
    labels += [f"label {i % 17}" for i in range(60)]
    got = page.evaluate("(labels) => colours(labels)", labels)
    from palikit.overlay import colours

    assert got == ["#{:02x}{:02x}{:02x}".format(*c) for c in colours(labels)]


def test_each_object_has_its_colour_in_its_labels_family(page, tmp_path):
    """Objects with one label get shades of one hue, each its own; another label gets another hue."""
    import colorsys

    synthetic_image(10, size=(96, 96)).save(tmp_path / "small.png")
    upload(page, tmp_path / "small.png")
    boxes = [[5, 30, 25, 50], [30, 30, 50, 50], [55, 30, 75, 50], [5, 60, 25, 80]]
    items = draw_objects(page, [{"label": label, "confidence": 0.9, "box": box}
                                for label, box in zip(["cat", "dog", "cat", "cat"], boxes)])
    rgb = [hex_rgb(item["color"]) for item in items]
    hue = [colorsys.rgb_to_hls(*(c / 255))[0] * 360 for c in rgb]
    cats = [0, 2, 3]
    assert len({item["color"] for item in items}) == 4  # each object its own colour
    assert max(hue[i] for i in cats) - min(hue[i] for i in cats) < 2  # the cats': one hue
    assert min(abs(hue[1] - hue[i]) for i in cats) > 20  # the dog's: another
    s = scale(page)
    for box, c in zip(boxes, rgb):  # drawn in the listed colour
        assert canvas_pixel(page, round(box[0] * s), round((box[1] + box[3]) / 2 * s))[:3] == list(c)
    page.screenshot(path=str(tmp_path / "colours.png"))


def test_a_mask_shows_on_a_shape_of_its_own_colour(page, tmp_path):
    """A mask over a shape of exactly its colour is still seen: its stripes differ from the shape.
    A tint alone would leave the canvas inside the mask the shape's colour."""
    mask = np.zeros((96, 96), bool)
    mask[30:80, 20:76] = True
    objects = [{"label": "ball", "confidence": None, "box": [20, 30, 76, 80], "mask": rle_encode(mask)}]
    synthetic_image(11, size=(96, 96)).save(tmp_path / "noise.png")
    upload(page, tmp_path / "noise.png")
    (item,) = draw_objects(page, objects)
    colour = hex_rgb(item["color"])
    from PIL import Image

    Image.new("RGB", (96, 96), tuple(int(v) for v in colour)).save(tmp_path / "same.png")
    upload(page, tmp_path / "same.png")
    draw_objects(page, objects)
    s = scale(page)
    inside = canvas_region(page, round(20 * s) + 4, round(30 * s) + 4, round(76 * s) - 4, round(80 * s) - 4)
    differs = np.abs(inside - colour).max(-1) > 40
    assert differs.mean() > 0.1, differs.mean()
    outside = canvas_region(page, 0, round(85 * s), round(96 * s) - 1, round(96 * s) - 1)
    assert (np.abs(outside - colour).max(-1) <= 2).all()  # the image itself stays as it is
    page.screenshot(path=str(tmp_path / "same-colour-mask.png"))


def test_labels_stay_inside_the_image_and_off_the_object(page, tmp_path):
    """At the image's edges a label is moved inside the image: below a box at the top, left of the
    right edge for a box there; for a box filling the image, inside it at the top, clear of its middle.
    A caption wider than the image is squeezed into it, not cut off at the right edge."""
    synthetic_image(12, size=(96, 96)).save(tmp_path / "small.png")
    upload(page, tmp_path / "small.png")
    boxes = [[0, 0, 30, 40], [70, 50, 96, 80], [0, 0, 96, 96], [10, 60, 30, 70]]
    labels = ["circle", "a rather long label", "square", "M" * 100]
    items = draw_objects(page, [{"label": label, "confidence": 0.5, "box": box}
                                for label, box in zip(labels, boxes)])
    width, height = canvas_size(page)
    s = scale(page)
    for item, box in zip(items, boxes):
        lx1, ly1, lx2, ly2 = map(int, item["label"].split(","))
        bx1, by1, bx2, by2 = (round(v * s) for v in box)
        assert 0 <= lx1 < lx2 <= width and 0 <= ly1 < ly2 <= height, item  # inside the image
        if box[3] - box[1] < 96:
            assert ly2 <= by1 or ly1 >= by2, item  # above or below: the object stays visible
        else:
            assert ly2 < (by1 + by2) / 2, item  # inside, at the top: its middle stays visible
    lx1, ly1, lx2, ly2 = map(int, items[3]["label"].split(","))
    assert (lx1, lx2) == (0, width)
    right_end = canvas_region(page, lx2 - 2, ly1 + 1, lx2, ly2 - 1)  # the text's padding: no glyph there
    assert (np.abs(right_end - hex_rgb(items[3]["color"])).max(-1) <= 8).all()
    page.screenshot(path=str(tmp_path / "edges.png"))


def test_the_empty_page_shows_a_sample_image_and_has_an_icon(browser, server, tmp_path):
    """Before anything is uploaded the page holds a small synthetic scene that Run works on, and its
    icon is inline: no request of the page fails (no /favicon.ico 404)."""
    from PIL import Image

    page = browser.new_page()
    failed = []
    page.on("response", lambda r: r.status >= 400 and failed.append(r.url))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('sample.png')")
    sample = page.request.get(server + "/sample.png")
    assert sample.ok and sample.headers["content-type"] == "image/png" and len(sample.body()) < 10_000
    (tmp_path / "sample.png").write_bytes(sample.body())
    image = np.asarray(Image.open(tmp_path / "sample.png").convert("RGB")).astype(int)
    assert not page.is_disabled("#run") and page.evaluate("document.getElementById('view').width") > 0
    for x, y in [(112, 112), (40, 180), (175, 55)]:  # the canvas shows the sample
        assert np.abs(np.array(image_pixel(page, x, y)[:3]) - image[y, x]).max() <= 2, (x, y)
    page.fill("#key", KEY)
    page.select_option("#task", "detect")
    page.fill("#arg", "circle")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
    assert page.text_content("#text") == DETECTION and len(page.query_selector_all("#objects li")) == 1
    icon = page.get_attribute("link[rel=icon]", "href")
    assert icon and icon.startswith("data:image/svg+xml")
    assert page.evaluate("(src) => new Promise((done) => { const i = new Image(); i.onload = () => done(true);"
                         " i.onerror = () => done(false); i.src = src; })", icon)
    page.screenshot(path=str(tmp_path / "empty-page.png"))
    assert failed == []
    page.close()


def test_the_demo_offers_the_loaded_adapters(browser, tiny_model_dir, tmp_path):
    """A server with LoRA adapters: the page's model menu lists the base and each adapter, and a run
    on an adapter answers as that adapter does; the token budget is left to the server (the
    task's) unless typed."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .test_adapters import hf_model

    model = get_peft_model(hf_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=16, target_modules=r".*language_model.*\.q_proj"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.save_pretrained(tmp_path / "qv")
    pipe = palikit.load(tiny_model_dir, dtype="float32")
    image = synthetic_image(3, (64, 48))
    image.save(tmp_path / "a.png")
    sent = []
    with background(create_app(pipe, model_name="tiny", adapters=(f"qv={tmp_path / 'qv'}",))) as url:
        page = browser.new_page()
        page.on("request", lambda r: sent.append(r.post_data_json) if "/v1/" in r.url else None)
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('adapter').options.length === 2")
        assert page.eval_on_selector_all("#adapter option", "os => os.map(o => o.textContent)") == ["tiny (base)", "qv"]
        page.set_input_files("#file", str(tmp_path / "a.png"))
        page.wait_for_function("!document.getElementById('run').disabled")
        page.select_option("#task", "caption")
        page.select_option("#adapter", "qv")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        shown = page.text_content("#text")
        page.close()
    budget = palikit.tasks.task_spec("caption").max_new_tokens
    assert shown == pipe.generate(image, "caption en", max_new_tokens=budget, adapter="qv")
    assert sent[-1]["adapter"] == "qv" and "max_new_tokens" not in sent[-1]


def test_a_clip_plays_and_its_sampled_frames_show_under_the_answer(browser, tmp_path):
    """A clip chosen on the page plays in a video element; Run sends it with the frames that fit the
    server's rows, the answer is the model's on those frames, and the frames it saw are shown under
    the answer (read back from their pixels: make_clip paints each frame's number)."""
    pytest.importorskip("av")
    from palikit.synthetic import make_clip

    path = tmp_path / "clip.webm"  # VP8: what every Chromium plays
    make_clip(path, frames=40, fps=10)
    pipe = palikit.load("default", dtype="float32")
    with background(create_app(pipe)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        page.set_input_files("#file", str(path))
        page.wait_for_function("!document.getElementById('run').disabled")
        assert page.eval_on_selector("#clip", "v => !v.hidden && v.readyState >= 2 && v.duration > 3.5")
        frames = int(page.get_attribute("#frames", "placeholder"))
        page.select_option("#task", "caption")
        page.click("#run")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60000)
        shown = page.text_content("#text")
        numbers = page.evaluate("""() => Array.from(document.querySelectorAll('#frames canvas')).map(c => {
            const d = c.getContext('2d').getImageData(0, 1, c.width, 1).data;
            let n = 0; for (let x = 0; x < c.width; x++) if (d[4 * x] > 200 && d[4 * x + 1] > 200 && d[4 * x + 2] > 200) n++;
            return n; })""")
        times = page.eval_on_selector_all("#frames figcaption", "fs => fs.map(f => f.textContent)")
        page.close()
    want = pipe.generate(str(path), "caption en", frames=frames, max_new_tokens=64)
    assert frames == 4 and shown == want  # (704 slots - 128) // 144 image tokens
    assert numbers == [0, 9, 18, 27] and times == ["0.00 s", "0.90 s", "1.80 s", "2.70 s"]
