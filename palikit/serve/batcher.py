"""What stands between the routes and the model: every request becomes a request of one
palikit.engine.Engine, which decodes all running requests one token per step and admits newcomers
between steps; streaming requests get their text delta by delta from the engine's thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from fastapi import HTTPException
from PIL import Image

from .. import generate as gen
from ..engine import Engine, EngineBusy, cut_at_stop
from ..processor import InputError
from ..tasks import TaskSpec
from .images import ImageSize
from .prometheus import Metrics

log = logging.getLogger(__name__)


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
    logprobs: bool = False  # also answer each token's log-prob (and the top ones, sampling["top_logprobs"])
    adapter: str | None = None  # the LoRA adapter it runs on (None: the base model)
    model: str = ""  # the id the client asked for (the base's or the adapter's), for answers and metrics

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel()

    def deliver(self, kind: str, payload) -> None:  # called from the model thread
        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, payload))


def send_delta(pipe, job: Job, tokens: list[int], final: bool = False) -> bool:
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


def answer(pipe, job: Job, text: str, g: gen.Generated) -> dict:
    """A job's result: text, token count, finish reason, and the parsed objects of a detect / segment job."""
    tokens, logprobs = g.tokens, g.logprobs
    text, _ = cut_at_stop(text, job.stop)
    out = {"text": text, "completion_tokens": len(tokens), "finish_reason": g.finish_reason}
    if job.parse:
        objects = pipe.parse_objects(job.parse, text, gen.Generated(tokens, logprobs), job.size)
        out["objects"] = [o.to_dict() for o in objects]
    if job.logprobs:  # OpenAI's choice.logprobs: the answer's tokens, whose texts join to the answer
        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        tok, tops = pipe.tokenizer, g.top_logprobs or [[] for _ in tokens]
        out["logprobs"] = {"content": [entry(text, lp) | {"top_logprobs": [
            entry(text if t == token else tok.piece(t), v) for t, v in top]}
            for token, text, lp, top in zip(tokens, tok.decode_pieces(tokens), logprobs, tops)]}
    return out


class Batcher:
    """Every job a request of one palikit.engine.Engine (continuous batching, an image-encoding
    cache, per-request seeds); streaming jobs get a delta per token from the engine's thread."""

    def __init__(self, pipe, metrics: Metrics, max_batch: int, max_queue: int, **engine_options):
        self.pipe, self.metrics = pipe, metrics
        self.engine = Engine(pipe, max_rows=max_batch, max_queue=max_queue, **engine_options)
        self.engine.on_step = lambda *step: self.metrics.batch(*step)  # rows, tokens and seconds of each step
        self.max_batch, self.max_queue = self.engine.max_rows, max_queue

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.close()

    def check(self, n_prompt_tokens: int, max_new_tokens: int) -> None:
        """InputError when a request cannot fit one of the engine's rows."""
        self.engine.check(n_prompt_tokens, max_new_tokens)

    @property
    def max_len(self) -> int:
        """Slots of one request: image tokens, prompt and answer."""
        return self.engine.max_len

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
                self.metrics.answered(job.model, len(g.tokens))
                job.deliver("done", answer(self.pipe, job, self.pipe.tokenizer.decode(g.tokens), g))
            except Exception as e:
                log.exception("post-processing failed")
                job.deliver("error", e)

        cfg = gen.SamplingConfig(max_new_tokens=job.max_new_tokens, **job.sampling)
        try:
            request = self.engine.submit(job.images, job.prompt, cfg, on_token=on_token, on_done=on_done,
                                         stop=job.stop, adapter=job.adapter)
        except EngineBusy as e:
            raise HTTPException(503, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        except InputError as e:  # longer than the engine's rows (--max-len)
            raise HTTPException(400, str(e)) from None
        job.on_cancel = request.cancel
