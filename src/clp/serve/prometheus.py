"""The server's counters, rendered in the Prometheus text exposition format (version 0.0.4).

Written out by hand: a few counters, gauges and two histograms do not justify a dependency,
and the format is small (``# HELP``, ``# TYPE``, then ``name{labels} value`` lines).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
KNOWN_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics"}


class Histogram:
    """Cumulative buckets, sum and count: what Prometheus' histogram_quantile reads."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [
            f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc), for spotting leaks under load."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ServerMetrics:
    """Everything /metrics reports. Updated from the event loop and the generation thread,
    hence the lock; gauges of the queue are read live through callables."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (path, status) -> answered requests
        self.generations: Counter = Counter()  # (mode, stop_reason) -> finished generations
        self.completion_tokens: Counter = Counter()  # mode -> tokens
        self.prompt_tokens: Counter = Counter()  # mode -> tokens
        self.forward_passes: Counter = Counter()  # mode -> backbone forwards
        self.dropped = 0  # clients gone before their generation started
        self.rejected = 0  # 429: the queue was full
        self.latency = Histogram()
        self.first_token = Histogram()
        self.queue_length: Callable[[], int] = lambda: 0
        self.running: Callable[[], int] = lambda: 0
        self.queue_capacity = 0

    def request(self, path: str, status: int) -> None:
        with self.lock:
            self.requests[path if path in KNOWN_PATHS else "other", status] += 1

    def generation(self, mode: str, stop_reason: str, stats, latency: float) -> None:
        """One finished (or cancelled) generation and its stats."""
        with self.lock:
            self.generations[mode, stop_reason] += 1
            self.completion_tokens[mode] += stats.new_tokens
            self.prompt_tokens[mode] += stats.prompt_tokens
            self.forward_passes[mode] += stats.forward_passes
            if stop_reason != "cancelled":
                self.latency.observe(latency)

    def first_text(self, seconds: float) -> None:
        with self.lock:
            self.first_token.observe(seconds)

    def render(self) -> str:
        """The text exposition format, one block per metric."""
        with self.lock:
            blocks = [
                self._block(
                    "clp_requests_total",
                    "counter",
                    "HTTP requests answered.",
                    [(_labels(path=p, status=s), n) for (p, s), n in sorted(self.requests.items())],
                ),
                self._block(
                    "clp_generations_total",
                    "counter",
                    "Generations ended, by mode and stop reason (cancelled: the "
                    "client disconnected).",
                    [
                        (_labels(mode=m, stop_reason=r), n)
                        for (m, r), n in sorted(self.generations.items())
                    ],
                ),
                self._per_mode(
                    "clp_completion_tokens_total",
                    "counter",
                    "Tokens generated.",
                    self.completion_tokens,
                ),
                self._per_mode(
                    "clp_prompt_tokens_total", "counter", "Prompt tokens read.", self.prompt_tokens
                ),
                self._per_mode(
                    "clp_forward_passes_total",
                    "counter",
                    "Backbone forward passes.",
                    self.forward_passes,
                ),
                self._block(
                    "clp_tokens_per_forward",
                    "gauge",
                    "Generated tokens per backbone forward, over all generations.",
                    [
                        (_labels(mode=m), round(n / self.forward_passes[m], 4))
                        for m, n in sorted(self.completion_tokens.items())
                        if self.forward_passes[m]
                    ],
                ),
                self._block(
                    "clp_requests_dropped_total",
                    "counter",
                    "Requests whose client left before their generation started.",
                    [("", self.dropped)],
                ),
                self._block(
                    "clp_requests_rejected_total",
                    "counter",
                    "Requests refused with 429 because the queue was full.",
                    [("", self.rejected)],
                ),
                self._block(
                    "clp_queue_length",
                    "gauge",
                    "Requests waiting for the backbone.",
                    [("", self.queue_length())],
                ),
                self._block(
                    "clp_queue_capacity",
                    "gauge",
                    "Requests that may wait before new ones get 429.",
                    [("", self.queue_capacity)],
                ),
                self._block(
                    "clp_requests_running",
                    "gauge",
                    "Generations running now.",
                    [("", self.running())],
                ),
                self._histogram(
                    "clp_request_latency_seconds",
                    "From the request's arrival to its last token.",
                    self.latency,
                ),
                self._histogram(
                    "clp_time_to_first_token_seconds",
                    "From a streamed request's arrival to its first text.",
                    self.first_token,
                ),
            ]
        rss = rss_bytes()
        if rss is not None:
            blocks.append(
                self._block(
                    "process_resident_memory_bytes", "gauge", "Resident memory.", [("", rss)]
                )
            )
        return "".join(blocks)

    @staticmethod
    def _block(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> str:
        lines = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(lines) + "\n"

    def _per_mode(self, name: str, kind: str, help: str, counts: Counter) -> str:
        samples = [(_labels(mode=m), n) for m, n in sorted(counts.items())]
        return self._block(name, kind, help, samples)

    def _histogram(self, name: str, help: str, hist: Histogram) -> str:
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
