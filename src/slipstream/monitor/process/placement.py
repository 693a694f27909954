"""Which CPUs a monitored server's event loop and its monitor process run on: serving first.

The server's throughput is bound by its event-loop thread (it holds the GIL for the HTTP work). The monitor
process is woken by that server every 50 ms, and the kernel likes to run a woken process where its waker ran:
on the event loop's CPU, whose time it then takes while another CPU idles.

``auto`` (the default): when the server may use at least two CPUs, the monitor process gets the last of them,
and the event-loop thread, with the threads it starts from then on (the models' inference threads), all the
others. Threads started before (onnxruntime's own pools among them) keep every CPU, and so does the pool of a
version loaded later (:func:`unpinned`). On a 2-CPU machine the server's Python then runs on one CPU and the
monitor process on the other. Measured there (``benchmarks/monitoring.py``, side by side, paired): the digits
MLP at 64 connections kept 0.90-1.05 of the unmonitored throughput over six runs with the monitor process on a
CPU of its own, 0.78-0.94 (median 0.86) over ten when the kernel placed both; at 8 connections placement made no
measurable difference; MiniLM int8 (4 ms a request) lost nothing measurable from sharing a CPU between event
loop and inference (0.98 vs 0.96 at 8 callers). ``none``: the kernel decides. Nothing is pinned where the
platform has no CPU affinity (Linux only).

The plan starts from the CPUs this process may use, so several servers on one machine are spread by starting
each under its own CPU set (``taskset -c 0-3 slipstream serve ...``); otherwise their monitor processes all
share the last CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("slipstream.serve")

PlacementMode = Literal["auto", "none"]


@dataclass(frozen=True)
class Placement:
    """``loop`` and ``monitor`` are CPU sets, or None to leave that side to the kernel."""

    allowed: frozenset[int]
    loop: frozenset[int] | None = None
    monitor: frozenset[int] | None = None

    def describe(self) -> str:
        if self.loop is None or self.monitor is None:
            return f"CPUs {cpu_list(self.allowed)} shared, placed by the kernel"
        return f"monitor process on CPU {cpu_list(self.monitor)}, event loop on CPU {cpu_list(self.loop)}"


def cpu_list(cpus: frozenset[int]) -> str:
    """``cpus`` as text, e.g. ``0,2,3`` (how the monitor process is told its CPUs); ``-`` for none."""
    return ",".join(str(c) for c in sorted(cpus)) or "-"


def parse_cpu_list(text: str) -> frozenset[int]:
    """The inverse of :func:`cpu_list`."""
    return frozenset() if text == "-" else frozenset(int(c) for c in text.split(","))


def _affinity() -> frozenset[int]:  # the calling thread's CPUs (Linux keeps them per thread)
    get = getattr(os, "sched_getaffinity", None)
    return frozenset(get(0)) if get is not None else frozenset()


def plan(mode: PlacementMode) -> Placement:
    """The placement for this process's CPUs (see the module docstring)."""
    allowed = _affinity()
    if mode == "none" or len(allowed) < 2:
        return Placement(allowed)
    ordered = sorted(allowed)
    return Placement(allowed, loop=frozenset(ordered[:-1]), monitor=frozenset(ordered[-1:]))


def pin_thread(cpus: frozenset[int] | None) -> bool:
    """Run the calling thread (and the threads it starts from now on) on ``cpus`` only; False when not done."""
    setter = getattr(os, "sched_setaffinity", None)
    if not cpus or setter is None:
        return False
    try:
        setter(0, cpus)  # pid 0: the calling thread (Linux keeps an affinity per thread)
    except OSError as exc:  # e.g. a container whose CPU set changed since: serve on, unplaced
        log.warning("could not place this thread on CPU %s: %s", cpu_list(cpus), exc)
        return False
    return True


@contextmanager
def unpinned(placement: Placement | None) -> Iterator[None]:
    """Run the block on every CPU the process may use, then put the calling thread back where it was.

    For loading a model: onnxruntime's inference pool takes the CPUs of the thread that creates the session, so
    a version loaded after startup (from a thread the pinned event loop started) would otherwise run on the
    event loop's CPUs only, unlike the versions loaded before the loop was pinned."""
    before = _affinity()
    wanted = placement.allowed if placement is not None and placement.loop is not None else None
    moved = wanted is not None and bool(before) and before != wanted and pin_thread(wanted)
    try:
        yield
    finally:
        if moved:
            pin_thread(before)
