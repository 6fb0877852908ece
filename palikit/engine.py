"""Continuous batching: every generation of palikit runs here, one prompt of Pipeline.generate as
the requests of a server, a `palikit run` or an eval.

    engine = Engine(palikit.load("default"), max_rows=16)
    engine.start()                                   # a model thread; or call engine.step() yourself
    request = engine.submit(images, "caption en", SamplingConfig(max_new_tokens=32))
    request.wait(); print(engine.pipe.tokenizer.decode(request.result().tokens))

palikit.scheduler decides (who waits, who joins, who leaves, which row moves where); the Runner here
carries it out on the model: the KV cache is one preallocated pool of max_rows rows of max_len
slots, every row with its own layout (block numbers, positions, valid slots), slot and sampling
generator; a step runs the model's decode step on the first n rows.

Prefill is chunked by layers, not by tokens (PaliGemma.prefill says why): one group of newcomers is
prefilled at a time into the pool rows after the running ones, a few decoder layers per step when
its prompt tokens exceed the budget, while the running rows keep decoding a token per step.

Exactness: a row's tokens depend only on its own prompt and images, whatever it shares a step
with: every row has its own positions and masks, slots it has not written are masked by block
numbers (so what an earlier occupant left there is never read), and a seeded request samples from
its own generator. Greedy output equals the request run alone (tests/test_engine.py), to float
rounding: a step's matrix products take as many rows as requests are running, and a GEMM of a few
rows may round differently from one of many (a one-row GEMV sums in another order than a GEMM,
and BLAS libraries pick their blocking and threading by shape).

batch_invariant=True removes that rounding, so a request's tokens and log-probs are bit-identical
whatever shares its steps, however it arrives, across a resumed job and across torchrun ranks (for
one engine size, max_rows and max_len): every product then has a shape that does not depend on the
company (He et al., "Defeating Nondeterminism in LLM Inference", Thinking Machines Lab, 2025, make
kernels invariant; on a CPU, fixing the shapes is what is in reach). Each request is prefilled in a
group of its own (its prompt at slots 0.., no padding), its images encoded one per call, and every
decode step runs all max_rows rows of the pool over all max_len slots (the rows not running are
computed and discarded): a GEMM's output row depends on its input row only, wherever that row sits
in a product of fixed shape (tests/test_engine.py checks both). The cost is the rows not running
(docs/performance.md).
"""

from __future__ import annotations

import contextlib
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
from .paligemma import Layout
from .processor import InputError, preprocess
from .scheduler import EngineBusy, Request, Scheduler, cut_at_stop

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()

__all__ = ["Engine", "EngineBusy", "ImageCache", "Request", "Work", "cut_at_stop", "run_in_order"]


def adapter_rows(bank, slots: list[int], per_row: bool = False):
    """Forwards with batch row i on LoRA adapter slots[i] of `bank` (nothing to do without one);
    per_row: AdapterBank.rows' batch-invariant products."""
    return bank.rows(slots, per_row) if bank is not None and any(slots) else contextlib.nullcontext()


class ImageCache:
    """SigLIP + projector outputs (N, D) of recent images, least recently used evicted first,
    keyed by a hash of the preprocessed pixels and bounded in bytes: "caption, then detect, then
    segment this photo" encodes it once. one_per_call: each image encoded alone (batch-invariant).

    Only the image encoding is reused, never the KV cache of the image tokens: in PaliGemma's
    prefix-LM the image tokens attend to the text prefix after them (one bidirectional block), so
    their keys and values differ from one prompt to the next."""

    def __init__(self, max_bytes: int, one_per_call: bool = False):
        self.max_bytes, self.bytes, self.one_per_call = max_bytes, 0, one_per_call
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, model, pixels: torch.Tensor, slots: list[int] | None = None, bank=None) -> torch.Tensor:
        """pixels (I, 3, S, S) -> image tokens (I, N, D); images not cached are encoded in one batch.
        slots: each image's LoRA adapter slot in `bank` (palikit.adapters.AdapterBank); an adapter
        that changes the vision tower or the projector has encodings of its own."""
        slots = slots or [0] * len(pixels)
        own = [s if bank is not None and s and bank.touches_images(s) else 0 for s in slots]
        keys = [hashlib.sha256(p.numpy().tobytes() + s.to_bytes(4, "little")).digest() for p, s in zip(pixels, own)]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))  # each image once
        encoded = {}
        batches = [[k] for k in missing] if self.one_per_call else [missing] if missing else []
        for batch in batches:  # one per call: an encoding that does not depend on the images beside it
            todo = torch.stack([pixels[keys.index(k)] for k in batch])
            rows = [own[keys.index(k)] for k in batch]
            with torch.inference_mode(), adapter_rows(bank, rows, self.one_per_call):
                encoded |= dict(zip(batch, model.embed_images(todo.to(model.device))))
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


@dataclass
class Prefill:
    """A group being prefilled into pool rows [start, start + len(ids)), a few layers per step."""

    start: int
    layout: Layout  # of the group's rows, over the pool's max_len slots
    x: torch.Tensor  # the hidden states after `done` layers
    done: int
    per_step: int
    slots: list[int]  # each row's LoRA adapter slot (0: the base)


class Runner:
    """The model side of the engine: the KV pool, each row's layout, slot and next-token logits,
    a group's prefill layer by layer, sampling, decode steps and row moves."""

    def __init__(self, pipe, max_rows: int, max_len: int, image_cache_mb: float, batch_invariant: bool = False):
        self.pipe, self.model, self.batch_invariant = pipe, pipe.model, batch_invariant
        dev, text = self.model.device, self.model.config.text
        self.pool = self.model.new_cache(max_rows, max_len)
        self.layout = Layout(torch.zeros(max_rows, max_len, dtype=torch.long, device=dev),
                             torch.zeros(max_rows, max_len, dtype=torch.long, device=dev),
                             torch.zeros(max_rows, max_len, dtype=torch.bool, device=dev))
        self.slot = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.logits = torch.zeros(max_rows, text.vocab_size, device=dev)  # each row's next-token logits
        self.images = ImageCache(int(image_cache_mb * 2**20), one_per_call=batch_invariant)
        self.prefill: Prefill | None = None

    @property
    def bank(self):
        """The pipe's LoRA adapters (palikit.adapters.AdapterBank), if any are loaded."""
        return getattr(self.pipe, "adapters", None)

    def rows(self, start: int, stop: int) -> KVCache:
        return KVCache([k[start:stop] for k in self.pool.k], [v[start:stop] for v in self.pool.v])

    def start_prefill(self, group: list[Request], start: int, per_step: Callable[[int], int]) -> None:
        """Encode the group's images (the image cache first) and embed its prompts: the errors of a
        bad request (ValueError) come from here, before any layer runs."""
        cfg = self.model.config
        pixels = preprocess([im for r in group for im in r.images], cfg.vision.image_size, cfg.resample)
        bank = self.bank
        image_slots = [r.slot for r in group for _ in r.images]
        image_tokens = self.images.encode(self.model, pixels, image_slots, bank) if len(pixels) else None
        lengths = [len(r.prompt_ids) for r in group]
        P = max(lengths)
        pad = self.pipe.tokenizer.pad_id
        ids = torch.tensor([[pad] * (P - len(r.prompt_ids)) + r.prompt_ids for r in group], device=self.model.device)
        layout = Layout.of_prompts(lengths, self.pool.k[0].shape[2], self.model.device)
        self.prefill = Prefill(start, layout, self.model.embed(ids, image_tokens), 0, per_step(P), [r.slot for r in group])

    def advance_prefill(self) -> torch.Tensor | None:
        """Run the next layers of the group being prefilled. -> its next-token logits once its
        last layer has run (its rows' layouts and slots are set then), else None."""
        p = self.prefill
        n_layers = self.model.config.text.num_layers
        stop = min(n_layers, p.done + p.per_step)
        rows = slice(p.start, p.start + p.x.shape[0])
        with adapter_rows(self.bank, p.slots, self.batch_invariant):
            p.x = self.model.prefill(p.x, p.layout, self.rows(rows.start, rows.stop), slice(p.done, stop))
        p.done = stop
        if stop < n_layers:
            return None
        self.layout.block[rows], self.layout.pos[rows], self.layout.valid[rows] = p.layout.block, p.layout.pos, p.layout.valid
        self.slot[rows] = p.x.shape[1]
        self.prefill = None
        return self.model.logits(p.x[:, -1], "prefill")

    def choose(self, running: list[Request], eos: int) -> int:
        """The next token of every running row (greedy, or sampled with the row's own generator),
        appended to its request, whose finish_reason is set when it ends. -> tokens appended."""
        n = len(running)
        logits = self.logits[:n]
        logprobs = logits.log_softmax(-1)
        tokens = logits.argmax(-1).tolist()
        appended = 0
        for i, r in enumerate(running):
            if r.finish_reason is not None:  # failed in this step's decode
                continue
            try:  # one request's sampling, callback or stop strings fail its row alone
                appended += self._choose_row(r, i, tokens[i], logits, logprobs, eos)
            except Exception as e:
                log.exception("a row failed")
                r.fail_row(e)
        return appended

    def _choose_row(self, r: Request, i: int, token: int, logits: torch.Tensor, logprobs: torch.Tensor,
                    eos: int) -> int:
        if r.cancelled:
            r.finish_reason = "cancelled"
            return 0
        if r.sampling.do_sample:
            probs = gen.logits_to_probs(logits[i:i + 1], r.sampling)
            token = int(torch.multinomial(probs, 1, generator=r.generator))
        if token == eos:
            r.finish_reason = "eos"
            return 0
        r.tokens.append(token)
        r.logprobs.append(float(logprobs[i, token]))
        if r.sampling.top_logprobs:
            values, ids = logprobs[i].topk(r.sampling.top_logprobs)
            r.top_logprobs.append(list(zip(ids.tolist(), values.tolist())))
        if r.on_token is not None:
            try:
                r.on_token(r, token)
            except Exception:  # the consumer's problem (a client gone): the row goes on
                log.exception("on_token callback failed")
        if r.stop and cut_at_stop(self.pipe.tokenizer.decode(r.tokens), r.stop)[1]:
            r.finish_reason = "stop"
        elif len(r.tokens) >= r.sampling.max_new_tokens:
            r.finish_reason = "length"
        return 1

    def move(self, src: int, dst: int) -> None:
        """Row src of the pool (its cache, layout, slot and logits) into row dst."""
        for cache in (self.pool.k, self.pool.v):
            for layer in cache:
                layer[dst] = layer[src]
        for t in (self.layout.block, self.layout.pos, self.layout.valid, self.slot, self.logits):
            t[dst] = t[src]

    def decode(self, running: list[Request], start: int = 0) -> None:
        """One decode step of pool rows start, ..., start + len(running) - 1: the next-token logits
        of each. A step that fails writes a slot that the next try writes again."""
        rows = slice(start, start + len(running))
        token = torch.tensor([r.tokens[-1] for r in running], device=self.slot.device)
        if self.batch_invariant:
            slots = [0] * self.slot.shape[0]
            slots[rows] = [r.slot for r in running]
            with adapter_rows(self.bank, slots, per_row=True):
                self.logits[rows] = self._decode_every_row(token, rows)
        else:
            layout = Layout(self.layout.block[rows], self.layout.pos[rows], self.layout.valid[rows])
            with adapter_rows(self.bank, [r.slot for r in running]):
                self.logits[rows] = self.pipe.decode_step(token, self.slot[rows], layout,
                                                          self.rows(rows.start, rows.stop))
        self.slot[rows] += 1

    def _decode_every_row(self, token: torch.Tensor, rows: slice) -> torch.Tensor:
        """A decode step of every pool row over every slot (one shape, whatever is running and however
        long) -> the logits of `rows`. The other rows (free, or being prefilled) write their last slot,
        which no row reads before writing it itself: a prompt ends before it (a request takes at
        least one new token), and a row writes its slot before attending to it."""
        every = torch.zeros(self.slot.shape[0], dtype=torch.long, device=token.device)
        every[rows] = token
        slot = torch.full_like(self.slot, self.pool.k[0].shape[2] - 1)
        slot[rows] = self.slot[rows]
        return self.pipe.decode_step(every, slot, self.layout, self.pool, every_slot=True)[rows]


class Engine:
    """Continuous batching over a KV pool of max_rows rows of max_len slots (see the module doc).

    kv_cache_gb: size the pool by memory instead: as many rows as fit (at most max_rows).
    max_len: prompt (images included) + new tokens of one request; default the image tokens + 512.
    image_cache_mb: the ImageCache bound (0: no cache). max_queue: requests waiting beyond it
    make submit raise EngineBusy. prefill_tokens: the prompt tokens one step may prefill.
    batch_invariant: bit-identical results whatever the company (see the module doc).
    """

    def __init__(self, pipe, max_rows: int = 16, kv_cache_gb: float | None = None, max_len: int | None = None,
                 image_cache_mb: float = 256, max_queue: int = 256, prefill_tokens: int = 4096,
                 batch_invariant: bool = False):
        self.pipe, self.model = pipe, pipe.model
        text = self.model.config.text
        limit = text.max_position_embeddings
        max_len = max_len or default_length(self.model.config)
        if max_len > limit:
            raise InputError(f"max_len {max_len} is more than the model's limit of {limit} positions")
        self.max_len = gen.cache_length(max_len)  # a compiled step's shapes, kept few
        row_bytes = 2 * text.num_layers * text.num_kv_heads * text.head_dim * self.max_len * self.model.dtype.itemsize
        if kv_cache_gb is not None:
            fit = int(kv_cache_gb * 2**30 // row_bytes)
            if fit < 1:
                raise InputError(f"--kv-cache-gb {kv_cache_gb:g} holds no request of {self.max_len} tokens "
                                 f"(one needs {row_bytes / 2**30:.3g} GB); raise it or lower --max-len")
            max_rows = min(max_rows, fit)
        self.max_rows, self.kv_bytes = max_rows, row_bytes * max_rows
        self.scheduler = Scheduler(max_rows, max_queue, prefill_tokens)
        self.runner = Runner(pipe, max_rows, self.max_len, image_cache_mb, batch_invariant)
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
               force: bool = False, adapter: str | None = None, **options) -> Request:
        """Queue a request: its images (as the model sees them, or any PIL image), a prompt (text
        or ids), the LoRA adapter it runs on (a name loaded with Pipeline.load_adapter; None: the
        base) and Request's options (callbacks, stop strings). force=True queues it even past
        max_queue (batch jobs that wait anyway)."""
        if sampling.num_beams > 1:
            raise InputError("the engine does not run beam search; use Pipeline.generate for num_beams > 1")
        ids = prompt if isinstance(prompt, list) else self.pipe.prompt_ids(prompt, len(images), sampling.max_new_tokens)
        self.check(len(ids), sampling.max_new_tokens)
        slot = 0
        if adapter is not None:
            if self.runner.bank is None:
                raise InputError(f"no adapter named {adapter!r} is loaded (loaded: none)")
            slot = self.runner.bank.slot(adapter)
        request = Request(ids, images, sampling, adapter=adapter, slot=slot, **options)
        request.alone = self.runner.batch_invariant  # prefilled in a group of its own: no padding, no neighbours
        with self.cond:
            if self.closed:
                raise EngineBusy("the engine is shut down")
            self.scheduler.add(request, force)
            self.cond.notify()
        return request

    def uses_adapter(self, name: str) -> bool:
        """Whether a queued, prefilling or running request is on the adapter `name`."""
        sched = self.scheduler
        with sched.lock:
            return any(r.adapter == name for r in (*sched.waiting, *sched.prefilling, *sched.running))

    @property
    def depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit newcomers, run some layers of their prefill, choose a token for every row, retire
        finished rows, decode the rest. -> whether there was anything to do."""
        start, sched = time.perf_counter(), self.scheduler
        self._admit()
        if sched.prefilling:
            self._advance_prefill()
        if not sched.running:
            return sched.busy  # a prefill under way, or requests put back to find a bad one
        rows = len(sched.running)
        tokens = self.runner.choose(sched.running, self.pipe.tokenizer.eos_id)
        left, moves = sched.retire()
        for src, dst in moves:
            self.runner.move(src, dst)
        for r in left:
            r.finish(r.finish_reason if r.error is None else None, r.error)
        if sched.running:
            self._decode(sched.running)
        self.steps += 1
        self.tokens_out += tokens
        if self.on_step is not None:
            self.on_step(rows, tokens, time.perf_counter() - start)
        return True

    def _decode(self, running: list[Request]) -> None:
        """A decode step of the running rows; when it fails, each row again alone, so that only the
        rows that fail by themselves leave (with the error) and the others go on."""
        try:
            self.runner.decode(running)
            return
        except Exception as e:
            if len(running) == 1:
                log.exception("a row failed")
                running[0].fail_row(e)
                return
            log.exception("a decode step failed: each row again alone")
        for i, r in enumerate(running):
            try:
                self.runner.decode([r], i)
            except Exception as e:
                r.fail_row(e)

    def _admit(self) -> None:
        sched = self.scheduler
        group = sched.admit()
        if not group:
            return
        layers = self.model.config.text.num_layers
        try:
            self.runner.start_prefill(group, sched.prefill_start, lambda P: sched.layers_per_step(layers, P))
        except ValueError as e:  # a bad request (images that do not match its prompt)
            if len(group) == 1:
                sched.drop_prefill()
                group[0].finish(None, e)
            else:
                sched.requeue(group)  # find it: each again in a group of its own, the others unharmed
        except Exception as e:  # fail the newcomers, not the running rows
            log.exception("prefill failed")
            for r in sched.drop_prefill():
                r.finish(None, e)

    def _advance_prefill(self) -> None:
        """Run the next layers of the group being prefilled; when it is done, its rows join the
        running ones (moved down to follow them if rows left meanwhile)."""
        sched = self.scheduler
        try:
            logits = self.runner.advance_prefill()
        except Exception as e:
            self.runner.prefill = None
            if len(sched.prefilling) > 1:  # find the bad request: each again alone
                log.exception("a group's prefill failed: each request again alone")
                sched.requeue(sched.prefilling)
                return
            log.exception("prefill failed")
            for r in sched.drop_prefill():
                r.finish(None, e)
            return
        if logits is None:
            return
        start = sched.prefill_start
        self.runner.logits[start:start + len(logits)] = logits
        for r in sched.prefilling:
            if r.sampling.do_sample:  # made on joining, so a seed samples the same whenever it runs
                try:
                    r.generator = gen.new_generator(self.model.device, r.sampling.seed)
                except Exception as e:
                    r.fail_row(e)
        for src, dst in sched.join():
            self.runner.move(src, dst)

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
            except Exception as e:  # never kill the thread: fail the rows in flight, keep serving
                log.exception("engine step failed")
                self.runner.prefill = None
                for r in [*self.scheduler.running, *self.scheduler.drop_prefill()]:
                    r.finish(None, e)
                self.scheduler.running = []

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.runner.prefill = None
        for r in self.scheduler.clear():
            r.finish(None, EngineBusy("the engine is shut down"))

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
        images = self.runner.images
        return {"running_rows": self.running, "max_rows": self.max_rows, "queue_depth": self.depth,
                "image_cache_hit_rate": images.hit_rate, "image_cache_bytes": images.bytes,
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
    adapter: str | None = None  # a LoRA adapter loaded with Pipeline.load_adapter (None: the base)


def default_length(config) -> int:
    """Slots per request of an engine not told otherwise: the image tokens + 512."""
    return min(config.text.max_position_embeddings, config.num_image_tokens + 512)


def batch_invariant(pipe, default: bool) -> bool:
    """Options.batch_invariant of the pipe, `default` where it is not set (None)."""
    chosen = getattr(getattr(pipe, "options", None), "batch_invariant", None)
    return default if chosen is None else chosen


def engine_for(pipe, max_rows: int, lengths: Iterable[int], default_invariant: bool) -> Engine:
    """An engine for a known set of requests of these lengths (prompt + new tokens). Batch-invariant,
    its shape depends on no request: max_rows rows of at least default_length slots (longer only
    for a set with a longer request); else just the rows and slots the set needs."""
    longest = max(lengths, default=1)
    if batch_invariant(pipe, default_invariant):
        return Engine(pipe, max_rows=max_rows, max_len=max(longest, default_length(pipe.model.config)),
                      batch_invariant=True)
    return Engine(pipe, max_rows=max_rows, max_len=longest)


def run_in_order(pipe, works: list[Work], max_rows: int) -> Iterator[list[tuple[Work, Request | None]]]:
    """Every work through one engine (engine_for: batch-invariant unless the options say not),
    yielded in order as Engine.in_order does; a work that failed, before generating (no request
    then), on reading its images (no request) or in the engine, comes back with its error in
    work.error."""
    todo = [w for w in works if w.error is None]
    engine = engine_for(pipe, max_rows, (len(w.ids) + w.max_new_tokens for w in todo), default_invariant=True)

    def submit(work: Work) -> Request | None:
        if work.error is not None:
            return None
        try:
            work.images = work.read_images()
        except (ValueError, OSError) as e:  # InputError is a ValueError; a NUL in a path too
            work.error = str(e)
            return None
        try:
            return engine.submit(work.images, work.ids, gen.SamplingConfig(max_new_tokens=work.max_new_tokens),
                                 force=True, adapter=work.adapter)
        except InputError as e:  # an adapter that is not loaded
            work.error = str(e)
            return None

    for ready in engine.in_order(works, submit, window=4 * max_rows):
        for work, request in ready:
            if request is not None and request.error is not None:
                work.error = str(request.error)
        yield ready
