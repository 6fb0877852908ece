"""Continuous batching's decisions, in plain Python: which requests wait, which join the running
rows, which leave, and which pool row moves where; and what a request is (its sampling settings,
its result). palikit.engine carries the decisions out on the model.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022; the scheduler of vLLM and nano-vllm): every
step decodes one token for each running request, newcomers join between steps, and a request
leaves the moment it is done. The running requests hold the first rows of the KV pool, in order:
row i is `running[i]`. A leaving row's place is taken by the last running row, so the rows stay
packed and a step runs on the first n of them. One group of newcomers at a time is prefilled into
the rows after the running ones, within a budget of prompt tokens.

This module imports no torch: its rules are unit-tested on their own (tests/test_scheduler.py).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# What torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_TOP_LOGPROBS = 20  # as OpenAI's API


@dataclass
class SamplingConfig:
    """A request's generation settings; every value is checked here, at admission, so that nothing
    one request asks for can fail a step that other requests share."""

    max_new_tokens: int = 32
    do_sample: bool = False  # greedy unless asked, as both references
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0  # beam score = sum log-prob / length ** length_penalty
    top_logprobs: int = 0  # also keep the log-probs of this many most likely tokens at each step

    def __post_init__(self):
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer from {SEED_MIN} to {SEED_MAX}, got {self.seed!r}")
        for name in ("temperature", "top_p", "length_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.num_beams < 1 or (self.num_beams > 1 and self.do_sample):
            raise ValueError("num_beams must be >= 1 and beam search does not sample")


@dataclass
class Generated:
    tokens: list[int]  # generated ids, without the final <eos>
    logprobs: list[float] = field(default_factory=list)  # model log-prob of each token in `tokens`
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, if asked
    finish_reason: str | None = None  # "eos", "stop" (a stop string), "length" (max_new_tokens)
    frame_times: list[float] | None = None  # a video prompt's frames: their times in the clip (seconds)


class EngineBusy(Exception):
    """The queue is full: the caller should retry later (the server answers 503 + Retry-After)."""


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """text up to the first of the stop strings it contains (OpenAI's `stop`), and whether one was."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


class Request:
    """One generation: prompt ids (with <image> placeholders) and its images, its own sampling,
    stop strings and callbacks. The engine fills tokens / logprobs and sets finish_reason ("eos";
    "stop": a stop string in the text; "length": max_new_tokens; "cancelled") or error, then calls
    on_done. The tokens that completed a stop string are kept: cut_at_stop cuts the text."""

    def __init__(self, prompt_ids: list[int], images: list, sampling: SamplingConfig,
                 on_token: Callable[[Request, int], None] | None = None,
                 on_done: Callable[[Request], None] | None = None, stop: tuple[str, ...] = (),
                 adapter: str | None = None, slot: int = 0):
        self.prompt_ids, self.images, self.sampling, self.stop = prompt_ids, images, sampling, tuple(stop)
        self.adapter, self.slot = adapter, slot  # a LoRA adapter's name and bank slot (0: the base model)
        self.on_token, self.on_done = on_token, on_done
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # (token, log-prob) of the likeliest, if asked
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.alone = False  # prefill it in a group of its own (its group failed: find the bad request)
        self.generator: Any = None  # the engine's sampling generator of this request
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop generating (a client went away): the row is freed at the next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self) -> Generated:
        if self.error is not None:
            raise self.error
        return Generated(self.tokens, self.logprobs, self.top_logprobs, self.finish_reason)

    def fail_row(self, error: Exception) -> None:
        """This request's own part of a step failed: it leaves its row at the next retirement, with
        the error, and the other rows go on."""
        self.error, self.finish_reason = error, "error"

    def finish(self, reason: str | None, error: Exception | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._done.set()
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # a consumer's bug must not stop the other rows
                log.exception("on_done callback failed")


class Scheduler:
    """The queue, the running rows and the group being prefilled (see the module docstring).

    max_rows: rows of the KV pool. max_queue: waiting requests beyond it make add() raise EngineBusy.
    prefill_tokens: the prompt tokens one group of newcomers may hold (at least one request)."""

    def __init__(self, max_rows: int, max_queue: int, prefill_tokens: int):
        self.max_rows, self.max_queue, self.prefill_tokens = max_rows, max_queue, prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilling: list[Request] = []  # in rows len(running) ... at admission (prefill_start)
        self.prefill_start = 0
        self.lock = threading.Lock()  # add() runs in callers' threads, the rest in the engine's

    def add(self, request: Request, force: bool = False) -> None:
        """Queue a request; force=True past max_queue (batch jobs that wait anyway)."""
        with self.lock:
            if not force and len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self.waiting)} requests queued")
            self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def admit(self) -> list[Request]:
        """The next group to prefill, into the rows after the running ones: queued requests in
        order while rows are free and their prompts fit the token budget (the first always does),
        a request marked `alone` in a group of its own. Nothing while a group is being prefilled.
        Cancelled requests leave the queue here, finished as "cancelled"."""
        if self.prefilling:
            return []
        group, budget, cancelled = [], self.prefill_tokens, []
        with self.lock:
            while self.waiting and len(self.running) + len(group) < self.max_rows:
                r = self.waiting[0]
                if r.cancelled:
                    cancelled.append(self.waiting.popleft())
                    continue
                if group and (len(r.prompt_ids) > budget or r.alone):
                    break
                budget -= len(r.prompt_ids)
                group.append(self.waiting.popleft())
                if r.alone:
                    break
        for r in cancelled:
            r.finish("cancelled")
        self.prefilling, self.prefill_start = group, len(self.running)
        return group

    def layers_per_step(self, n_layers: int, prompt_len: int) -> int:
        """Decoder layers of the prefilling group to run per step: all of them when its tokens fit
        the budget, else the budget's share (at least one), so a step stays about as long."""
        return max(1, n_layers * self.prefill_tokens // (len(self.prefilling) * prompt_len))

    def requeue(self, group: list[Request]) -> None:
        """A group whose prefill failed: back to the front of the queue, each to be prefilled
        alone (from the start), so the bad request fails by itself and the others are unharmed."""
        for r in group:
            r.alone = True
        with self.lock:
            self.waiting.extendleft(reversed(group))
        self.prefilling = []

    def drop_prefill(self) -> list[Request]:
        """The group being prefilled leaves (its prefill failed): -> its requests."""
        group, self.prefilling = self.prefilling, []
        return group

    def join(self) -> list[tuple[int, int]]:
        """The prefilled group joins the running rows. -> the row moves (src, dst) that bring its
        rows down to follow the running ones, where rows left while it was being prefilled."""
        n, start = len(self.running), self.prefill_start
        moves = [(start + j, n + j) for j in range(len(self.prefilling)) if start != n]  # ascending: safe
        self.running += self.prefilling
        self.prefilling = []
        return moves

    def retire(self) -> tuple[list[Request], list[tuple[int, int]]]:
        """Finished requests (finish_reason set) leave their rows; the last running row moves into
        each freed one. -> (the finished requests, the row moves (src, dst) in the order to apply)."""
        left, moves, i = [], [], 0
        while i < len(self.running):
            r = self.running[i]
            if r.finish_reason is None:
                i += 1
                continue
            last = len(self.running) - 1
            if i != last:
                moves.append((last, i))
            self.running[i] = self.running[last]
            self.running.pop()
            left.append(r)
        return left, moves

    def clear(self) -> list[Request]:
        """Every request in the engine's hands, queued ones included; the scheduler is emptied."""
        with self.lock:
            everyone = [*self.running, *self.prefilling, *self.waiting]
            self.running, self.prefilling, self.waiting = [], [], deque()
        return everyone
