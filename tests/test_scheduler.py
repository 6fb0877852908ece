"""palikit.scheduler on its own, without torch or a model: admission within the row and token
budgets, one group prefilled at a time, row moves that keep row i = running[i] whatever joins and
leaves, cancellation, the queue bound, and a failed group retried one request at a time."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palikit.scheduler import EngineBusy, Request, SamplingConfig, Scheduler

SOURCE = Path(__file__).resolve().parent.parent / "palikit" / "scheduler.py"


def request(n_tokens: int, max_new_tokens: int = 4) -> Request:
    return Request(list(range(n_tokens)), [], SamplingConfig(max_new_tokens=max_new_tokens))


class Pool:
    """What the engine's runner does with the scheduler's moves: row i holds a request's state."""

    def __init__(self, rows: int):
        self.rows: list[Request | None] = [None] * rows

    def apply(self, moves):
        for src, dst in moves:
            self.rows[dst] = self.rows[src]


def test_the_scheduler_imports_no_torch():
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('s', {str(SOURCE)!r}); "
            "m = importlib.util.module_from_spec(spec); sys.modules['s'] = m; spec.loader.exec_module(m); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
    assert importlib.util.find_spec("palikit.scheduler") is not None


def test_admission_within_the_budgets():
    s = Scheduler(max_rows=3, max_queue=10, prefill_tokens=100)
    big, a, b, c = request(150), request(40), request(40), request(40)
    for r in (big, a, b, c):
        s.add(r)
    assert s.admit() == [big]  # the first request of a group always goes, even over the budget
    assert s.admit() == []  # one group at a time
    s.join()
    assert s.admit() == [a, b]  # 40 + 40 within 100 tokens; a third would exceed it
    s.join()
    assert s.admit() == [] and list(s.waiting) == [c]  # every row taken


def test_a_long_group_runs_its_share_of_layers_per_step():
    s = Scheduler(max_rows=4, max_queue=10, prefill_tokens=100)
    s.add(request(400))
    s.admit()
    assert s.layers_per_step(26, 400) == 6  # 26 layers x 100 / 400 tokens
    s.join()
    s.add(request(10))
    s.admit()
    assert s.layers_per_step(26, 10) == 260 and s.layers_per_step(26, 10_000) == 1


def test_cancelled_requests_leave_the_queue_finished():
    s = Scheduler(max_rows=2, max_queue=10, prefill_tokens=100)
    gone, kept = request(5), request(5)
    s.add(gone)
    s.add(kept)
    gone.cancel()
    assert s.admit() == [kept]
    assert gone.done and gone.finish_reason == "cancelled"


def test_the_queue_bound_and_force():
    s = Scheduler(max_rows=1, max_queue=1, prefill_tokens=100)
    s.add(request(5))
    with pytest.raises(EngineBusy):
        s.add(request(5))
    s.add(request(5), force=True)  # batch jobs that wait anyway
    assert len(s.waiting) == 2


def test_a_failed_group_is_retried_one_request_at_a_time():
    s = Scheduler(max_rows=4, max_queue=10, prefill_tokens=100)
    a, b, c = request(5), request(5), request(5)
    for r in (a, b, c):
        s.add(r)
    group = s.admit()
    assert group == [a, b, c]
    s.requeue(group)
    assert list(s.waiting) == [a, b, c] and all(r.alone for r in group) and not s.prefilling
    assert s.admit() == [a]
    s.join()
    assert s.admit() == [b]


def test_a_group_joins_after_the_rows_that_stayed():
    """Rows that leave while a group is prefilled (in the rows after them) make the group move down."""
    s, pool = Scheduler(max_rows=4, max_queue=10, prefill_tokens=1000), Pool(4)
    first = [request(5), request(5)]
    for r in first:
        s.add(r)
    for i, r in enumerate(s.admit()):
        pool.rows[s.prefill_start + i] = r
    pool.apply(s.join())
    later = [request(5), request(5)]
    for r in later:
        s.add(r)
    group = s.admit()
    assert s.prefill_start == 2
    for i, r in enumerate(group):
        pool.rows[s.prefill_start + i] = r
    first[0].finish_reason = "stop"
    left, moves = s.retire()
    pool.apply(moves)
    assert left == [first[0]]
    moves = s.join()
    assert moves == [(2, 1), (3, 2)]
    pool.apply(moves)
    assert pool.rows[:3] == s.running == [first[1], *later]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "finish"]), st.integers(0, 7)), max_size=60))
def test_row_i_is_always_running_i(ops):
    """Any order of arrivals, prefills joining and requests finishing: after every step the pool
    rows the moves leave hold exactly the running requests, in order, and nobody is lost."""
    s, pool, everyone = Scheduler(max_rows=4, max_queue=100, prefill_tokens=12), Pool(4), []
    for op, k in ops:
        if op == "add":
            r = request(1 + k)
            everyone.append(r)
            s.add(r)
        elif op == "finish" and s.running:
            s.running[k % len(s.running)].finish_reason = "stop"
        else:
            for i, r in enumerate(s.admit()):
                pool.rows[s.prefill_start + i] = r
            if s.prefilling and k % 2:  # some prefills take more than one step
                pool.apply(s.join())
            left, moves = s.retire()
            pool.apply(moves)
            for r in left:
                r.finish(r.finish_reason)
        assert pool.rows[:len(s.running)] == s.running
        assert len(s.running) + len(s.prefilling) <= 4
    in_engine = set(map(id, [*s.running, *s.prefilling, *s.waiting]))
    assert all(id(r) in in_engine or r.done for r in everyone)
