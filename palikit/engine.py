"""Continuous batching: one engine runs every request of a server, a `palikit run` or an eval.

    engine = Engine(palikit.load("default"), max_rows=16)
    engine.start()                                   # a model thread; or call engine.step() yourself
    request = engine.submit(images, "caption en", gen.SamplingConfig(max_new_tokens=32))
    request.wait(); print(engine.pipe.tokenizer.decode(request.result().tokens))

Iteration-level scheduling (Orca, Yu et al., OSDI 2022; vLLM's scheduler): each step decodes one
token for every active row, newcomers join between steps and a row leaves the moment it is done,
its cache row reused by the next request. The KV cache is one preallocated pool of max_rows rows
of max_len slots; active rows are kept at the front of the pool (a leaving row's place is taken by
the last one), so a step runs the static decode step of palikit.generate on a view of the first n
rows: every row has its own slot and its own layout of block numbers, positions and valid slots.

Prefill is chunked by layers, not by tokens: the image + prefix of a PaliGemma prompt is one
bidirectional block (big_vision's prefix-LM), so the keys of its first token depend on its last and
no part of it can be computed before the whole prompt is seen; the layers of the decoder, though,
can run a few per step (generate.prefill_by_layer). One group of newcomers is prefilled at a time,
into the pool rows after the running ones, while those keep decoding a token per step; the prefill
budget bounds how long a step takes: newcomers are admitted up to `prefill_tokens` prompt tokens
(at least one request), and a group longer than that runs `prefill_tokens / its tokens` of the
layers per step (at least one), after its images are encoded.

Exactness: a row's tokens depend only on its own prompt and images, whatever it shares a step
with: every row has its own positions and masks, slots it has not written are masked by block
numbers (so what an earlier occupant left there is never read), and a seeded request samples from
its own generator. Greedy output equals Pipeline.generate run alone (tests/test_engine.py), to
float rounding: a step's matrix products take as many rows as requests are running, and MKL's
float32 GEMM of a few rows rounds differently from a GEMV or a GEMM of many (bfloat16 measured
the same here), so where two tokens tie to the last bits the choice can differ with the company.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from . import generate as gen
from .gemma import KVCache
from .processor import InputError, preprocess

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


class EngineBusy(Exception):
    """The queue is full: the caller should retry later (the server answers 503 + Retry-After)."""


class ImageCache:
    """SigLIP + projector outputs (N, D) of recent images, least recently used evicted first,
    keyed by a hash of the preprocessed pixels and bounded in bytes: "caption, then detect, then
    segment this photo" encodes it once.

    Only the image encoding is reused, never the KV cache of the image tokens: in PaliGemma's
    prefix-LM the image tokens attend to the text prefix after them (one bidirectional block), so
    their keys and values differ from one prompt to the next."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, model, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (I, 3, S, S) -> image tokens (I, N, D); images not cached are encoded in one batch."""
        keys = [hashlib.sha256(p.numpy().tobytes()).digest() for p in pixels]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))  # each image once
        encoded = {}
        if missing:
            todo = torch.stack([pixels[keys.index(k)] for k in missing])
            with torch.inference_mode():
                encoded = dict(zip(missing, model.embed_images(todo.to(model.device))))
        out = []
        for k in keys:
            if k in self.entries:
                self.hits += 1
                self.entries.move_to_end(k)
                out.append(self.entries[k])
            else:
                self.misses += 1
                out.append(encoded[k])
                self._put(k, encoded[k])
        return torch.stack(out)

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """text up to the first of the stop strings it contains (OpenAI's `stop`), and whether one was."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


class Request:
    """One generation: prompt ids (with <image> placeholders) and its images, its own sampling,
    stop strings and callbacks. The engine fills tokens / logprobs and sets finish_reason ("stop":
    <eos> or a stop string in the text; "length": max_new_tokens; "cancelled") or error, then calls
    on_done. The tokens that completed a stop string are kept: cut_at_stop cuts the text."""

    def __init__(self, prompt_ids: list[int], images: list, sampling: gen.SamplingConfig,
                 on_token: Callable[[Request, int], None] | None = None,
                 on_done: Callable[[Request], None] | None = None, stop: tuple[str, ...] = ()):
        if sampling.num_beams > 1:
            raise InputError("the engine does not run beam search; use Pipeline.generate for num_beams > 1")
        self.prompt_ids, self.images, self.sampling, self.stop = prompt_ids, images, sampling, tuple(stop)
        self.on_token, self.on_done = on_token, on_done
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.alone = False  # prefill it in a group of its own (its group failed: find the bad request)
        self._done = threading.Event()
        self.generator: torch.Generator | None = None  # made on admission, on the model's device

    def cancel(self) -> None:
        """Stop generating (a client went away): the row is freed at the next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self) -> gen.Generated:
        if self.error is not None:
            raise self.error
        return gen.Generated(self.tokens, self.logprobs)

    def _finish(self, reason: str | None, error: Exception | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._done.set()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # a consumer's bug must not stop the other rows
                log.exception("on_done callback failed")


@dataclass
class Prefill:
    """Newcomers being prefilled into pool rows [start, start + len(requests)), a few decoder
    layers per step."""

    requests: list[Request]
    start: int
    batch: gen.PromptBatch
    layers: Iterator[torch.Tensor | None]  # generate.prefill_by_layer
    layers_per_step: int


class Engine:
    """Continuous batching over a KV pool of max_rows rows of max_len slots (see the module doc).

    kv_cache_gb: size the pool by memory instead: as many rows as fit (at most max_rows).
    max_len: prompt (images included) + new tokens of one request; default the image tokens + 512.
    image_cache_mb: the ImageCache bound (0: no cache). max_queue: requests waiting beyond it
    make submit raise EngineBusy. prefill_tokens: the prompt tokens one step may prefill.
    """

    def __init__(self, pipe, max_rows: int = 16, kv_cache_gb: float | None = None, max_len: int | None = None,
                 image_cache_mb: float = 256, max_queue: int = 256, prefill_tokens: int = 4096):
        self.pipe, self.model = pipe, pipe.model
        text = self.model.config.text
        limit = text.max_position_embeddings
        max_len = max_len or min(limit, self.model.config.num_image_tokens + 512)
        if max_len > limit:
            raise InputError(f"max_len {max_len} is more than the model's limit of {limit} positions")
        self.max_len = -(-max_len // gen.CACHE_BUCKET) * gen.CACHE_BUCKET  # a compiled step's shapes, kept few
        row_bytes = 2 * text.num_layers * text.num_kv_heads * text.head_dim * self.max_len * self.model.dtype.itemsize
        if kv_cache_gb is not None:
            fit = int(kv_cache_gb * 2**30 // row_bytes)
            if fit < 1:
                raise InputError(f"--kv-cache-gb {kv_cache_gb:g} holds no request of {self.max_len} tokens "
                                 f"(one needs {row_bytes / 2**30:.3g} GB); raise it or lower --max-len")
            max_rows = min(max_rows, fit)
        self.max_rows, self.max_queue, self.prefill_tokens = max_rows, max_queue, prefill_tokens
        self.kv_bytes = row_bytes * max_rows
        dev = self.model.device
        self.pool = self.model.new_cache(max_rows, self.max_len)
        self.block = torch.zeros(max_rows, self.max_len, dtype=torch.long, device=dev)
        self.pos = torch.zeros_like(self.block)
        self.valid = torch.zeros(max_rows, self.max_len, dtype=torch.bool, device=dev)
        self.slot = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.logits = torch.zeros(max_rows, text.vocab_size, device=dev)  # each row's next-token logits
        self.rows: list[Request] = []  # active requests, row i of the pool = rows[i]
        self.prefilling: Prefill | None = None  # the group being prefilled, in the rows after them
        self.images = ImageCache(int(image_cache_mb * 2**20))
        self.queue: deque[Request] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        self.tokens_out = self.steps = 0
        self.on_step: Callable[[int, int, float], None] | None = None  # (rows, tokens, seconds) per step

    # ---- submitting ----------------------------------------------------------------------

    def check(self, n_prompt_tokens: int, max_new_tokens: int) -> None:
        """InputError when a request cannot fit one cache row."""
        if n_prompt_tokens + max_new_tokens > self.max_len:
            raise InputError(f"{n_prompt_tokens} prompt tokens (images included) + {max_new_tokens} new tokens "
                             f"do not fit the engine's {self.max_len} slots per request; raise --max-len")

    def submit(self, images: list, prompt: str | list[int], sampling: gen.SamplingConfig,
               force: bool = False, **options) -> Request:
        """Queue a request: its images (as the model sees them, or any PIL image), a prompt (text
        or ids), and Request's options (callbacks, stop strings). force=True queues it even past
        max_queue (batch jobs that wait anyway)."""
        ids = prompt if isinstance(prompt, list) else self.pipe.prompt_ids(prompt, len(images), sampling.max_new_tokens)
        self.check(len(ids), sampling.max_new_tokens)
        request = Request(ids, images, sampling, **options)
        with self.cond:
            if self.closed:
                raise EngineBusy("the engine is shut down")
            if not force and len(self.queue) >= self.max_queue:
                raise EngineBusy(f"{len(self.queue)} requests queued")
            self.queue.append(request)
            self.cond.notify()
        return request

    @property
    def depth(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.rows or self.prefilling)

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit newcomers, run some layers of their prefill, choose a token for every row, retire
        finished rows, decode the rest. -> whether there was anything to do."""
        start, tokens_before = time.perf_counter(), self.tokens_out
        self._admit()
        if self.prefilling is not None:
            self._advance_prefill()
        if not self.rows:
            return self.busy  # a prefill under way, or requests put back to find a bad one
        rows = len(self.rows)
        self._choose()
        self._retire()
        n = len(self.rows)
        if n:
            view = KVCache([k[:n] for k in self.pool.k], [v[:n] for v in self.pool.v])
            layout = gen.Layout(self.block[:n], self.pos[:n], self.valid[:n])
            token = torch.tensor([r.tokens[-1] for r in self.rows], device=self.slot.device)
            self.logits[:n] = gen.decode_step(self.model, layout, token, self.slot[:n], view)
            self.slot[:n] += 1
        self.steps += 1
        if self.on_step is not None:
            self.on_step(rows, self.tokens_out - tokens_before, time.perf_counter() - start)
        return True

    def _admit(self) -> None:
        """Start prefilling queued requests in free rows, up to the prefill budget; one group at a time."""
        if self.prefilling is not None:
            return
        newcomers, budget = [], self.prefill_tokens
        with self.cond:
            while self.queue and len(self.rows) + len(newcomers) < self.max_rows:
                r = self.queue[0]
                if r.cancelled:
                    self.queue.popleft()._finish("cancelled")
                    continue
                if newcomers and (len(r.prompt_ids) > budget or r.alone):
                    break
                budget -= len(r.prompt_ids)
                newcomers.append(self.queue.popleft())
                if r.alone:
                    break
        if not newcomers:
            return
        try:
            self.prefilling = self._start_prefill(newcomers)
        except ValueError as e:  # a bad request (images that do not match its prompt)
            if len(newcomers) == 1:
                newcomers[0]._finish(None, e)
                return
            for r in newcomers:  # find it: each again in a group of its own, the others unharmed
                r.alone = True
            with self.cond:
                self.queue.extendleft(reversed(newcomers))
        except Exception as e:  # fail the newcomers, not the running rows
            log.exception("prefill failed")
            for r in newcomers:
                r._finish(None, e)

    def _start_prefill(self, newcomers: list[Request]) -> Prefill:
        """Encode the newcomers' images (the image cache first) and embed their prompts: the errors
        of a bad request come from here, before any layer runs."""
        cfg = self.model.config
        pixels = preprocess([im for r in newcomers for im in r.images], cfg.vision.image_size, cfg.resample)
        image_tokens = self.images.encode(self.model, pixels) if len(pixels) else None
        P = max(len(r.prompt_ids) for r in newcomers)
        batch = gen.PromptBatch([r.prompt_ids for r in newcomers], self.pipe.tokenizer.pad_id,
                                self.max_len - P, self.model.device)
        x = self.model.embed(batch.ids, image_tokens)
        start, m = len(self.rows), len(newcomers)
        view = KVCache([k[start:start + m] for k in self.pool.k], [v[start:start + m] for v in self.pool.v])
        n_layers = cfg.text.num_layers
        per_step = max(1, n_layers * self.prefill_tokens // (m * P))
        return Prefill(newcomers, start, batch, gen.prefill_by_layer(self.model, batch, x, view), per_step)

    def _advance_prefill(self) -> None:
        """Run the next layers of the group being prefilled; when it is done, its rows join the
        running ones (moved down to follow them if rows left meanwhile)."""
        p = self.prefilling
        try:
            for _ in range(p.layers_per_step):
                logits = next(p.layers)
                if logits is not None:
                    break
            else:
                return
        except Exception as e:
            log.exception("prefill failed")
            self.prefilling = None
            for r in p.requests:
                r._finish(None, e)
            return
        m, n = len(p.requests), len(self.rows)
        rows = slice(p.start, p.start + m)
        self.block[rows], self.pos[rows], self.valid[rows] = p.batch.block, p.batch.pos, p.batch.valid
        self.slot[rows] = p.batch.prompt_len
        for j in range(m):  # ascending: safe where the two ranges overlap
            if p.start + j != n + j:
                self._move(p.start + j, n + j)
        self.logits[n:n + m] = logits
        for r in p.requests:
            if r.sampling.do_sample:  # as generate.stream_tokens makes it, so a seed samples the same
                r.generator = gen.new_generator(self.model.device, r.sampling.seed)
        self.rows += p.requests
        self.prefilling = None

    def _choose(self) -> None:
        """The next token of every row: greedy or sampled with the row's own generator."""
        n = len(self.rows)
        logits = self.logits[:n]
        logprobs = logits.log_softmax(-1)
        tokens = logits.argmax(-1).tolist()
        for i, r in enumerate(self.rows):
            if r.sampling.do_sample:
                probs = gen.logits_to_probs(logits[i : i + 1], r.sampling)
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        eos = self.pipe.tokenizer.eos_id
        chosen = logprobs[torch.arange(n), torch.tensor(tokens, device=logits.device)].tolist()
        for r, t, lp in zip(self.rows, tokens, chosen):
            if r.cancelled:
                r.finish_reason = "cancelled"
                continue
            if t == eos:
                r.finish_reason = "stop"
                continue
            r.tokens.append(t)
            r.logprobs.append(lp)
            self.tokens_out += 1
            if r.on_token is not None:
                try:
                    r.on_token(r, t)
                except Exception:
                    log.exception("on_token callback failed")
            if r.stop and cut_at_stop(self.pipe.tokenizer.decode(r.tokens), r.stop)[1]:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.sampling.max_new_tokens:
                r.finish_reason = "length"

    def _retire(self) -> None:
        """Free the rows of finished requests: the last active row moves into each freed one."""
        i = 0
        while i < len(self.rows):
            r = self.rows[i]
            if r.finish_reason is None:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                self._move(last, i)
            self.rows[i] = self.rows[last]
            self.rows.pop()
            r._finish(r.finish_reason)

    def _move(self, src: int, dst: int) -> None:
        for cache in (self.pool.k, self.pool.v):
            for layer in cache:
                layer[dst] = layer[src]
        for t in (self.block, self.pos, self.valid, self.slot):  # logits: the decode after this sets them
            t[dst] = t[src]

    # ---- running ---------------------------------------------------------------------------

    def run_until_idle(self) -> None:
        """Step until nothing is queued or running (the caller's thread; no engine thread)."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the engine in a model thread until close()."""
        self.thread = threading.Thread(target=self._loop, name="palikit-engine", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.busy:
                    self.cond.wait()
                if self.closed:
                    break
            try:
                self.step()
            except Exception as e:  # never kill the thread: fail the running rows, keep serving
                log.exception("engine step failed")
                for r in self._in_flight():
                    r._finish(None, e)
                self.rows, self.prefilling = [], None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
        for r in [*self._in_flight(), *self.queue]:
            r._finish(None, EngineBusy("the engine is shut down"))
        self.rows, self.prefilling, self.queue = [], None, deque()

    def _in_flight(self) -> list[Request]:
        return [*self.rows, *(self.prefilling.requests if self.prefilling else [])]

    def in_order(self, items: Iterable[T], submit: Callable[[T], Request | None],
                 window: int) -> Iterator[list[tuple[T, Request | None]]]:
        """Stream items through the engine in their order (`palikit run`, `palikit eval`).
        submit(item) queues the item's request and returns it, or None when the item failed before
        it had one. Yields lists of (item, request) in the items' order, each item as soon as it and
        every item before it are done; at most `window` items are submitted and not yet yielded, so
        a freed row takes the next item at once and a long answer holds back only the records after
        it (within the window), never the model. Steps the engine in this thread unless it runs its own."""
        items, pending, more = iter(items), deque(), True
        while more or pending:
            while more and len(pending) < window:
                item = next(items, _END)
                if item is _END:
                    more = False
                else:
                    pending.append((item, submit(item)))
            ready = []
            while pending and (pending[0][1] is None or pending[0][1].done):
                ready.append(pending.popleft())
            if ready:
                yield ready
            elif self.thread is None:
                self.step()
            else:
                pending[0][1].wait()

    def stats(self) -> dict:
        return {"running_rows": len(self.rows), "max_rows": self.max_rows, "queue_depth": len(self.queue),
                "image_cache_hit_rate": self.images.hit_rate, "image_cache_bytes": self.images.bytes,
                "kv_cache_bytes": self.kv_bytes, "generated_tokens": self.tokens_out, "steps": self.steps}


@dataclass(eq=False)
class Work:
    """One prompt of a batch run (`palikit run`, `palikit eval`): its ids (checked against the
    model's length limit beforehand) or the error that stopped it, and its images, read only when
    it is submitted so that a long run holds the images of its window only."""

    key: object  # the caller's: a line number, an example index
    ids: list[int] | None
    max_new_tokens: int
    read_images: Callable[[], list]  # raises InputError / OSError for an unreadable image
    about: object = None  # the caller's own: what the work is (a job, an example)
    error: str | None = None
    images: list | None = None


def run_in_order(pipe, works: list[Work], max_rows: int) -> Iterator[list[tuple[Work, Request | None]]]:
    """Every work through one engine (max_rows rows, its KV pool as long as the longest prompt and
    answer need), yielded in order as Engine.in_order does; a work that failed, before generating
    (no request then), on reading its images (no request) or in the engine, comes back with its
    error in work.error."""
    todo = [w for w in works if w.error is None]
    engine = Engine(pipe, max_rows=max_rows, max_len=max((len(w.ids) + w.max_new_tokens for w in todo), default=1))

    def submit(work: Work) -> Request | None:
        if work.error is not None:
            return None
        try:
            work.images = work.read_images()
        except (InputError, OSError) as e:
            work.error = str(e)
            return None
        return engine.submit(work.images, work.ids, gen.SamplingConfig(max_new_tokens=work.max_new_tokens),
                             force=True)

    for ready in engine.in_order(works, submit, window=4 * max_rows):
        for work, request in ready:
            if request is not None and request.error is not None:
                work.error = str(request.error)
        yield ready
