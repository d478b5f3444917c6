"""One backbone, many requests: a bounded queue in front of a single generation thread.

The runtime holds one sequence's KV cache, so generations run one after another on one
dedicated thread, ``TORCH_THREAD`` (the event loop stays free to accept, validate, stream and
refuse). Each
job carries its own event queue, so a request only ever sees the tokens of its own
generation, and its own cancellation flag, which the decode loop reads before every forward:
a client that disconnects stops its generation at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clp.api import Model
from clp.decoding import Policy, Result, generate
from clp.serve.prometheus import ServerMetrics
from clp.serve.protocol import ApiError, GenRequest

# torch's OpenMP gives every thread that runs a parallel op a team of its own, and once a
# process holds more team threads than cores, every team's workers sleep between ops instead
# of spinning: a decode step here then costs 1.7-2x as much. So the server does all its torch
# work (loading the model and its artifacts, every generation) on this one thread.
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clp-torch")


def on_torch_thread(fn, *args):
    """``fn(*args)`` run on the torch thread, waited for (from synchronous code)."""
    return TORCH_THREAD.submit(fn, *args).result()


@dataclass
class Job:
    """A validated request on its way through the queue, and what comes back from it."""

    request: GenRequest
    policy: Policy
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def cancel(self) -> None:
        """Ask the generation to stop before its next forward (a no-op once it ended)."""
        self.cancelled.set()

    def push(self, kind: str, value: object) -> None:
        """Hand an event from the generation thread to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            pass

    async def stream(self) -> AsyncIterator[tuple[str, object]]:
        """("text", piece) events, then one ("done", Result) or ("error", ApiError). Pieces
        already waiting are joined, so a fast generation is not one chunk per character."""
        while True:
            kind, value = await self.events.get()
            if kind == "text":
                pieces, pending = [value], None
                while pending is None and not self.events.empty():
                    item = self.events.get_nowait()
                    if item[0] == "text":
                        pieces.append(item[1])
                    else:
                        pending = item
                yield "text", "".join(pieces)
                if pending is None:
                    continue
                kind, value = pending
            yield kind, value
            return

    async def result(self) -> Result:
        """The finished generation (non-streamed requests); raises its ApiError."""
        async for kind, value in self.stream():
            if kind == "error":
                raise value
            if kind == "done":
                return value
        raise AssertionError("a job's stream ends with done or error")


class Engine:
    """The queue and the generation thread for one ``Model``."""

    def __init__(self, model: Model, max_queue: int, metrics: ServerMetrics):
        self.model = model
        self.max_queue = max_queue
        self.metrics = metrics
        self.queue: asyncio.Queue[Job] | None = None
        self.current: Job | None = None
        self.task: asyncio.Task | None = None
        metrics.queue_capacity = max_queue
        metrics.queue_length = lambda: self.queue.qsize() if self.queue else 0
        metrics.running = lambda: int(self.current is not None)

    async def start(self) -> None:
        """Create the queue on the server's loop and start the worker that drains it."""
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self.task = asyncio.create_task(self._work(), name="clp-engine")

    async def stop(self) -> None:
        """Cancel what runs, let the thread finish its current step, and stop."""
        if self.current:
            self.current.cancel()
        if self.task:
            self.task.cancel()
        # the thread takes jobs in order: this returns once the cancelled one has ended
        await asyncio.get_running_loop().run_in_executor(TORCH_THREAD, lambda: None)

    def submit(self, job: Job) -> None:
        """Queue ``job``, or refuse it at once (429) when ``max_queue`` requests wait."""
        assert self.queue is not None, "Engine.start() runs in the app's lifespan"
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            with self.metrics.lock:
                self.metrics.rejected += 1
            raise ApiError(
                429,
                f"the server is busy: {self.max_queue} requests are already waiting",
                type="rate_limit_exceeded",
                code="queue_full",
            ) from None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            if job.cancelled.is_set():  # its client left while it waited
                with self.metrics.lock:
                    self.metrics.dropped += 1
                job.finished = True
                job.push("error", ApiError(499, "the client disconnected", code="cancelled"))
                continue
            self.current = job
            try:
                await loop.run_in_executor(TORCH_THREAD, self._run, job)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        """The decode loop for one job, on the generation thread (never raises)."""
        req, model = job.request, self.model
        first: list[bool] = []

        def on_text(piece: str) -> None:
            if not first:
                first.append(True)
                self.metrics.first_text(time.perf_counter() - job.arrived)
            job.push("text", piece)

        try:
            result = generate(
                model.runtime,
                model.tokenizer,
                req.prompt_ids,
                policy=job.policy,
                max_new_tokens=req.max_tokens,
                sampling=req.sampling,
                eos_ids=model.backbone.eos_token_ids,
                stop=req.stop,
                context_length=model.backbone.context_length,
                on_text=on_text if req.stream else None,
                should_stop=job.cancelled.is_set,
            )
        except Exception as exc:  # a bug or a runtime failure: this request fails, not the server
            job.finished = True
            job.push("error", ApiError(500, f"generation failed: {exc}", type="server_error"))
            return
        job.finished = True
        latency = time.perf_counter() - job.arrived
        self.metrics.generation(req.mode, result.stop_reason, result.stats, latency)
        job.push("done", result)
