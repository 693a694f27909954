"""Dynamic batching: one queue per model, one small state machine, one loop.

:class:`BatchQueue` is the whole policy and takes the time as an argument, so it is tested case by
case with a fake clock. A batch is flushed when

* its rows reach ``max_batch_size``, or
* every request that has arrived at this model has joined the queue (``joining == 0``): waiting
  longer could only add latency, and a fixed window would cost the lone caller 5-10× throughput, or
* the oldest request has waited ``max_queue_delay_ms`` while others were still arriving.

Requests whose tensors differ on a non-batch axis (or dtype) carry different keys and are never put
in one batch; each caller gets back exactly its own rows. A full queue answers 503; a request that
waits past its timeout answers 504 and leaves the queue, so neither hangs nor grows memory.
:class:`Batcher` drives the queue from asyncio. The model runs in a worker thread, so the event
loop parses the next requests meanwhile; a fast model serving a lone caller runs inline instead,
because the hop to a thread would cost more than the model. An engine that runs several calls at once
on separate cores (OpenVINO with several streams: ``EngineBase.parallel_requests``) gets up to that many
batches in flight, each in its own worker thread; the queue forms the next batch as soon as one of them
is free. With one (onnxruntime, and OpenVINO on one stream), a batch runs while the next one gathers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from slipstream.errors import RequestTimeoutError, ServerBusyError
from slipstream.serve.settings import BatchSettings

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


@dataclass(slots=True, eq=False)
class Pending:
    """One queued request."""

    feeds: Arrays
    rows: int
    key: Hashable
    enqueued_at: float
    deadline: float
    future: asyncio.Future[Arrays] | None = None
    queue_s: float = 0.0


@dataclass(slots=True)
class Decision:
    """What the loop should do now: run ``batch``, fail ``expired``, and sleep until ``wake_at``."""

    batch: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    wake_at: float | None = None


class BatchQueue:
    """The batching policy as a pure state machine; ``now`` always comes from the caller."""

    def __init__(self, settings: BatchSettings, *, batchable: bool) -> None:
        self.settings = settings
        self.max_rows = settings.max_batch_size if batchable else 1
        self.delay_s = settings.max_queue_delay_ms / 1000.0
        self.items: deque[Pending] = deque()
        self.joining = 0  # requests routed to this model whose tensors are not queued yet

    def __len__(self) -> int:
        return len(self.items)

    def submit(self, item: Pending) -> None:
        if len(self.items) >= self.settings.max_queue_length:
            raise ServerBusyError(
                f"The queue is full ({self.settings.max_queue_length} requests waiting).",
                hint="Retry after the Retry-After interval, or add capacity.",
                retry_after_s=self.settings.retry_after_s,
            )
        self.items.append(item)

    def poll(self, now: float) -> Decision:
        decision = Decision()
        if any(item.deadline <= now for item in self.items):
            decision.expired = [item for item in self.items if item.deadline <= now]
            self.items = deque(item for item in self.items if item.deadline > now)
        if not self.items:
            return decision
        head = self.items[0]
        group, rows = [head], head.rows
        if rows < self.max_rows:
            for item in list(self.items)[1:]:
                if item.key != head.key:
                    continue
                if rows + item.rows > self.max_rows:
                    break
                group.append(item)
                rows += item.rows
        due = head.enqueued_at + self.delay_s
        if rows >= self.max_rows or self.joining == 0 or now >= due:
            if len(group) == len(self.items):
                self.items.clear()
            else:
                taken = {id(item) for item in group}
                self.items = deque(item for item in self.items if id(item) not in taken)
            decision.batch = group
            return decision
        decision.wake_at = min(due, min(item.deadline for item in self.items))
        return decision


def split_rows(outputs: Arrays, batch: list[Pending]) -> list[Arrays]:
    """Give each request its own rows of the batch's outputs, in order."""
    if len(batch) == 1:
        return [outputs]
    parts: list[Arrays] = [{} for _ in batch]
    for name, array in outputs.items():
        start = 0
        for part, item in zip(parts, batch, strict=True):
            part[name] = array[start : start + item.rows]
            start += item.rows
    return parts


def join_rows(batch: list[Pending]) -> Arrays:
    if len(batch) == 1:
        return batch[0].feeds
    return {name: np.concatenate([item.feeds[name] for item in batch]) for name in batch[0].feeds}


BatchObserver = Callable[[int, float], None]  # (rows, compute seconds)
InlinePolicy = Literal["never", "alone", "always"]


class Batcher:
    """Runs a :class:`BatchQueue` on the event loop; the model runs in worker threads, or inline.

    ``parallel``: most model calls in flight at once (the engine's ``parallel_requests``). Each caller's
    rows still come back from its own batch's call, whatever order the batches finish in.
    """

    def __init__(
        self,
        run: RunFn,
        settings: BatchSettings,
        *,
        batchable: bool,
        clock: Callable[[], float] = time.monotonic,
        on_batch: BatchObserver | None = None,
        name: str = "model",
        inline: InlinePolicy = "never",
        parallel: int = 1,
    ) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1; got {parallel}")  # a bug in the caller, not a refusal
        self.queue = BatchQueue(settings, batchable=batchable)
        self.parallel = parallel
        self.in_flight = 0  # model calls running now (never above ``parallel``)
        self.peak_in_flight = 0  # the most that ever ran at once: reported by benchmarks and tests
        self._running: dict[asyncio.Task[None], list[Pending]] = {}  # batches in their own tasks (parallel > 1)
        self._run = run
        self._timeout_s = settings.timeout_ms / 1000.0
        self._clock = clock
        self._on_batch = on_batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix=f"slipstream-{name}")
        self._name = name
        # A model call of a few µs costs less than the hop to a worker thread (~20-50 µs), so a fast
        # model serving a lone caller runs inline ("alone"). With others waiting, the worker thread lets
        # the event loop parse the next requests on the other core while onnxruntime (GIL released) runs.
        self.inline = inline

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self._name}")

    def slot(self) -> Slot:
        """A request's place at this model: ``with batcher.slot() as slot: await slot.infer(...)``.

        From entering until it joins the queue (or leaves without joining), the request counts as
        arriving, and the queue waits for it before flushing a partial batch.
        """
        return Slot(self)

    async def _join(self, feeds: Arrays, rows: int, key: Hashable) -> tuple[Arrays, float]:
        now = self._clock()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Arrays] = loop.create_future()
        item = Pending(feeds, rows, key, now, now + self._timeout_s, future)
        try:
            self.queue.submit(item)
        finally:
            self._wake.set()
        # The queue expires requests that wait too long; this timer also answers one whose model call
        # overruns (a hung session must not hang its callers). The late result is then dropped.
        timer = loop.call_later(self._timeout_s, self._expire, item)
        try:
            return await future, item.queue_s
        finally:
            timer.cancel()

    def _expire(self, item: Pending) -> None:
        _fail(item, self._timeout_error(item))
        self._wake.set()  # let the loop drop it from the queue now

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # With every call slot busy, the queue is left alone: requests keep gathering into the next batch
            # (and a request that waits too long is answered by its own timer, _expire).
            decision = self.queue.poll(self._clock()) if self.in_flight < self.parallel else Decision()
            for item in decision.expired:
                _fail(item, self._timeout_error(item))
            if decision.batch:
                # Counted here, before the call starts: the next poll must already see the slot as taken.
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                if self.parallel == 1:  # one call at a time: run it here, no task to create and wake on
                    await self._flush(loop, decision.batch)
                else:
                    task = loop.create_task(self._flush(loop, decision.batch))
                    self._running[task] = decision.batch
                    task.add_done_callback(self._finished)
                continue
            self._wake.clear()
            if decision.wake_at is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(decision.wake_at - self._clock(), 0.0))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake.set()  # a call slot is free: the loop may start the batch that gathered meanwhile

    async def _flush(self, loop: asyncio.AbstractEventLoop, batch: list[Pending]) -> None:
        """Run one batch that the loop has counted in ``in_flight``; the slot is given back when it ends."""
        try:
            await self._call(loop, batch)
        except asyncio.CancelledError:  # stop() while the batch runs: its callers are told, not left waiting
            _fail_all(batch)
            raise
        finally:
            self.in_flight -= 1

    async def _call(self, loop: asyncio.AbstractEventLoop, batch: list[Pending]) -> None:
        started = self._clock()
        for item in batch:
            item.queue_s = item.queue_s or started - item.enqueued_at
        rows = sum(item.rows for item in batch)
        try:
            alone = not self.queue.items and not self.queue.joining and self.in_flight == 1
            if self.inline == "always" or (self.inline == "alone" and alone):
                outputs = self._run(join_rows(batch))
            else:
                outputs = await loop.run_in_executor(self._executor, self._run, join_rows(batch))
        except Exception as exc:  # the model's error, typed by the engine
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            # One caller's bad values (an id past a table's end) must not fail the callers it shared the
            # call with: run each alone, so each gets its own answer or its own error.
            for item in batch:
                await self._call(loop, [item])
            return
        if self._on_batch is not None:
            self._on_batch(rows, self._clock() - started)
        for item, part in zip(batch, split_rows(outputs, batch), strict=True):
            if item.future is not None and not item.future.done():
                item.future.set_result(part)

    def _timeout_error(self, item: Pending) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"The request waited {self._clock() - item.enqueued_at:.3f} s for '{self._name}', "
            f"past its {self._timeout_s:.3f} s timeout.",
            hint="The model is overloaded; retry later or add capacity.",
        )

    async def stop(self) -> None:
        """Stop the loop; requests still queued, or in a batch still running, are answered 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        running = dict(self._running)
        for task in running:
            task.cancel()
        for task, batch in running.items():
            with contextlib.suppress(asyncio.CancelledError):
                await task
            _fail_all(batch)  # a task cancelled before it started never ran its own handler
        _fail_all(self.queue.items)
        self.queue.items.clear()
        self._executor.shutdown(wait=False)


class Slot:
    """One request's arrival at a :class:`Batcher` (see :meth:`Batcher.slot`); it joins the queue once."""

    __slots__ = ("_batcher", "_joined")

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._joined = False

    # A plain (not async) context manager: entering and leaving await nothing, and a request pays for no
    # coroutine objects there.
    def __enter__(self) -> Slot:
        self._batcher.queue.joining += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._joined:  # it left before joining (refused, cancelled): the queue stops waiting for it
            self._batcher.queue.joining -= 1
            self._batcher._wake.set()

    def infer(self, feeds: Arrays, rows: int, key: Hashable) -> Awaitable[tuple[Arrays, float]]:
        """Queue the request's tensors; awaits its outputs and the seconds it queued."""
        if self._joined:
            raise RuntimeError("a slot joins its batcher's queue once")  # a bug in the caller, not a refusal
        self._joined = True
        self._batcher.queue.joining -= 1
        return self._batcher._join(feeds, rows, key)


def _fail(item: Pending, exc: BaseException) -> None:
    if item.future is not None and not item.future.done():
        item.future.set_exception(exc)


def _fail_all(items: Iterable[Pending]) -> None:
    for item in items:
        _fail(item, ServerBusyError("The server is shutting down.", hint="Retry on another replica."))
