"""Counters for /metrics, in Prometheus' text exposition format (no client library needed)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Request counts and latencies, batch sizes, tokens and model time of one server."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> n
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum, count]
        self.batch_sizes: Counter = Counter()
        self.tokens = 0
        self.busy_s = 0.0
        self.recent: deque = deque()  # (end time, tokens, seconds) of the last minute's batches
        self.in_flight = 0
        self.per_model: dict[str, list[int]] = {}  # model id (the base's or an adapter's) -> [answers, tokens]

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            h = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
            for i, b in enumerate(LATENCY_BUCKETS):
                h[i] += seconds <= b
            h[-2] += seconds
            h[-1] += 1

    def answered(self, model: str, tokens: int) -> None:
        """An answer of `tokens` tokens by `model` (the base's id or an adapter's)."""
        with self.lock:
            counts = self.per_model.setdefault(model, [0, 0])
            counts[0] += 1
            counts[1] += tokens

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

    def render(self, queue_depth: int, extra: list[tuple[str, str, float]] = ()) -> str:
        """The exposition text; extra: more gauges, (name, help, value), from the scheduler."""
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
            out += ["# HELP palikit_batch_size Requests per model call (per decode step, continuous batching).",
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
                      ("generated_tokens_per_second", "Tokens per second of model time, last minute.", rate),
                      *extra]
            counters = [("generated_tokens_total", "Tokens generated.", self.tokens),
                        ("model_busy_seconds_total", "Seconds the model spent generating.", self.busy_s)]
            out += ["# HELP palikit_model_answers_total Answers by model (the base's id or a LoRA adapter's).",
                    "# TYPE palikit_model_answers_total counter"]
            out += [f'palikit_model_answers_total{{model="{m}"}} {n}' for m, (n, _) in sorted(self.per_model.items())]
            out += ["# HELP palikit_model_generated_tokens_total Tokens generated by model.",
                    "# TYPE palikit_model_generated_tokens_total counter"]
            out += [f'palikit_model_generated_tokens_total{{model="{m}"}} {t}'
                    for m, (_, t) in sorted(self.per_model.items())]
            for kind, rows in (("gauge", gauges), ("counter", counters)):
                for name, help_text, value in rows:
                    shown = f"{value:.6g}" if isinstance(value, float) else value
                    out += [f"# HELP palikit_{name} {help_text}", f"# TYPE palikit_{name} {kind}",
                            f"palikit_{name} {shown}"]
            return "\n".join(out) + "\n"
