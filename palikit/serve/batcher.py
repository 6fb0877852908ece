"""What stands between the routes and the model: ContinuousBatcher (the default) hands every request
to palikit.engine, which decodes all running requests one token per step and admits newcomers
between steps; Batcher (scheduler="static") is the older scheme, kept for pipelines that are not
palikit's (benchmarks/bench_serve.py serves transformers through it) and as the benchmark's
baseline: one thread takes the oldest request and every queued one with the same sampling, runs
them as one batch to the longest answer, and answers each; streaming requests run alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import HTTPException
from PIL import Image

from .. import generate as gen
from ..api import PipelineProtocol
from ..engine import Engine, EngineBusy, cut_at_stop
from ..tasks import TaskSpec
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class ImageSize:
    """What parsing and mask pasting need of an image: its size (the queue holds only resized copies)."""

    width: int
    height: int


@dataclass(eq=False)
class Job:
    images: list[Image.Image]
    size: ImageSize  # of the first image, as sent: boxes are in its pixels
    prompt: str
    max_new_tokens: int
    sampling: dict
    parse: TaskSpec | None  # a task with objects (detect, segment): also return them, parsed
    stream: bool
    deadline: float  # time.monotonic()
    out: asyncio.Queue  # ("delta", str) while streaming, then ("done", dict) or ("error", exception)
    loop: asyncio.AbstractEventLoop
    stop: tuple[str, ...] = ()  # OpenAI's `stop`: the answer ends before the first of these
    cancelled: bool = False  # set by cancel(): the handler gave up (timeout or client gone)
    on_cancel: object = None  # what else cancel() calls (the engine request's cancel)
    sent: str = ""  # streamed text so far
    key: tuple = field(init=False)

    def __post_init__(self):
        # Jobs batch together only with equal sampling; a seeded job alone, so its seed reproduces.
        seeded = self.sampling.get("seed") is not None
        self.key = ("stream", id(self)) if self.stream or seeded else tuple(sorted(self.sampling.items()))

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    def deliver(self, kind: str, payload) -> None:  # called from the model thread
        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, payload))


class Batcher:
    """A bounded queue in front of one model thread that runs the queued jobs in batches."""

    def __init__(self, pipe: PipelineProtocol, metrics: Metrics, max_batch: int, batch_wait_s: float,
                 max_queue: int):
        self.pipe, self.metrics = pipe, metrics
        self.max_batch, self.batch_wait_s, self.max_queue = max_batch, batch_wait_s, max_queue
        self.waiting: deque[Job] = deque()
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

    def gauges(self) -> list:
        return []

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise HTTPException(503, "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise HTTPException(503, f"server busy: {len(self.waiting)} requests queued; retry shortly",
                                    headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.cond.notify()

    def _next(self) -> list[Job] | None:
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

    def _generate(self, jobs: list[Job]) -> int:
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

    def _result(self, job: Job, text: str, g: gen.Generated) -> dict:
        return answer(self.pipe, job, text, g)

    def _stream(self, job: Job) -> int:
        """Generate one job token by token, sending each new piece of text as it is complete."""
        tokens = []
        stream = self.pipe.stream(job.images, job.prompt, max_new_tokens=job.max_new_tokens, **job.sampling)
        with contextlib.closing(stream):  # closing it stops the generation
            for token in stream:
                tokens.append(token)
                stopped = send_delta(self.pipe, job, tokens)
                if job.cancelled or stopped:
                    break
        send_delta(self.pipe, job, tokens, final=True)
        job.deliver("done", answer(self.pipe, job, self.pipe.tokenizer.decode(tokens), gen.Generated(tokens)))
        return len(tokens)


def send_delta(pipe: PipelineProtocol, job: Job, tokens: list[int], final: bool = False) -> bool:
    """Stream the text the tokens add to what was sent, holding back half a UTF-8 character and
    what could be the start of a stop string; never a stop string or what follows it.
    -> whether the text has reached a stop string."""
    text, stopped = cut_at_stop(pipe.tokenizer.decode(tokens), job.stop)
    if not (final or stopped):
        if text.endswith("\ufffd"):
            return False
        text = text[: len(text) - max((len(s) - 1 for s in job.stop), default=0)]
    if len(text) > len(job.sent):
        job.deliver("delta", text[len(job.sent):])
        job.sent = text
    return stopped


def answer(pipe: PipelineProtocol, job: Job, text: str, g: gen.Generated) -> dict:
    """A job's result: text, token count, finish reason, and the parsed objects of a detect / segment job."""
    tokens, logprobs = g.tokens[: job.max_new_tokens], g.logprobs[: job.max_new_tokens]
    if len(g.tokens) > job.max_new_tokens:  # the batch ran longer than this job asked for
        text = pipe.tokenizer.decode(tokens)
    text, stopped = cut_at_stop(text, job.stop)
    out = {"text": text, "completion_tokens": len(tokens),
           "finish_reason": "length" if len(tokens) >= job.max_new_tokens and not stopped else "stop"}
    if job.parse:
        objects = pipe.parse_objects(job.parse, text, gen.Generated(tokens, logprobs), job.size)
        out["objects"] = [o.to_dict() for o in objects]
    return out


class ContinuousBatcher:
    """Every job a request of one palikit.engine.Engine (continuous batching, an image-encoding
    cache, per-request seeds); streaming jobs get a delta per token from the engine's thread."""

    def __init__(self, pipe: PipelineProtocol, metrics: Metrics, max_batch: int, max_queue: int, **engine_options):
        self.pipe, self.metrics = pipe, metrics
        self.engine = Engine(pipe, max_rows=max_batch, max_queue=max_queue, **engine_options)
        self.engine.on_step = lambda *step: self.metrics.batch(*step)  # rows, tokens and seconds of each step
        self.max_batch, self.max_queue = self.engine.max_rows, max_queue

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.close()

    @property
    def depth(self) -> int:
        return self.engine.depth

    def gauges(self) -> list[tuple[str, str, float]]:
        s = self.engine.stats()
        return [("running_rows", "Requests being decoded.", s["running_rows"]),
                ("kv_cache_rows", "Rows of the KV cache pool.", s["max_rows"]),
                ("kv_cache_bytes", "Bytes of the KV cache pool.", s["kv_cache_bytes"]),
                ("image_cache_hit_rate", "Images whose encoding came from the image cache.",
                 s["image_cache_hit_rate"]),
                ("image_cache_bytes", "Bytes held by the image cache.", s["image_cache_bytes"])]

    def submit(self, job: Job) -> None:
        def on_token(request, token):
            if job.stream:
                send_delta(self.pipe, job, request.tokens)

        def on_done(request):
            if request.finish_reason == "cancelled":
                return
            if request.error is not None:
                job.deliver("error", request.error)
                return
            if job.stream:
                send_delta(self.pipe, job, request.tokens, final=True)
            try:
                g = request.result()
                job.deliver("done", answer(self.pipe, job, self.pipe.tokenizer.decode(g.tokens), g))
            except Exception as e:
                log.exception("post-processing failed")
                job.deliver("error", e)

        cfg = gen.SamplingConfig(max_new_tokens=job.max_new_tokens, **job.sampling)
        try:
            request = self.engine.submit(job.images, job.prompt, cfg, on_token=on_token, on_done=on_done,
                                         stop=job.stop)
        except EngineBusy as e:
            raise HTTPException(503, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        job.on_cancel = request.cancel
