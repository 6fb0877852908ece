"""HTTP server: OpenAI-compatible chat completions, native task endpoints, request batching, a web demo.

    palikit serve --model google/paligemma2-3b-mix-224 [--host 127.0.0.1] [--port 8000] [--api-key KEY]

or from Python: `create_app(palikit.load(...))` gives a FastAPI app; `serve(...)` runs it with uvicorn.

Endpoints (request and response schemas at /docs and /openapi.json):

    POST /v1/chat/completions   OpenAI's vision schema; the `openai` client works unchanged. The LAST user
                                message is the request: its text parts, joined by spaces, are the PaliGemma
                                prefix ("caption en", "detect cat ; dog"), with no chat template; its
                                image_url parts are the images. Earlier messages are ignored. max_tokens /
                                max_completion_tokens, temperature (omitted or 0: greedy), top_p, seed,
                                stream (SSE chunks, then `data: [DONE]`), stream_options.include_usage.
    POST /v1/caption, /v1/ask, /v1/ocr, /v1/detect, /v1/segment, /v1/predict
                                native, JSON in and out: {"image": "<base64 or data: URL>", ...task fields}
                                -> {"task", "prompt", "text", "width", "height", "objects", ...}; objects have
                                pixel boxes [x1, y1, x2, y2], a score (mean token log-prob) and, for
                                segment, a COCO RLE mask of the whole image. /v1/predict takes any prompt.
    GET  /v1/models, /health, /metrics (Prometheus text), /docs, / (the web demo)

Batching: requests wait in one bounded queue (full: 503 + Retry-After). A single model thread takes the
oldest request plus every queued request with the same sampling settings (greedy requests all batch
together; a seeded request runs alone so its seed reproduces), waiting up to batch_wait_ms for more, up to
max_batch, and makes one generate_details call for the batch (prompts and lengths may differ; the batch
generates up to its longest max_tokens and each answer is cut to its own). Streaming requests run alone,
in queue order, through the same thread, token by token. The event loop never runs the model.

Safety: binds 127.0.0.1 unless told otherwise; optional API key (`Authorization: Bearer KEY`) on /v1/*;
request bodies over max_body_bytes get 413 and images over max_image_pixels 413 before decoding;
server-side file paths and URL fetching are refused (400) unless enabled; a body must arrive within
BODY_TIMEOUT_S (408) and an answer within request_timeout_s (504). Errors are JSON,
{"error": {"message": ..., "type": ...}}, and never stop the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import generate as gen
from . import tasks
from .api import Pipeline
from .processor import _RESAMPLE, InputError, encode_example, load_image

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout", 413: "request_too_large", 500: "server_error",
               501: "not_implemented", 503: "server_busy", 504: "timeout"}
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BODY_TIMEOUT_S = 60  # a request body must arrive within this (slow-upload clients hold connections)

# ----------------------------------------------------------------------------- request / response schemas


class ErrorBody(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Sampling(BaseModel):
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy; > 0: sample at this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (only when temperature > 0)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens, 0 = off (only when sampling)")
    seed: int | None = Field(None, description="reproducible sampling (the request then runs unbatched)")


class ImageRequest(Sampling):
    image: str = Field(description="the image as base64 or a data: URL (data:image/png;base64,...); an "
                                   "http(s) URL or a server-side path only where the operator enabled them")


class CaptionRequest(ImageRequest):
    lang: str = Field("en", description="language code, e.g. en, fr, de")
    style: tasks.CaptionStyle = Field("caption", description="cap: alt text, caption: short, describe: long")
    max_new_tokens: int = Field(64, ge=1)


class AskRequest(ImageRequest):
    question: str
    lang: str = "en"
    max_new_tokens: int = Field(32, ge=1)


class OcrRequest(ImageRequest):
    max_new_tokens: int = Field(128, ge=1)


class DetectRequest(ImageRequest):
    labels: list[str] | str = Field(description='object names, e.g. ["cat", "dog"]')
    max_new_tokens: int = Field(128, ge=1)


class SegmentRequest(DetectRequest):
    pass


class PredictRequest(ImageRequest):
    prompt: str = Field(description='a PaliGemma prefix, e.g. "caption en" or "detect cat ; dog"')
    max_new_tokens: int = Field(64, ge=1)


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE, as pycocotools' mask.encode")


class DetectedObject(BaseModel):
    label: str
    box: list[float] = Field(description="pixels of the input image: x1, y1, x2, y2")
    score: float | None = Field(None, description="mean log-prob of the object's tokens")
    codes: list[int] | None = Field(None, description="segment only: the 16 mask codes")
    mask: RLE | None = Field(None, description="segment only: the mask over the whole image")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TaskResponse(BaseModel):
    task: str
    prompt: str
    text: str = Field(description="the model's raw output")
    width: int
    height: int
    objects: list[DetectedObject] | None = Field(None, description="detect / segment only")
    finish_reason: Literal["stop", "length"]
    usage: Usage


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str | None = Field(None, description="ignored: the server serves one model")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="takes precedence over max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="omitted or 0: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "palikit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Counters for /metrics, in Prometheus' text format (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> n
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum, count]
        self.batch_sizes: Counter = Counter()
        self.tokens = 0
        self.busy_s = 0.0
        self.recent: deque = deque()  # (end time, tokens, seconds) of the last minute's batches
        self.in_flight = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            h = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
            for i, b in enumerate(LATENCY_BUCKETS):
                h[i] += seconds <= b
            h[-2] += seconds
            h[-1] += 1

    def batch(self, size: int, tokens: int, seconds: float) -> None:
        with self.lock:
            self.batch_sizes[size] += 1
            self.tokens += tokens
            self.busy_s += seconds
            now = time.monotonic()
            self.recent.append((now, tokens, seconds))
            while self.recent[0][0] < now - 60:
                self.recent.popleft()

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes, default=0)

    def render(self, queue_depth: int) -> str:
        with self.lock:
            busy = sum(s for _, _, s in self.recent)
            rate = sum(t for _, t, _ in self.recent) / busy if busy else 0.0
            out = ["# HELP palikit_requests_total HTTP requests by endpoint and status.",
                   "# TYPE palikit_requests_total counter"]
            out += [f'palikit_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP palikit_request_duration_seconds Time from request to the end of the response.",
                    "# TYPE palikit_request_duration_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += [f'palikit_request_duration_seconds_bucket{{endpoint="{e}",le="{b}"}} {c}'
                        for b, c in zip(LATENCY_BUCKETS, h)]
                out += [f'palikit_request_duration_seconds_bucket{{endpoint="{e}",le="+Inf"}} {h[-1]}',
                        f'palikit_request_duration_seconds_sum{{endpoint="{e}"}} {h[-2]:.6f}',
                        f'palikit_request_duration_seconds_count{{endpoint="{e}"}} {h[-1]}']
            out += ["# HELP palikit_batch_size Requests per model call.",
                    "# TYPE palikit_batch_size histogram"]
            for b in BATCH_BUCKETS:
                out.append(f'palikit_batch_size_bucket{{le="{b}"}} '
                           f'{sum(n for size, n in self.batch_sizes.items() if size <= b)}')
            n_batches = sum(self.batch_sizes.values())
            out += [f'palikit_batch_size_bucket{{le="+Inf"}} {n_batches}',
                    f"palikit_batch_size_sum {sum(s * n for s, n in self.batch_sizes.items())}",
                    f"palikit_batch_size_count {n_batches}"]
            gauges = [("queue_depth", "Requests waiting for the model.", queue_depth),
                      ("requests_in_flight", "HTTP requests being handled.", self.in_flight),
                      ("batch_size_max", "Largest batch so far.", self.max_batch_size),
                      ("generated_tokens_per_second", "Tokens per second of model time, last minute.", rate)]
            counters = [("generated_tokens_total", "Tokens generated.", self.tokens),
                        ("model_busy_seconds_total", "Seconds the model spent generating.", self.busy_s)]
            for kind, rows in (("gauge", gauges), ("counter", counters)):
                for name, help_text, value in rows:
                    shown = f"{value:.6g}" if isinstance(value, float) else value
                    out += [f"# HELP palikit_{name} {help_text}", f"# TYPE palikit_{name} {kind}",
                            f"palikit_{name} {shown}"]
            return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- the model thread


@dataclass
class _Size:
    """What parsing and mask pasting need of an image: its size (the queue holds only resized copies)."""

    width: int
    height: int


@dataclass(eq=False)
class _Job:
    images: list[Image.Image]
    size: _Size  # of the first image, as sent: boxes are in its pixels
    prompt: str
    max_new_tokens: int
    sampling: dict
    parse: str | None  # "detect" / "segment": also return the parsed objects
    stream: bool
    deadline: float  # time.monotonic()
    out: asyncio.Queue  # ("delta", str) while streaming, then ("done", dict) or ("error", exception)
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False  # set by the handler when it gives up: timeout or client gone
    key: tuple = field(init=False)

    def __post_init__(self):
        # Jobs batch together only with equal sampling; a seeded job alone, so its seed reproduces.
        seeded = self.sampling.get("seed") is not None
        self.key = ("stream", id(self)) if self.stream or seeded else tuple(sorted(self.sampling.items()))

    def deliver(self, kind: str, payload) -> None:  # called from the model thread
        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, payload))


class Batcher:
    """A bounded queue in front of one model thread that runs the queued jobs in batches."""

    def __init__(self, pipe, metrics: Metrics, max_batch: int, batch_wait_s: float, max_queue: int):
        self.pipe, self.metrics = pipe, metrics
        self.max_batch, self.batch_wait_s, self.max_queue = max_batch, batch_wait_s, max_queue
        self.waiting: deque[_Job] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="palikit-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=30)
        for job in self.waiting:
            job.deliver("error", HTTPException(503, "the server is shutting down"))

    @property
    def depth(self) -> int:
        return len(self.waiting)

    def submit(self, job: _Job) -> None:
        with self.cond:
            if self.closed:
                raise HTTPException(503, "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise HTTPException(503, f"server busy: {len(self.waiting)} requests queued; retry shortly",
                                    headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.cond.notify()

    def _next(self) -> list[_Job] | None:
        """Wait for work; -> the oldest job and up to max_batch - 1 compatible ones, or None at shutdown."""
        with self.cond:
            while True:
                self.waiting = deque(j for j in self.waiting if not j.cancelled)
                if self.closed:
                    return None
                if self.waiting:
                    break
                self.cond.wait()
            key = self.waiting[0].key
            deadline = time.monotonic() + self.batch_wait_s
            while True:
                batch = [j for j in self.waiting if j.key == key and not j.cancelled][: self.max_batch]
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self.waiting[0].stream or self.closed:
                    break
                self.cond.wait(left)
            for j in batch:
                self.waiting.remove(j)
            return batch

    def _loop(self) -> None:
        while (batch := self._next()) is not None:
            if not batch:  # all cancelled while waiting
                continue
            start = time.perf_counter()
            try:
                tokens = self._stream(batch[0]) if batch[0].stream else self._generate(batch)
            except Exception as e:  # never kill the thread: answer the jobs with the error
                log.exception("generation failed")
                for job in batch:
                    job.deliver("error", e)
                continue
            self.metrics.batch(len(batch), tokens, time.perf_counter() - start)

    def _generate(self, jobs: list[_Job]) -> int:
        try:
            outs = self.pipe.generate_details([j.images for j in jobs], [j.prompt for j in jobs],
                                              max_new_tokens=max(j.max_new_tokens for j in jobs),
                                              batch_size=len(jobs), **jobs[0].sampling)
        except Exception:
            if len(jobs) == 1:
                raise
            tokens = 0
            for job in jobs:  # one bad request must not fail the others: run each alone
                try:
                    tokens += 0 if job.cancelled else self._generate([job])
                except Exception as e:
                    log.exception("generation failed")
                    job.deliver("error", e)
            return tokens
        tokens = 0
        for job, (text, g) in zip(jobs, outs):
            try:
                result = self._result(job, text, g)
                tokens += result["completion_tokens"]
                job.deliver("done", result)
            except Exception as e:
                log.exception("post-processing failed")
                job.deliver("error", e)
        return tokens

    def _result(self, job: _Job, text: str, g: gen.Generated) -> dict:
        tokens, logprobs = g.tokens[: job.max_new_tokens], g.logprobs[: job.max_new_tokens]
        if len(g.tokens) > job.max_new_tokens:  # the batch ran longer than this job asked for
            text = self.pipe.tokenizer.decode(tokens)
        out = {"text": text, "completion_tokens": len(tokens),
               "finish_reason": "length" if len(tokens) >= job.max_new_tokens else "stop"}
        if job.parse:
            objects = self.pipe.objects(job.parse, text, gen.Generated(tokens, logprobs), job.size)
            out["objects"] = [o.to_dict() for o in objects]
        return out

    def _stream(self, job: _Job) -> int:
        """Generate one job token by token, sending each new piece of text as it is complete."""
        tok = self.pipe.tokenizer
        tokens, sent = [], ""
        for token in _token_stream(self.pipe, job):
            tokens.append(token)
            text = tok.decode(tokens)
            if not text.endswith("\ufffd") and len(text) > len(sent):  # hold back half a UTF-8 character
                job.deliver("delta", text[len(sent):])
                sent = text
        text = tok.decode(tokens)
        if len(text) > len(sent):
            job.deliver("delta", text[len(sent):])
        job.deliver("done", {"text": text, "completion_tokens": len(tokens),
                             "finish_reason": "length" if len(tokens) >= job.max_new_tokens else "stop"})
        return len(tokens)


def _token_stream(pipe, job: _Job):
    """Token ids of one generation as they are made; stops early once the job is cancelled.

    generate.steps for a batch of one, a yield per token. Other pipes
    (adapters with only generate_details) generate in one go and then yield their tokens.
    """
    if not isinstance(pipe, Pipeline):
        _, g = pipe.generate_details([job.images], [job.prompt], max_new_tokens=job.max_new_tokens,
                                     batch_size=1, **job.sampling)[0]
        yield from g.tokens[: job.max_new_tokens]
        return
    cfg = gen.SamplingConfig(max_new_tokens=job.max_new_tokens, **job.sampling)
    tok = pipe.tokenizer
    ids = encode_example(tok, pipe.config.num_image_tokens * len(job.images), job.prompt).ids
    for token, _ in gen.steps(pipe.model, [ids], pipe._image_tokens([job.images]), cfg, tok.eos_id, tok.pad_id):
        if int(token) == tok.eos_id:
            return
        yield int(token)
        if job.cancelled:
            return


# ----------------------------------------------------------------------------- request handling


def _sampling(temperature: float | None, top_p: float | None, top_k: int = 0, seed: int | None = None
              ) -> dict:
    """generate_details' sampling arguments: greedy unless a temperature > 0 is given."""
    if not temperature:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p or 1.0, "top_k": top_k,
            "seed": seed}


def _bad_request(fn, *args):
    """Call a prompt builder; its ValueError (bad language, empty label...) is the client's error."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        raise HTTPException(400, str(e)) from None


def _as_http(e: Exception) -> HTTPException:
    if isinstance(e, HTTPException):
        return e
    if isinstance(e, ValueError):  # InputError, SamplingConfig: what the request asked for is invalid
        return HTTPException(400, str(e))
    return HTTPException(500, f"internal error ({type(e).__name__}); see the server log")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error")}}
    return JSONResponse(body, status_code=status, headers=headers)


class Server:
    """Settings, the batcher and the metrics of one app; the route handlers call into it."""

    def __init__(self, pipe, model_name: str, max_body_bytes: int, max_image_pixels: int, max_batch: int,
                 batch_wait_ms: float, max_queue: int, request_timeout_s: float,
                 allow_local_paths: bool | str | Path, allow_urls: bool, check_prompts: bool):
        self.pipe, self.model_name = pipe, model_name
        self.max_body_bytes, self.max_image_pixels = max_body_bytes, max_image_pixels
        self.request_timeout_s, self.check_prompts = request_timeout_s, check_prompts
        self.allow_local_paths, self.allow_urls = allow_local_paths, allow_urls
        self.metrics = Metrics()
        self.batcher = Batcher(pipe, self.metrics, max_batch, batch_wait_ms / 1000, max_queue)
        config = getattr(pipe, "config", None)
        # Images are resized to the model's input on arrival, so queued requests hold small images.
        self.input_size = config.vision.image_size if config is not None else None
        self.resample = _RESAMPLE[getattr(config, "resample", "bicubic")]
        self.can_mask = callable(getattr(pipe, "attach_masks", None)) and getattr(pipe, "codec_path", None)
        self.created = int(time.time())
        self.paths: set[str] = set()  # the app's routes, for the metrics labels

    # ---- images

    async def images(self, refs: list[str]) -> tuple[list[Image.Image], _Size]:
        if not refs:
            raise HTTPException(400, "no image: PaliGemma needs at least one image per request")
        images = []
        for ref in refs:
            data = await self._image_bytes(ref)
            images.append(await asyncio.to_thread(self._decode, data))  # decoding is slow: off the loop
        return [im for im, _ in images], images[0][1]

    async def _image_bytes(self, ref: str) -> bytes:
        ref = ref.strip()
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if not header.endswith(";base64"):
                raise HTTPException(400, "data URLs must be base64: data:image/png;base64,...")
            return _b64decode(payload)
        if ref.startswith(("http://", "https://")):
            if not self.allow_urls:
                raise HTTPException(400, "image URLs are disabled on this server: send the image as base64 "
                                         "or a data: URL (the operator can enable fetching with allow_urls)")
            return await asyncio.to_thread(self._fetch, ref)
        if not ref.startswith("file://"):
            with contextlib.suppress(HTTPException):
                return _b64decode(ref)
            if len(ref) > 4096:
                raise HTTPException(400, "image is neither valid base64 nor a data: URL")
        if not self.allow_local_paths:  # a short string that is not base64: a path
            raise HTTPException(400, f"image {ref[:80]!r} is not base64 or a data: URL, and reading "
                                     "server-side files is disabled on this server (allow_local_paths)")
        return await asyncio.to_thread(self._read_path, ref.removeprefix("file://"))

    def _read_path(self, name: str) -> bytes:
        path = Path(name).expanduser().resolve()
        if not isinstance(self.allow_local_paths, bool):
            root = Path(self.allow_local_paths).expanduser().resolve()
            if not path.is_relative_to(root):
                raise HTTPException(400, f"image path {name!r} is outside the allowed folder {root}")
        if not path.is_file():
            raise HTTPException(400, f"image file not found: {name}")
        if path.stat().st_size > self.max_body_bytes:
            raise HTTPException(413, f"image file {name} is larger than {self.max_body_bytes} bytes")
        return path.read_bytes()

    def _fetch(self, url: str) -> bytes:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (http/https checked above)
                data = r.read(self.max_body_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise HTTPException(400, f"could not fetch image {url[:200]}: {e}") from None
        if len(data) > self.max_body_bytes:
            raise HTTPException(413, f"image at {url[:200]} is larger than {self.max_body_bytes} bytes")
        return data

    def _decode(self, data: bytes) -> tuple[Image.Image, _Size]:
        try:  # the header alone gives the size: refuse decompression bombs before decoding
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise HTTPException(413, f"image refused: {e}") from None
        except (OSError, ValueError, SyntaxError):
            w = h = 0  # unreadable: load_image says why
        if w * h > self.max_image_pixels:
            raise HTTPException(413, f"image of {w}x{h} pixels is over this server's limit of "
                                     f"{self.max_image_pixels} pixels")
        try:
            image = load_image(data, self.max_image_pixels)
        except InputError as e:
            raise HTTPException(400, str(e)) from None
        size = _Size(image.width, image.height)  # after EXIF rotation, as boxes are reported
        if self.input_size:
            image = image.resize((self.input_size, self.input_size), self.resample)
        return image, size

    # ---- prompts and jobs

    def check(self, prompt: str, n_images: int, max_new_tokens: int) -> int:
        """Validate a prompt before it queues; -> its length in tokens (images included), 0 if unknown."""
        if self.check_prompts:
            _bad_request(tasks.parse_task, prompt)
        config, tok = getattr(self.pipe, "config", None), getattr(self.pipe, "tokenizer", None)
        if config is None or not hasattr(tok, "encode"):
            return 0
        try:
            n = len(encode_example(tok, config.num_image_tokens * n_images, prompt).ids)
        except InputError as e:
            raise HTTPException(400, str(e)) from None
        limit = config.text.max_position_embeddings
        if n + max_new_tokens > limit:
            raise HTTPException(400, f"{n} prompt tokens (images included) + {max_new_tokens} new tokens is "
                                     f"more than the model's limit of {limit}")
        return n

    def submit(self, images, size, prompt, max_new_tokens, sampling, parse=None, stream=False) -> _Job:
        if parse == "segment" and not self.can_mask:
            raise HTTPException(501, "segmentation masks are not available: this server has no mask codec "
                                     "(mask_codec.npz / vae-oid.npz beside the model)")
        loop = asyncio.get_running_loop()
        job = _Job(images, size, prompt, max_new_tokens, sampling, parse, stream,
                   time.monotonic() + self.request_timeout_s, asyncio.Queue(), loop)
        self.batcher.submit(job)
        return job

    async def next_event(self, job: _Job) -> tuple[str, Any]:
        try:
            return await asyncio.wait_for(job.out.get(), max(0.0, job.deadline - time.monotonic()))
        except TimeoutError:
            job.cancelled = True
            raise HTTPException(504, f"no answer within {self.request_timeout_s:g} s; the server is busy "
                                     "or the request asks for too many tokens") from None

    async def result(self, job: _Job) -> dict:
        try:
            kind, payload = await self.next_event(job)
        finally:
            job.cancelled = True  # a no-op once answered; otherwise the model skips it
        if kind == "error":
            raise _as_http(payload)
        return payload

    async def sse(self, job: _Job, prompt_tokens: int, include_usage: bool):
        """OpenAI's chat.completion.chunk events, then `data: [DONE]`."""
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model_name}

        def event(body: dict) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def chunk(delta: dict, finish: str | None = None) -> str:
            return event(head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, payload = await self.next_event(job)
                except HTTPException as e:
                    kind, payload = "error", e
                if kind == "delta":
                    yield chunk({"content": payload})
                    continue
                if kind == "done":
                    yield chunk({}, payload["finish_reason"])
                    if include_usage:
                        n = payload["completion_tokens"]
                        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                 "total_tokens": prompt_tokens + n}
                        yield event(head | {"choices": [], "usage": usage})
                else:  # headers are sent already: the error travels as an event, as OpenAI's does
                    e = _as_http(payload)
                    yield event({"error": {"message": e.detail,
                                           "type": ERROR_TYPES.get(e.status_code, "error")}})
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client went away mid-stream: stop generating


def _b64decode(payload: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image is not valid base64") from None


def _last_user_message(req: ChatRequest) -> tuple[str, list[str]]:
    """-> (prompt, image references) of the last user message."""
    user = [m for m in req.messages if m.role == "user"]
    if not user:
        raise HTTPException(400, "messages need a user message with the image(s) and the PaliGemma prompt")
    content = user[-1].content or []
    if isinstance(content, str):
        content = [TextPart(type="text", text=content)]
    prompt = " ".join(p.text.strip() for p in content if isinstance(p, TextPart) and p.text.strip())
    refs = [p.image_url if isinstance(p.image_url, str) else p.image_url.url
            for p in content if isinstance(p, ImagePart)]
    if not prompt:
        raise HTTPException(400, 'the user message needs a text part with the PaliGemma prompt, '
                                 'e.g. "caption en"')
    if not refs:
        raise HTTPException(400, "the user message needs an image_url part: PaliGemma answers about images")
    return prompt, refs


# ----------------------------------------------------------------------------- the ASGI guard


class _Guard:
    """Outermost ASGI layer: request metrics, the body-size cap, the API key on /v1/*.

    Auth and the Content-Length check run before the body is read, so a refused request costs nothing.
    """

    def __init__(self, app, server: Server, api_key: str | None):
        self.app, self.server, self.api_key = app, server, api_key

    def _endpoint(self, scope) -> str:
        """The metrics label: a known route, or "other", so that scanners cannot grow the label set."""
        path = scope["path"]
        return path if path in self.server.paths else "/static" if path.startswith("/static/") else "other"

    def _refusal(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key.encode()):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
                return _error(401, msg, {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length and (not length.isdigit() or int(length) > self.server.max_body_bytes):
            return _error(413, f"request body over this server's limit of {self.server.max_body_bytes} bytes")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, metrics = time.perf_counter(), 500, self.server.metrics
        seen, cap, body_done = 0, self.server.max_body_bytes, False

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def capped_receive():  # the body's size (when sent chunked) and time to arrive
            nonlocal seen, body_done
            if body_done:  # later calls wait for a disconnect, as long as a stream lasts
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), start + BODY_TIMEOUT_S - time.perf_counter())
            except TimeoutError:
                raise HTTPException(408, f"the request body took over {BODY_TIMEOUT_S} s to arrive") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise HTTPException(413, f"request body over this server's limit of {cap} bytes")
                body_done = not message.get("more_body", False)
            return message

        metrics.in_flight += 1
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_status)
            else:
                await self.app(scope, capped_receive, send_status)
        finally:
            metrics.in_flight -= 1
            metrics.request(self._endpoint(scope), status, time.perf_counter() - start)


# ----------------------------------------------------------------------------- the app


def create_app(pipe, *, api_key: str | None = None, model_name: str = "palikit",
               max_body_bytes: int = 20 * 2**20, max_image_pixels: int = 25_000_000, max_batch: int = 8,
               batch_wait_ms: float = 5, max_queue: int = 64, request_timeout_s: float = 300,
               allow_local_paths: bool | str | Path = False, allow_urls: bool = False,
               check_prompts: bool = True) -> FastAPI:
    """The FastAPI app serving `pipe`: a palikit Pipeline, or any object with the same
    `generate_details(images, prompts, max_new_tokens=, batch_size=, **sampling)` and a `tokenizer` with
    `decode` / `decode_pieces` (e.g. an adapter around another library).

    allow_local_paths: True lets requests name any server-side file; a folder allows files inside it.
    check_prompts=False accepts prompts without a known task prefix (transfer checkpoints trained on
    free-form prefixes); by default they get 400.
    """
    server = Server(pipe, model_name, max_body_bytes, max_image_pixels, max_batch, batch_wait_ms, max_queue,
                    request_timeout_s, allow_local_paths, allow_urls, check_prompts)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        server.batcher.close()

    app = FastAPI(title="palikit", summary="PaliGemma served: OpenAI-compatible and native task endpoints",
                  description=(__doc__ or "").split("\n\n", 2)[-1], lifespan=lifespan)
    app.state.palikit = server
    app.add_middleware(_Guard, server=server, api_key=api_key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        errs = e.errors()
        if errs and errs[0]["type"] == "json_invalid":
            reason = errs[0].get("ctx", {}).get("error", "")
            return _error(400, f"the request body is not valid JSON ({reason})")
        where = [".".join(str(x) for x in err["loc"] if x != "body") or "body" for err in errs[:3]]
        parts = [f"{w}: {err['msg']}" for w, err in zip(where, errs)]
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error ({type(e).__name__}); see the server log")

    errors = {code: {"model": ErrorResponse} for code in (400, 401, 413, 503, 504)}
    auth = [Security(HTTPBearer(auto_error=False))] if api_key else []  # documents the key in the schema
    v1 = APIRouter(prefix="/v1", dependencies=auth, responses=errors)

    @v1.get("/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=server.model_name, created=server.created)])

    @v1.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "a chat.completion, or chat.completion.chunk events if stream"}})
    async def chat_completions(req: ChatRequest):
        prompt, refs = _last_user_message(req)
        max_new = req.max_completion_tokens or req.max_tokens or 128
        n_prompt = server.check(prompt, len(refs), max_new)  # cheap checks before decoding the images
        images, size = await server.images(refs)
        sampling = _sampling(req.temperature, req.top_p, seed=req.seed)
        job = server.submit(images, size, prompt, max_new, sampling, stream=req.stream)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(server.sse(job, n_prompt, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        r = await server.result(job)
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=r["completion_tokens"],
                      total_tokens=n_prompt + r["completion_tokens"])
        choice = Choice(message=ChatMessageOut(content=r["text"]), finish_reason=r["finish_reason"])
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                              model=server.model_name, choices=[choice], usage=usage)

    async def run_task(req: ImageRequest, prompt: str, max_new: int) -> TaskResponse:
        n_prompt = server.check(prompt, 1, max_new)  # 400 for an unknown task unless check_prompts=False
        images, size = await server.images([req.image])
        task = _task_or_none(prompt)
        parse = task if task in ("detect", "segment") else None
        job = server.submit(images, size, prompt, max_new,
                            _sampling(req.temperature, req.top_p, req.top_k, req.seed), parse)
        r = await server.result(job)
        return TaskResponse(task=task or "free", prompt=prompt, text=r["text"], width=size.width,
                            height=size.height, objects=r.get("objects"), finish_reason=r["finish_reason"],
                            usage=Usage(prompt_tokens=n_prompt, completion_tokens=r["completion_tokens"],
                                        total_tokens=n_prompt + r["completion_tokens"]))

    @v1.post("/caption", response_model=TaskResponse)
    async def caption(req: CaptionRequest):
        prompt = _bad_request(tasks.caption_prompt, req.lang, req.style)
        return await run_task(req, prompt, req.max_new_tokens)

    @v1.post("/ask", response_model=TaskResponse)
    async def ask(req: AskRequest):
        return await run_task(req, _bad_request(tasks.ask_prompt, req.question, req.lang), req.max_new_tokens)

    @v1.post("/ocr", response_model=TaskResponse)
    async def ocr(req: OcrRequest):
        return await run_task(req, tasks.ocr_prompt(), req.max_new_tokens)

    @v1.post("/detect", response_model=TaskResponse)
    async def detect(req: DetectRequest):
        return await run_task(req, _bad_request(tasks.detect_prompt, req.labels), req.max_new_tokens)

    @v1.post("/segment", response_model=TaskResponse)
    async def segment(req: SegmentRequest):
        return await run_task(req, _bad_request(tasks.segment_prompt, req.labels), req.max_new_tokens)

    @v1.post("/predict", response_model=TaskResponse)
    async def predict(req: PredictRequest):
        return await run_task(req, req.prompt.strip(), req.max_new_tokens)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "auth": bool(api_key),
                "queue_depth": server.batcher.depth, "max_batch": server.batcher.max_batch}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return server.metrics.render(server.batcher.depth)

    @app.get("/", include_in_schema=False)
    async def demo():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    server.paths = {route.path for route in v1.routes} | {"/health", "/metrics", "/", "/docs",
                                                          "/openapi.json"}
    return app


def _task_or_none(prompt: str) -> str | None:
    try:
        return tasks.parse_task(prompt)
    except ValueError:
        return None


def serve(model: str = "default", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str = "bfloat16", device: str = "cpu", **options) -> None:
    """Load `model` and serve it with uvicorn until interrupted; options go to create_app."""
    import uvicorn

    import palikit

    pipe = palikit.load(model, dtype=dtype, device=device)
    name = Path(model).name if Path(model).exists() else str(model)  # a folder's name, not the server's paths
    app = create_app(pipe, api_key=api_key, model_name=options.pop("model_name", name), **options)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    uvicorn.run(app, host=host, port=port, timeout_keep_alive=5, log_level="info")


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` with uvicorn in a thread (tests, notebooks, benchmarks); yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # port 0: the OS picks a free one, with no race
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="palikit-uvicorn",
                              daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start; see the log above")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
