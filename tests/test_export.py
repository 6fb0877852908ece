"""`palikit export --to onnx` (palikit.export): the three graphs of transformers.js's layout, run by
onnxruntime as a transformers.js client calls them, against palikit's PyTorch model: random tiny
PaliGemma 1 and 2 (Gemma 2's window shorter than the sequence), the bundled model on its tasks;
greedy tokens identical, logits within 1e-4 in float32, left-padded batches and teacher-forced
scoring exact too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import palikit
from palikit.synthetic import make_scene

from .test_generate import teacher_forced

ort = pytest.importorskip("onnxruntime", reason="export needs the onnx extra")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.slow  # exports take seconds each

IMAGES = [make_scene(np.random.default_rng(s)).image for s in range(3)]


@pytest.fixture(scope="module")
def exported(hf_pair, tmp_path_factory):
    from palikit.export import export, load

    _, _, folder = hf_pair
    pipe = palikit.load(folder, dtype="float32", sliding_window=True)  # the window as transformers applies it
    out = export(pipe, tmp_path_factory.mktemp("onnx") / "model")
    return pipe, load(out)


def test_layout_is_transformers_js(exported):
    import json

    pipe, onnx = exported
    folder = onnx.folder
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == [
        "decoder_model_merged.onnx", "embed_tokens.onnx", "vision_encoder.onnx"]
    config = json.loads((folder / "config.json").read_text())
    assert config["image_token_index"] == pipe.config.image_token_id
    assert config["text_config"]["head_dim"] == pipe.config.text.head_dim
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.model"):
        assert (folder / name).is_file(), name
    decoder = onnx.sessions["decoder_model_merged"]
    names = [i.name for i in decoder.get_inputs()]
    assert names[:2] == ["inputs_embeds", "attention_mask"] and names[2] == "past_key_values.0.key"
    assert [o.name for o in decoder.get_outputs()][:2] == ["logits", "present.0.key"]


def test_greedy_tokens_and_logits_equal_pytorch(exported):
    pipe, onnx = exported
    for image, prompt in [(IMAGES[0], "caption en"), (IMAGES[1], "detect circle ; square"),
                          ([IMAGES[0], IMAGES[2]], "answer en which is bigger?")]:
        images = image if isinstance(image, list) else [image]
        tokens, logprobs, first = onnx.generate_details(images, prompt, max_new_tokens=8)
        (_, g), = pipe.generate_details([images], [prompt], max_new_tokens=8)
        assert tokens == g.tokens and tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(g.logprobs), atol=1e-4, rtol=0)
        _, hidden = teacher_forced(pipe, images, prompt, [])
        with torch.no_grad():
            want = pipe.model.logits(hidden, "prefill")
        window = pipe.config.text.sliding_window
        assert window is None or want.shape[0] > window  # PaliGemma 2's local layers really window
        torch.testing.assert_close(torch.from_numpy(first[0]), want, atol=1e-4, rtol=0)
        assert want.std() > 0.5


def test_padded_batches_and_teacher_forced_scoring_are_exact(exported):
    """Two prompts of different lengths, left-padded in one call: each row's logits are its own
    (attention_mask as padding, positions counted from it); a suffix given in a second call on the
    cached prompt scores as palikit.score does (causal within the chunk)."""
    pipe, onnx = exported
    text = pipe.config.text
    rows = [onnx.prompt_embeddings([IMAGES[0]], "caption en"), onnx.prompt_embeddings([IMAGES[1]], "answer en where?")]
    L = max(r.shape[1] for r in rows)
    embeds = np.zeros((2, L, rows[0].shape[2]), np.float32)
    mask = np.zeros((2, L), np.int64)
    for i, r in enumerate(rows):
        embeds[i, L - r.shape[1]:], mask[i, L - r.shape[1]:] = r[0], 1
    empty = [np.zeros((2, text.num_kv_heads, 0, text.head_dim), np.float32) for _ in range(2 * text.num_layers)]
    batch, _ = onnx.logits_and_cache(embeds, mask, empty)
    for i, r in enumerate(rows):
        alone, _ = onnx.logits_and_cache(r, np.ones((1, r.shape[1]), np.int64), [p[:1] for p in empty])
        np.testing.assert_allclose(batch[i, L - r.shape[1]:], alone[0], atol=1e-4, rtol=0)
    suffix = pipe.tokenizer.encode("a red circle") + [pipe.tokenizer.eos_id]
    prompt = rows[0]
    _, past = onnx.logits_and_cache(prompt, np.ones((1, prompt.shape[1]), np.int64), [p[:1] for p in empty])
    last, _ = onnx.logits_and_cache(prompt, np.ones((1, prompt.shape[1]), np.int64), [p[:1] for p in empty])
    ids = np.array([suffix[:-1]], np.int64)
    step = onnx.sessions["embed_tokens"].run(None, {"input_ids": ids})[0]
    logits, _ = onnx.logits_and_cache(step, np.ones((1, prompt.shape[1] + ids.shape[1]), np.int64), past)
    scores = np.concatenate([last[0, -1:], logits[0]])
    logprobs = torch.from_numpy(scores).log_softmax(-1)
    got = float(logprobs.gather(1, torch.tensor(suffix)[:, None]).sum())
    want = pipe.score([IMAGES[0]], ["caption en"], ["a red circle"])[0]
    assert got == pytest.approx(want, abs=1e-3)


def test_the_bundled_model_exports_and_answers_as_pytorch(tmp_path):
    from palikit.cli import main
    from palikit.export import load

    assert main(["export", "default", "--to", "onnx", "--out", str(tmp_path / "x"), "--quantize", "q8"]) == 0
    onnx, q8 = load(tmp_path / "x"), load(tmp_path / "x", quantize="q8")
    pipe = palikit.load("default", dtype="float32")
    for prompt in ("caption en", "detect circle ; square ; triangle", "ocr", "answer en how many shapes?"):
        tokens, _, _ = onnx.generate_details([IMAGES[2]], prompt, max_new_tokens=16)
        assert tokens == pipe.generate_details([IMAGES[2]], [prompt], max_new_tokens=16)[0][1].tokens, prompt
    # q8 (int8 weights, dynamic int8 activations): the same answer on most of the shapes world's prompts
    scenes = [make_scene(np.random.default_rng(100 + s)).image for s in range(10)]
    same = [onnx.generate_details([im], p, 16)[0] == q8.generate_details([im], p, 16)[0]
            for im in scenes for p in ("caption en", "detect circle ; square ; triangle")]
    assert sum(same) >= 0.8 * len(same), f"{sum(same)} of {len(same)}"


def test_bad_exports_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch):
    from palikit.cli import main

    (tmp_path / "taken").mkdir()
    assert main(["export", "default", "--out", str(tmp_path / "taken")]) == 2
    assert "exists; --force replaces it" in capsys.readouterr().err
    quantized = tmp_path / "q"
    if main(["quantize", "default", "--to", "int8", "--out", str(quantized)]) == 0:  # refused on some CPUs
        assert main(["export", str(quantized), "--out", str(tmp_path / "qx")]) == 2
        assert "quantised" in capsys.readouterr().err
    capsys.readouterr()
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (_ for _ in ()).throw(ValueError("opset 99")))
    assert main(["export", "default", "--out", str(tmp_path / "failed")]) == 2
    assert "opset 99" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["taken", *(["q"] if quantized.exists() else [])])


JS = Path(__file__).resolve().parent / "js"


@pytest.mark.skipif(shutil.which("node") is None, reason="no Node.js")
def test_transformers_js_runs_the_export_and_answers_as_palikit(tmp_path):
    """A client no one here wrote: transformers.js (npm @huggingface/transformers, pinned in
    tests/js/package.json, installed by `make setup-test`) loads the exported bundled model from
    the folder and gives palikit's text for caption, detect and OCR prompts."""
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        if os.environ.get("CI"):
            raise RuntimeError("CI has no transformers.js: `make test` should have run npm install in tests/js")
        pytest.skip("transformers.js is not installed (cd tests/js && npm install --ignore-scripts)")
    from palikit.export import export

    export(palikit.load("default", dtype="float32"), tmp_path / "models" / "default")
    IMAGES[2].save(tmp_path / "scene.png")
    prompts = ["caption en", "detect circle ; square ; triangle", "ocr"]
    run = subprocess.run(["node", str(JS / "generate.mjs"), str(tmp_path / "models"), "default",
                          str(tmp_path / "scene.png"), *prompts], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = {r["prompt"]: r["text"] for r in map(json.loads, run.stdout.splitlines())}
    pipe = palikit.load("default", dtype="float32")
    want = {p: pipe.generate(IMAGES[2], p, max_new_tokens=20) for p in prompts}
    assert got == want
    assert any("<loc" in t for t in got.values()), "a detection among them"


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="no system Chromium")
def test_transformers_js_in_chromium_draws_palikits_boxes(tmp_path):
    """`palikit export default` and transformers.js in headless Chromium (onnxruntime-web, wasm; the
    page tests/js/page.html, everything served from here, nothing from a CDN): the detect boxes it
    computes, parsed as palikit parses them, equal palikit's own, and its caption and OCR too."""
    import functools
    import http.server
    import threading
    from urllib.parse import quote

    sync_api = pytest.importorskip("playwright.sync_api")
    if not (JS / "node_modules" / "onnxruntime-web").is_dir():
        if os.environ.get("CI"):
            raise RuntimeError("CI has no transformers.js: `make test` should have run npm install in tests/js")
        pytest.skip("transformers.js is not installed (cd tests/js && npm install --ignore-scripts)")
    from palikit.export import export

    root = tmp_path / "site"
    export(palikit.load("default", dtype="float32"), root / "models" / "default")
    (root / "node_modules").symlink_to(JS / "node_modules")
    shutil.copyfile(JS / "page.html", root / "page.html")
    IMAGES[2].save(root / "scene.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prompts = ["detect circle ; square ; triangle", "caption en", "ocr"]
    url = f"http://127.0.0.1:{server.server_address[1]}/page.html?" + "&".join(f"prompt={quote(p)}" for p in prompts)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('out').dataset.done === '1'", timeout=240_000)
            results = json.loads(page.text_content("#out"))
            browser.close()
    finally:
        server.shutdown()
    assert isinstance(results, list), results
    got = {r["prompt"]: r["text"] for r in results}
    pipe = palikit.load("default", dtype="float32")
    assert got == {p: pipe.generate(IMAGES[2], p, max_new_tokens=20) for p in prompts}
    from palikit.tasks import parse_detections

    boxes = parse_detections(got[prompts[0]], *IMAGES[2].size).objects  # the browser's boxes, in pixels
    want = pipe.detect(IMAGES[2], ["circle", "square", "triangle"], max_new_tokens=20)
    assert boxes and [(o.label, o.box) for o in boxes] == [(o.label, o.box) for o in want]
