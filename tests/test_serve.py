"""The HTTP server on a tiny random checkpoint: the openai client against a live uvicorn server,
batching under concurrency, every kind of bad request, disconnects, overload and timeouts."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import math
import re
import socket
import struct
import threading
import weakref
import zlib

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import palikit
from palikit.engine import Runner
from palikit.processor import encode_example
from palikit.serve import background, create_app
from palikit.rle import rle_decode

from .conftest import box_pixels, synthetic_image

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def chat_body(image_ref: str, prompt: str, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_ref}}, {"type": "text", "text": prompt}]
    return {"messages": [{"role": "user", "content": content}], **kw}


LOGPROB = -0.5  # every scripted token's log-prob: a confidence of exp(-0.5)


class Scripted:
    """Scripted answers on the real pipeline and engine: palikit.engine.Runner.choose is patched
    (through `monkeypatch`, for the engines of `pipe` only) so that, before the real choose runs,
    each running request's row of next-token logits has its argmax at the next token of the
    request's scripted answer (its tokens, then <eos>), with a log-softmax of LOGPROB there (to
    float32 rounding). The model still prefills and decodes; the engine's own choose appends,
    streams, stops at stop strings and cuts at max_new_tokens. The first word of a request's
    prompt (its ids without the image tokens and <bos>, decoded) picks its answer from a dict, or
    `answers(images, prompt)` makes it; a request whose answer cannot be made (a missing key) fails
    alone with that error. Sampled requests are scripted too: their rows are chosen greedily.

    Each choose waits until `gate` is set (open by default), so a test can hold the model busy while
    it queues requests; `entered` is set once a choose has started, `exited` once one has returned.
    `calls`: each request's prompt, when the model first sees it; `steps`: the prompts of the rows
    of each step, in row order."""

    def __init__(self, pipe, answers, monkeypatch, gate_open: bool = True):
        self.pipe, self.answers = pipe, answers
        self.calls: list[str] = []
        self.steps: list[list[str]] = []
        self.scripts = weakref.WeakKeyDictionary()  # request -> (prompt, token ids then <eos> | exception)
        self.gate, self.entered, self.exited = threading.Event(), threading.Event(), threading.Event()
        if gate_open:
            self.gate.set()
        real = Runner.choose

        def choose(runner, running, eos):
            if runner.pipe is not self.pipe:  # another pipeline's engine: untouched
                return real(runner, running, eos)
            return self.choose(real, runner, running, eos)

        monkeypatch.setattr(Runner, "choose", choose)

    def script(self, request) -> tuple[str, list[int] | Exception]:
        if request not in self.scripts:
            tok = self.pipe.tokenizer
            text_ids = [i for i in request.prompt_ids if i not in (tok.image_token_id, tok.bos_id)]
            prompt = tok.decode(text_ids).strip()
            self.calls.append(prompt)
            try:
                answer = (self.answers(request.images, prompt) if callable(self.answers)
                          else self.answers[prompt.split()[0]])
                self.scripts[request] = prompt, tok.encode(answer) + [tok.eos_id]
            except Exception as e:
                self.scripts[request] = prompt, e
        return self.scripts[request]

    def choose(self, real, runner, running, eos) -> int:
        self.entered.set()
        sampled = []
        try:
            assert self.gate.wait(30), "the test never opened the gate"
            V = runner.logits.shape[-1]
            # The chosen token's logit 0, one other token's d, the rest -inf: the log-softmax at the
            # chosen one is -log(1 + e^d) = LOGPROB, to float32's rounding of a sum of two terms (all
            # V logits finite instead would sum V terms and miss it by about 1e-6).
            d = math.log(math.exp(-LOGPROB) - 1)
            failed = []
            for i, r in enumerate(running):
                _, script = self.script(r)
                if isinstance(script, Exception):
                    failed.append((r, script))
                    token = eos  # the row ends now, without a token: then fails with the error
                else:
                    token = script[len(r.tokens)]
                runner.logits[i] = -math.inf
                runner.logits[i, token], runner.logits[i, (token + 1) % V] = 0.0, d
                if r.sampling.do_sample:
                    sampled.append((r, r.sampling))
                    r.sampling = dataclasses.replace(r.sampling, do_sample=False)
            self.steps.append([self.scripts[r][0] for r in running])
            n = real(runner, running, eos)
            for r, error in failed:
                if not r.cancelled:  # the engine retires the row: it finishes with the error
                    def fail(*_, finish=r.finish, error=error):
                        finish(None, error)
                    r.finish = fail
            return n
        finally:
            for r, sampling in sampled:
                r.sampling = sampling
            self.exited.set()


def when_queued(app, n: int) -> threading.Event:
    """An event set once `n` requests wait in the app's queue (a hook on the batcher's submit).
    Install it while the model holds a request, so that the held one is not counted."""
    batcher, queued = app.state.palikit.batcher, threading.Event()
    submit = batcher.submit

    def hooked(job):
        submit(job)
        if batcher.depth >= n:
            queued.set()

    batcher.submit = hooked
    return queued


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return palikit.load(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def live(pipe):
    """A live server with an API key and small limits; yields (base URL, app)."""
    app = create_app(pipe, api_key=KEY, model_name="tiny", max_body_bytes=1_000_000,
                     max_image_pixels=1_000_000)
    with background(app) as url:
        yield url, app


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live[0], headers=AUTH, timeout=60) as c:
        yield c


# ---- the OpenAI-compatible endpoint --------------------------------------------------------------


def test_openai_client(live, pipe):
    url, _ = live
    oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    assert [m.id for m in oai.models.list()] == ["tiny"]
    img = synthetic_image(0)
    messages = chat_body(data_url(img), "caption en")["messages"]
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    expected = pipe.generate(img, "caption en", max_new_tokens=6)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    prompt_tokens = len(encode_example(pipe.tokenizer, pipe.config.num_image_tokens, "caption en").ids)
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    # The random model never picks <eos>: the answer is cut at max_tokens, and says so.
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    # max_completion_tokens wins over max_tokens.
    r2 = oai.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=2, max_tokens=50)
    assert r2.usage.completion_tokens == 2 and r2.choices[0].finish_reason == "length"

    # Sampling parameters reach the sampler: a seed reproduces, another seed and greedy differ,
    # and a tiny top_p keeps only the most likely token, i.e. greedy.
    def sample(**kw):
        r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **kw)
        return r.choices[0].message.content

    greedy = pipe.generate(img, "caption en", max_new_tokens=8)
    seeded = [sample(temperature=1.5, top_p=0.9, seed=7) for _ in range(2)]
    assert seeded[0] == seeded[1] == pipe.generate(img, "caption en", max_new_tokens=8, do_sample=True,
                                                   temperature=1.5, top_p=0.9, seed=7)
    assert seeded[0] != greedy and seeded[0] != sample(temperature=1.5, top_p=0.9, seed=8)
    assert sample(temperature=1.5, top_p=1e-6, seed=7) == greedy

    with pytest.raises(openai.NotFoundError, match="does not exist"):  # another model's name: OpenAI's 404
        oai.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    # Log-probs: each token's, and the most likely ones, as OpenAI's choice.logprobs; they are the
    # engine's log-probs of the answer, the chosen token the first of the top ones when greedy.
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    want = pipe.generate_details([[img]], ["caption en"], max_new_tokens=5)[0][1]
    assert "".join(c.token for c in content).strip() == r.choices[0].message.content.strip()
    assert [c.logprob for c in content] == pytest.approx(want.logprobs, abs=1e-5)
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-6)
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    plain = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_finish_reason_stop_and_length(pipe, monkeypatch):
    """An answer that ends before max_tokens stops; a longer one is cut to max_tokens tokens. The
    native endpoints say "eos" where OpenAI's chat completions say "stop" (a stop string: "stop")."""
    Scripted(pipe, {"caption": "a red circle and a blue square"}, monkeypatch)
    ids = pipe.tokenizer.encode("a red circle and a blue square")
    with TestClient(create_app(pipe)) as c:
        body = chat_body(data_url(synthetic_image(0)), "caption en", max_tokens=len(ids) + 5)
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == len(ids)
        assert r["choices"][0]["message"]["content"] == "a red circle and a blue square"
        r = c.post("/v1/chat/completions", json=body | {"max_tokens": 3}).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
        assert r["choices"][0]["message"]["content"] == pipe.tokenizer.decode(ids[:3])
        native = {"image": data_url(synthetic_image(0)), "max_new_tokens": len(ids) + 5}
        assert c.post("/v1/caption", json=native).json()["finish_reason"] == "eos"
        assert c.post("/v1/caption", json=native | {"max_new_tokens": 3}).json()["finish_reason"] == "length"


def test_openai_client_streaming(live, pipe):
    url, _ = live
    oai = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    img = synthetic_image(1)
    messages = chat_body(data_url(img), "answer en how many circles?")["messages"]
    chunks = list(oai.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == pipe.generate(img, "answer en how many circles?", max_new_tokens=12)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def straddling_stop(pipe, image, prompt: str, n: int) -> tuple[str, str]:
    """The greedy answer of n tokens, and a stop string that starts inside one token and ends in
    the next (so a stream must hold back its first characters), found first where it ends."""
    (_, g), = pipe.generate_details(image, prompt, max_new_tokens=n)
    texts = [pipe.tokenizer.decode(g.tokens[:i]) for i in range(n + 1)]
    for i in range(1, n - 2):
        if len(texts[i]) >= 2 and len(texts[i + 1]) > len(texts[i]):
            stop = texts[i][-2:] + texts[i + 1][len(texts[i])]
            if texts[-1].find(stop) == len(texts[i]) - 2 and stop.strip():
                return texts[-1], stop
    raise AssertionError("no token boundary to put a stop string across")


def test_stop_strings(pipe):
    """OpenAI's `stop`: the answer ends before the stop string, streamed or not (the stream never
    sends a character of it), finish_reason "stop"; the engine stops generating there."""
    img = synthetic_image(3)
    full, stop = straddling_stop(pipe, img, "caption en", 16)
    want = full[: full.find(stop)]
    with TestClient(create_app(pipe)) as c:
        body = chat_body(data_url(img), "caption en", max_tokens=16) | {"stop": [stop, "never said"]}
        r = c.post("/v1/chat/completions", json=body).json()
        assert r["choices"][0]["message"]["content"] == want and r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] < 16, "the engine stops at the stop string"
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == want
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
        too_many = c.post("/v1/chat/completions", json=body | {"stop": list("abcde")})
        assert too_many.status_code == 400 and "up to 4" in too_many.text


def test_raw_stream_ends_with_done(client):
    body = chat_body(data_url(synthetic_image(2)), "caption en", max_tokens=3, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


# ---- batching ----------------------------------------------------------------------------------------


def solid(i: int) -> Image.Image:
    """Image number i: one solid colour, which survives the server's resize exactly."""
    return Image.new("RGB", (40 + i, 30), (10 * i, 255 - 10 * i, 77))


def echo(images, prompt: str) -> str:
    """An answer only this (image, prompt) gets: which image, the prompt, then filler to cut."""
    r, g, b = images[0].getpixel((0, 0))
    return f"image {r // 10} said {prompt} :: " + "a red circle above a blue square " * 4


def test_concurrent_requests_are_batched_and_correct(pipe, monkeypatch):
    """64 concurrent requests, each with its own answer (image, prompt and max_tokens all differ),
    queued behind a busy model so that the engine decodes 8 rows a step until the queue is empty.
    Catches an answer delivered to another request of its batch, the wrong image or prompt used for
    a row, a wrong cut, or requests decoded one at a time."""
    scripted = Scripted(pipe, echo, monkeypatch, gate_open=False)
    app = create_app(pipe, max_batch=8, max_queue=64)
    prompts = ["caption en", "answer en what colour is the star?", "detect circle ; square", "ocr"]
    cases = [(i % 16, i // 16, 20 + i % 3) for i in range(64)]  # (image, prompt, max_tokens)
    tok = pipe.tokenizer
    want = [tok.decode(tok.encode(echo([solid(im)], prompts[p]))[:n]) for im, p, n in cases]
    assert len(set(want)) == 64

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=70)) as c:
            def post(image, prompt, n):
                return asyncio.ensure_future(c.post("/v1/chat/completions", json=chat_body(
                    data_url(image), prompt, max_tokens=n)))
            blocker = post(solid(99), "caption en", 3)  # the model is busy with this one...
            assert await asyncio.to_thread(scripted.entered.wait, 30)
            queued = when_queued(app, 64)
            requests = [post(solid(im), prompts[p], n) for im, p, n in cases]
            assert await asyncio.to_thread(queued.wait, 30)
            scripted.gate.set()  # ...while all 64 queue up
            return await blocker, await asyncio.gather(*requests)

    with background(app) as url:
        blocker, responses = asyncio.run(fire(url))
        metrics = httpx.get(url + "/metrics").text
    assert blocker.status_code == 200 and [r.status_code for r in responses] == [200] * 64
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == want
    assert sorted(scripted.calls[1:]) == sorted(prompts[p] for _, p, _ in cases)  # each request seen once
    # Rows per step: the blocker alone, then 8 (a row that leaves is refilled from the queue before
    # the next step) until the queue is empty, then fewer as the last ones finish (in at most 22
    # steps, the longest answer). Every row of every step makes a token: none is wasted.
    rows = [len(step) for step in scripted.steps]
    full = next((i for i, n in enumerate(rows[1:], 1) if n < 8), len(rows)) - 1  # steps of 8 after the first
    assert rows[0] == 1 and rows[1:full + 1] == [8] * full and full >= (64 * 20 - 7 * 22) // 8
    assert rows[full + 1:] == sorted(rows[full + 1:], reverse=True) and len(rows) - full - 1 <= 22
    assert sum(rows) == 3 + sum(n for _, _, n in cases)
    assert int(re.search(r"^palikit_batch_size_max (\d+)$", metrics, re.M).group(1)) == 8


def test_continuous_batching_answers_each_request_as_alone():
    """24 concurrent requests on the bundled model through the engine:
    mixed tasks, lengths and streaming, several on one image. Each gets the answer of running it
    alone, rows are decoded together, and the image cache is hit."""
    from palikit.synthetic import make_scene

    pipe = palikit.load("default", dtype="float32")
    app = create_app(pipe, max_batch=6)
    assert app.state.palikit.batcher.engine.max_rows == 6
    images = [make_scene(np.random.default_rng(i)).image for i in range(6)]
    prompts = ["caption en", "ocr", "answer en what colour is the square?", "detect circle ; square",
               "segment triangle"]
    cases = [(i % 6, i % 5, 4 + 3 * (i % 4), i % 3 == 0) for i in range(24)]  # image, prompt, max_tokens, stream
    want = [pipe.generate(images[im], prompts[p], max_new_tokens=n) for im, p, n, _ in cases]
    assert len(set(want)) >= 10, "answers must differ per request"

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=30)) as c:
            async def one(im, p, n, stream):
                body = chat_body(data_url(images[im]), prompts[p], max_tokens=n, stream=stream)
                if not stream:
                    return (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
                text = ""
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        event = json.loads(line[6:]) if line.startswith("data: {") else {}
                        if event.get("choices"):
                            text += event["choices"][0]["delta"].get("content", "")
                return text
            return await asyncio.gather(*[one(*case) for case in cases])

    with background(app) as url:
        got = asyncio.run(fire(url))
        metrics = httpx.get(url + "/metrics").text
    assert got == want
    assert int(re.search(r"^palikit_batch_size_max (\d+)$", metrics, re.M).group(1)) > 1
    assert float(re.search(r"^palikit_image_cache_hit_rate (\S+)$", metrics, re.M).group(1)) > 0.5
    assert re.search(r"^palikit_running_rows 0$", metrics, re.M)


def test_full_engine_queue_answers_503(pipe, monkeypatch):
    """The engine's queue full (one row held mid-decode, one request waiting): the next gets 503."""
    gate, inside = threading.Event(), threading.Event()
    decode = pipe.decode_step

    def held(*args):
        inside.set()
        assert gate.wait(60)
        return decode(*args)

    monkeypatch.setattr(pipe, "decode_step", held)
    app = create_app(pipe, max_queue=1, max_batch=1)
    body = {"image": data_url(synthetic_image(0)), "max_new_tokens": 3}

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            running = asyncio.ensure_future(c.post("/v1/caption", json=body))
            assert await asyncio.to_thread(inside.wait, 30)
            waiting = asyncio.ensure_future(c.post("/v1/caption", json=body))
            while app.state.palikit.batcher.depth < 1:
                await asyncio.sleep(0.01)
            refused = await c.post("/v1/caption", json=body)
            gate.set()
            return [await running, await waiting], refused

    with background(app) as url:
        served, refused = asyncio.run(fire(url))
    assert [r.status_code for r in served] == [200, 200]
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"


# ---- native endpoints ------------------------------------------------------------------------------


def test_native_text_endpoints(client, pipe):
    img = synthetic_image(3, size=(64, 48))
    body = {"image": base64.b64encode(png(img)).decode(), "max_new_tokens": 4}  # raw base64 works too
    for path, extra, prompt in [("caption", {"lang": "fr"}, "caption fr"),
                                ("ask", {"question": "how many circles?"}, "answer en how many circles?"),
                                ("ocr", {}, "ocr"), ("predict", {"prompt": "describe en"}, "describe en")]:
        r = client.post(f"/v1/{path}", json=body | extra)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["prompt"] == prompt and (out["width"], out["height"]) == (64, 48)
        assert out["text"] == pipe.generate(img, prompt, max_new_tokens=4) and out["objects"] is None


def test_detect_and_segment_give_pixel_boxes_and_masks(pipe, monkeypatch):
    codes = "".join(f"<seg{i:03d}>" for i in range(16))
    answers = {"detect": "<loc0100><loc0200><loc0500><loc0600> circle ; "
                         "<loc0010><loc0010><loc0020><loc0020> sq",
               "segment": f"<loc0100><loc0100><loc0900><loc0900>{codes} triangle"}
    Scripted(pipe, answers, monkeypatch)
    app = create_app(pipe)
    img = synthetic_image(4, size=(200, 100))
    with TestClient(app) as c:
        r = c.post("/v1/detect", json={"image": data_url(img), "labels": ["circle", "sq"]})
        assert r.status_code == 200, r.text
        objs = r.json()["objects"]
        assert [o["label"] for o in objs] == ["circle", "sq"]
        np.testing.assert_allclose(objs[0]["box"], [200 * 200 / 1023, 100 * 100 / 1023,
                                                    600 * 200 / 1023, 500 * 100 / 1023], atol=1e-6)
        assert objs[0]["logprob"] == pytest.approx(-0.5) and objs[0]["confidence"] == pytest.approx(math.exp(-0.5))
        r = c.post("/v1/segment", json={"image": data_url(img), "labels": "triangle"})
        assert r.status_code == 200, r.text
        (seg,) = r.json()["objects"]
        assert seg["codes"] == list(range(16)) and seg["mask"]["size"] == [100, 200]
        np.testing.assert_allclose(seg["box"], [200 * 100 / 1023, 100 * 100 / 1023, 200 * 900 / 1023,
                                                100 * 900 / 1023], atol=1e-6)
        mask = rle_decode(seg["mask"])  # the fixture codec's mask fills its box
        assert mask.any() and np.array_equal(mask, box_pixels(seg["box"], 100, 200))
        # The free prompt endpoint parses objects too.
        r = c.post("/v1/predict", json={"image": data_url(img), "prompt": "detect circle"})
        assert r.json()["task"] == "detect" and len(r.json()["objects"]) == 2


def test_segment_without_codec_is_501(pipe, monkeypatch):
    scripted = Scripted(pipe, {"segment": "x"}, monkeypatch)
    monkeypatch.setattr(pipe, "codec_path", None)
    with TestClient(create_app(pipe)) as c:
        r = c.post("/v1/segment", json={"image": data_url(synthetic_image(0)), "labels": "cat"})
    assert r.status_code == 501 and "mask codec" in r.json()["error"]["message"]
    assert scripted.calls == []  # refused before it reached the model


# ---- bad requests ------------------------------------------------------------------------------------


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb's first bytes."""
    data = png(synthetic_image(0, size=(4, 4)))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(live, client):
    url, _ = live
    good = data_url(synthetic_image(0))
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    caption = chat_body(good, "caption en")
    as_json = AUTH | {"Content-Type": "application/json"}
    cases = [  # (what, status, message fragment, request kwargs)
        ("no key", 401, "missing API key", dict(json=caption, headers={"Authorization": ""})),
        ("wrong key", 401, "invalid API key", dict(json=caption, headers={"Authorization": "Bearer nope"})),
        ("corrupt image", 400, "not a readable image", dict(json=chat_body(b64(b"junk"), "caption en"))),
        ("truncated png", 400, "not a readable image", dict(json={"image": b64(png(synthetic_image(0))[:60])},
                                                            path="/v1/ocr")),
        ("too many pixels", 413, "over this server's limit",
         dict(json=chat_body(data_url(Image.new("RGB", (1500, 1000), "white")), "caption en"))),
        ("decompression bomb", 413, "", dict(json={"image": b64(huge_png_header(100_000, 100_000))},
                                             path="/v1/ocr")),
        ("unknown task", 400, "unknown task prefix", dict(json=chat_body(good, "translate this please"))),
        ("newline in prompt", 400, "newline", dict(json=chat_body(good, "caption en\nanswer"))),
        ("bad language", 400, "language", dict(json={"image": good, "lang": "xx"}, path="/v1/caption")),
        ("oversize body", 413, "request body", dict(content=b"x" * 1_500_000, headers=as_json)),
        ("oversize chunked body", 413, "request body", dict(content=iter([b"{" + b" " * 600_000] * 2),
                                                            headers=as_json)),
        ("server path", 400, "disabled", dict(json=chat_body("/etc/passwd", "caption en"))),
        ("file url", 400, "disabled", dict(json=chat_body("file:///etc/hostname", "caption en"))),
        ("http url", 400, "disabled", dict(json=chat_body("http://127.0.0.1:9/cat.png", "caption en"))),
        ("relative path", 400, "disabled", dict(json={"image": "cat.jpg"}, path="/v1/ocr")),
        ("not json", 400, "JSON", dict(content=b"{nope", headers=as_json)),
        ("no image part", 400, "image_url", dict(json={"messages": [{"role": "user", "content": "ocr"}]})),
        ("no user message", 400, "user message", dict(json={"messages": [{"role": "system", "content": "x"}]})),
        ("no messages", 400, "messages", dict(json={"model": "tiny", "messages": []})),
        ("other model", 404, "does not exist", dict(json=chat_body(good, "caption en", model="llava"))),
        ("tools", 400, "tools is not supported", dict(json=chat_body(good, "caption en", tools=[
            {"type": "function", "function": {"name": "f"}}]))),
        ("response_format", 400, "response_format is not supported", dict(json=chat_body(
            good, "caption en", response_format={"type": "json_object"}))),
        ("top_logprobs alone", 400, "needs logprobs", dict(json=chat_body(good, "caption en", top_logprobs=2))),
        ("too many top_logprobs", 400, "top_logprobs", dict(json=chat_body(good, "caption en", logprobs=True,
                                                                         top_logprobs=21))),
        ("seed past 64 bits", 400, "seed", dict(json=chat_body(good, "caption en", temperature=1, seed=2**64))),
        ("negative seed past 64 bits", 400, "seed", dict(json={"image": good, "temperature": 1,
                                                              "seed": -(2**63) - 1}, path="/v1/caption")),
        ("unknown part", 400, "invalid request", dict(json={"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]})),
        ("n > 1", 400, "n", dict(json=chat_body(good, "caption en", n=2))),
        ("negative temperature", 400, "temperature", dict(json=chat_body(good, "caption", temperature=-1))),
        ("zero max_tokens", 400, "max_tokens", dict(json=chat_body(good, "caption en", max_tokens=0))),
        ("too many tokens", 400, "limit", dict(json=chat_body(good, "caption en", max_tokens=100_000))),
        ("no labels", 400, "label", dict(json={"image": good, "labels": []}, path="/v1/detect")),
        ("data url not base64", 400, "base64", dict(json={"image": "data:image/png,abc"}, path="/v1/ocr")),
        ("unknown route", 404, "Not Found", dict(json={}, path="/v1/nothing")),
        ("form body", 415, "Content-Type: application/json", dict(
            content=b"image=x", headers=AUTH | {"Content-Type": "application/x-www-form-urlencoded"}, path="/v1/ocr")),
        ("text body", 415, "'text/plain'", dict(
            content=json.dumps({"image": good}).encode(), headers=AUTH | {"Content-Type": "text/plain"},
            path="/v1/ocr")),
    ]
    for what, status, fragment, kw in cases:
        path = kw.pop("path", "/v1/chat/completions")
        r = client.post(path, **kw)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert fragment in err["message"] and err["type"], (what, err)
        assert not re.search(r"object at 0x|<[\w.]+ object", err["message"]), (what, err)  # no Python reprs
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/chat/completions", json=chat_body(good, "caption en", max_tokens=2))
    assert r.status_code == 200
    metrics = client.get("/metrics").text
    for status in (400, 401, 413):
        assert f'endpoint="/v1/chat/completions",status="{status}"' in metrics


def test_local_paths_and_urls_when_enabled(pipe, tmp_path):
    inside = tmp_path / "ok" / "img.png"
    inside.parent.mkdir()
    inside.write_bytes(png(synthetic_image(0)))
    (tmp_path / "secret.png").write_bytes(png(synthetic_image(1)))
    with TestClient(create_app(pipe, allow_local_paths=inside.parent)) as c:
        ocr = lambda image: c.post("/v1/ocr", json={"image": image, "max_new_tokens": 2})  # noqa: E731
        assert ocr(str(inside)).status_code == 200
        assert ocr(f"file://{inside}").status_code == 200
        r = ocr(str(inside.parent / ".." / "secret.png"))
        assert r.status_code == 400 and "outside the allowed folder" in r.json()["error"]["message"]
        assert ocr(str(inside.parent / "missing.png")).status_code == 400
        assert ocr("img.png").status_code == 200  # relative: inside the allowed folder, whatever the cwd
        r = ocr("../secret.png")
        assert r.status_code == 400 and "outside the allowed folder" in r.json()["error"]["message"]
        assert "disabled" in ocr("https://example.com/x.png").json()["error"]["message"]
    with TestClient(create_app(pipe, allow_private_urls=True, allow_urls=True)) as c:  # nothing on port 9
        r = c.post("/v1/ocr", json={"image": "http://127.0.0.1:9/x.png"})
        assert r.status_code == 400 and "could not fetch" in r.json()["error"]["message"]


def test_urls_to_the_servers_own_network_are_refused(pipe, monkeypatch):
    """--allow-urls fetches public addresses only: loopback, private, link-local (cloud metadata)
    and unique-local IPv6 hosts are refused before any connection, unless --allow-private-urls; an
    image served on loopback is then fetched."""
    import http.server

    body = png(synthetic_image(0))

    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_port}/x.png"
    named = {"metadata.test": "169.254.169.254", "router.test": "192.168.1.1", "ula.test": "fd00::1"}
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: [(0, 0, 0, "", (named[host], 0))]
                        if host in named else real(host, *a, **kw))
    try:
        with TestClient(create_app(pipe, allow_urls=True)) as c:
            for url in [local, "http://localhost:1/x.png", "http://10.1.2.3/x.png", "http://[::1]/x.png",
                        *(f"http://{host}/x.png" for host in named)]:
                r = c.post("/v1/ocr", json={"image": url, "max_new_tokens": 2})
                assert r.status_code == 400 and "non-public address" in r.json()["error"]["message"], url
        with TestClient(create_app(pipe, allow_urls=True, allow_private_urls=True)) as c:
            assert c.post("/v1/ocr", json={"image": local, "max_new_tokens": 2}).status_code == 200
    finally:
        server.shutdown()


def test_unpadded_base64_is_accepted(client):
    data = next(d for d in (png(synthetic_image(i)) for i in range(9)) if len(d) % 3)  # needs padding
    encoded = base64.b64encode(data).decode().rstrip("=")
    assert len(encoded) % 4
    for image in (encoded, "data:image/png;base64," + encoded):
        assert client.post("/v1/ocr", json={"image": image, "max_new_tokens": 2}).status_code == 200


def test_client_disconnect_mid_stream(pipe, monkeypatch):
    """A client that hangs up mid-stream frees the model: generation stops at the next step. The
    model is held inside its 4th decoding step until the server has closed the stream, so the count
    of generated tokens is exact. Catches a stream that keeps generating for a gone client (the
    engine must free its row)."""
    app = create_app(pipe, api_key=KEY)
    server = app.state.palikit
    reached, gate, closed, finished = (threading.Event() for _ in range(4))
    decode, sse, batch = pipe.decode_step, server.sse, server.metrics.batch
    calls = []

    def held_decode(*args, **kwargs):
        if len(calls) == 3:
            reached.set()
            assert gate.wait(60)
        calls.append(1)
        return decode(*args, **kwargs)

    # Starlette notices the hang-up through its disconnect listener (uvicorn's ASGI spec 2.3).
    async def watched_sse(*args, **kwargs):  # closed once the server has let go of the stream
        events = sse(*args, **kwargs)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # its own cleanup marks the request cancelled
            closed.set()

    def watched_batch(rows, tokens, seconds):
        batch(rows, tokens, seconds)
        if tokens == 0:  # the engine's step that finds the request cancelled makes no token
            finished.set()

    monkeypatch.setattr(pipe, "decode_step", held_decode)
    monkeypatch.setattr(server, "sse", watched_sse)
    monkeypatch.setattr(server.metrics, "batch", watched_batch)
    body = chat_body(data_url(synthetic_image(5)), "describe en", max_tokens=400, stream=True)
    with background(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            chunks = r.iter_bytes()
            next(chunks)  # the first chunk; hang up once the model is inside its 4th step
            assert reached.wait(30)
        assert closed.wait(30)
        gate.set()
        assert finished.wait(30)
        # The prefill's token and the three decoded before the client left; the token of the step
        # that was running is dropped with the row.
        assert server.metrics.tokens == 4
        assert server.batcher.engine.running == 0 and len(calls) == 4
        monkeypatch.undo()
        body = chat_body(data_url(synthetic_image(0)), "caption en", max_tokens=3)
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


# ---- overload and timeouts ---------------------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after(pipe, monkeypatch):
    """One request runs (held), one waits in the queue of one: the next three get 503 at once."""
    scripted = Scripted(pipe, {"caption": "a cat"}, monkeypatch, gate_open=False)
    app = create_app(pipe, max_queue=1, max_batch=1)
    body = {"image": data_url(synthetic_image(0))}

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            running = asyncio.ensure_future(c.post("/v1/caption", json=body))
            assert await asyncio.to_thread(scripted.entered.wait, 30)
            queued = when_queued(app, 1)
            waiting = asyncio.ensure_future(c.post("/v1/caption", json=body))
            assert await asyncio.to_thread(queued.wait, 30)
            refused = await asyncio.gather(*[c.post("/v1/caption", json=body) for _ in range(3)])
            scripted.gate.set()
            return [await running, await waiting], refused

    with background(app) as url:
        served, refused = asyncio.run(fire(url))
        assert [r.status_code for r in served] == [200, 200] and [r.status_code for r in refused] == [503] * 3
        for r in refused:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "server_busy"
        assert httpx.post(url + "/v1/caption", json=body, timeout=30).status_code == 200


def test_slow_request_body_is_408(live, client, monkeypatch):
    """Half a body, then nothing: the server answers 408 on its own after BODY_TIMEOUT_S."""
    from palikit.serve import guard

    monkeypatch.setattr(guard, "BODY_TIMEOUT_S", 0.3)
    host, port = httpx.URL(live[0]).host, httpx.URL(live[0]).port
    with socket.create_connection((host, port), timeout=30) as sock:
        head = (f"POST /v1/ocr HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        sock.sendall(head.encode() + b'{"image": "')  # and never the rest
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, f"the server closed without an answer: {reply!r}"
            reply += chunk
    status = reply.split(b"\r\n", 1)[0]
    assert status.split()[1] == b"408", status
    assert b'"type":"timeout"' in reply.replace(b" ", b"")
    monkeypatch.undo()
    assert client.get("/health").status_code == 200


def test_request_timeout_is_504(pipe, monkeypatch):
    """The model holds a request past request_timeout_s: 504; once it finishes, the server is fine."""
    scripted = Scripted(pipe, {"caption": "a cat"}, monkeypatch, gate_open=False)
    app = create_app(pipe, request_timeout_s=0.2)
    server = app.state.palikit
    submit = server.batcher.submit

    def submit_until_running(job):  # the model takes the request before its deadline can pass
        submit(job)
        assert scripted.entered.wait(30)

    server.batcher.submit = submit_until_running
    with TestClient(app) as c:
        r = c.post("/v1/caption", json={"image": data_url(synthetic_image(0))})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        scripted.gate.set()
        assert scripted.exited.wait(30)  # the abandoned call finishes
        server.request_timeout_s = 300
        r = c.post("/v1/caption", json={"image": data_url(synthetic_image(0))})
        assert r.status_code == 200 and r.json()["text"] == "a cat"


def test_a_failing_request_does_not_fail_its_batch(pipe, monkeypatch):
    """Three requests queued behind a busy model are decoded in one step; the one whose generation
    fails gets 500 and the other two their answers."""
    # "ocr" has no answer: its request fails (KeyError).
    scripted = Scripted(pipe, {"caption": "a cat", "answer": "yes"}, monkeypatch, gate_open=False)
    app = create_app(pipe)
    with TestClient(app) as c:
        async def fire():
            transport = httpx.ASGITransport(app=c.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
                img = data_url(synthetic_image(0))
                blocker = asyncio.ensure_future(ac.post("/v1/ask", json={"image": img, "question": "ok?"}))
                assert await asyncio.to_thread(scripted.entered.wait, 30)
                queued = when_queued(c.app, 3)
                tasks = [asyncio.ensure_future(ac.post(f"/v1/{task}", json={"image": img}))
                         for task in ("caption", "ocr", "caption")]
                assert await asyncio.to_thread(queued.wait, 30)
                scripted.gate.set()
                await blocker
                return await asyncio.gather(*tasks)
        ok1, bad, ok2 = c.portal.call(fire)
    for ok in (ok1, ok2):
        assert ok.status_code == 200 and ok.json()["text"] == "a cat"
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    # They joined the blocker's rows together: the step after the gate opened decoded all four.
    assert sorted(scripted.steps[1]) == ["answer en ok?", "caption en", "caption en", "ocr"]


# ---- schema, metrics, demo page ------------------------------------------------------------------------


def test_openapi_metrics_and_demo_page(live):
    url, _ = live
    schema = httpx.get(url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/models", "/v1/caption", "/v1/ask", "/v1/ocr", "/v1/detect",
                 "/v1/segment", "/v1/predict", "/health", "/metrics"):
        assert path in schema["paths"], path
    assert {"ChatRequest", "ChatCompletion", "DetectRequest", "TaskResponse", "ErrorResponse"} <= set(
        schema["components"]["schemas"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    metrics = httpx.get(url + "/metrics").text
    for name in ("palikit_requests_total{", "palikit_request_duration_seconds_bucket{",
                 "palikit_queue_depth ", "palikit_generated_tokens_per_second ",
                 "palikit_generated_tokens_total ", "palikit_batch_size_bucket{"):
        assert name in metrics, name
    health = httpx.get(url + "/health").json()
    assert health["auth"] is True and health["model"] == "tiny"
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert httpx.get(url + "/static/app.js").status_code == 200


def test_default_budgets_are_the_tasks_everywhere(pipe, monkeypatch, capsys):
    """No max_new_tokens given: every entry point takes the prompt's task's budget, which grows with
    the labels of detect / segment (a two-label segmentation gets room for several objects of each,
    not 64 tokens that cut the third object mid-codes), and --help says it."""
    from palikit import tasks
    from palikit.api import Pipeline
    from palikit.cli import main

    one_object = 4 + 16 + 4  # four <loc>, sixteen <seg>, a label and " ; "
    assert tasks.default_budget("segment cat ; dog") == 256 >= 2 * 4 * one_object
    assert tasks.default_budget("detect a ; b ; c") == 256 and tasks.default_budget("caption en") == 64
    assert tasks.default_budget("segment " + " ; ".join("abcdefgh")) == tasks.MAX_DEFAULT_BUDGET
    assert tasks.default_budget("what is this") == tasks.FREE_PROMPT_BUDGET
    asked = []
    real = Pipeline.generate_details

    def generate_details(self, images, prompts, **kw):
        asked.append(kw["max_new_tokens"])
        return real(self, images, prompts, **kw | {"max_new_tokens": 2})

    monkeypatch.setattr(Pipeline, "generate_details", generate_details)
    image = synthetic_image(0)
    pipe.detect(image, ["cat", "dog"])
    assert asked == [192]
    with TestClient(create_app(pipe)) as c:
        server, submitted = c.app.state.palikit, []
        submit = server.submit

        def spy(images, size, prompt, max_new_tokens, *args, **kwargs):
            submitted.append(max_new_tokens)
            return submit(images, size, prompt, 2, *args, **kwargs)

        monkeypatch.setattr(server, "submit", spy)
        for path, body in [("/v1/predict", {"prompt": "segment cat ; dog"}), ("/v1/detect", {"labels": ["a", "b", "c"]})]:
            assert c.post(path, json={"image": data_url(image)} | body).status_code == 200
        assert c.post("/v1/chat/completions", json=chat_body(data_url(image), "caption en")).status_code == 200
    assert submitted == [256, 256, 64]
    assert main(["segment", "--help"]) == 0
    assert "+128 per label after the first" in " ".join(capsys.readouterr().out.split())
