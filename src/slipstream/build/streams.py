"""OpenVINO inference streams for a winner: N batches in flight on N streams against one stream, measured.

One stream with every core is the fastest way through one batch. N streams split the cores, so each batch
takes longer, but N of them run at once: a server under load (whose batcher keeps
``EngineBase.parallel_requests`` batches in flight) may answer more rows per second that way. Measured on
MiniLM f32, batch 32, 2 cores: 1.12-1.25× one stream's throughput. Whether it holds depends on the model and
the CPU, so the build times it: the same N batches, one after another on one stream, against all at once on N
streams, in alternation (evaluate/sidebyside.py). Streams are chosen only for the ``throughput`` objective,
only when the gain is stable and at least the recipe's ``min_speedup``; the measurement is recorded either
way, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydantic import Field

from slipstream.evaluate.sidebyside import SideBySide, interleave, side_by_side
from slipstream.frozen import Frozen
from slipstream.runtime.base import EngineBase


class StreamsTrial(Frozen):
    """What N streams gave against one, and whether the winner keeps them."""

    streams: int = Field(ge=2, description="The streams tried (the serving core count).")
    timing: SideBySide = Field(description="ms per N batches: one stream (reference) against N (subject).")
    chosen: bool = Field(description="Whether the bundle records N streams (resolved session inter_op_threads).")
    reason: str = Field(description="Why it does or does not, with the measured ratio.")


def time_streams(
    open_at: Callable[[int], EngineBase],
    feeds: Mapping[str, np.ndarray],
    streams: int,
    *,
    min_time_s: float,
    max_time_s: float,
) -> SideBySide:
    """ms per ``streams`` batches: one after another on a one-stream engine, against all at once (a thread
    each) on a ``streams``-stream engine; both built by ``open_at(n_streams)`` at the same total threads."""
    one, many = open_at(1), open_at(streams)
    one_feeds, many_feeds = one.check_inputs(feeds), many.check_inputs(feeds)
    with ThreadPoolExecutor(streams, thread_name_prefix="slipstream-streams") as pool:

        def in_turn() -> None:
            for _ in range(streams):
                one.run(one_feeds, check=False)

        def at_once() -> None:
            for future in [pool.submit(many.run, many_feeds, check=False) for _ in range(streams)]:
                future.result()

        reference_ms, subject_ms = interleave(
            in_turn, at_once, warmup_runs=2, min_runs=5, min_time_s=min_time_s, max_time_s=max_time_s
        )
    return side_by_side("1 stream", f"{streams} streams", reference_ms, subject_ms)


def decide_streams(timing: SideBySide, streams: int, *, objective: str, min_speedup: float) -> StreamsTrial:
    """Keep ``streams`` only for the throughput objective, on a stable gain of at least ``min_speedup``."""
    measured = (
        f"{streams} streams against one, rows per second: {timing.ratio_text()}"
        if timing.unstable
        else f"{streams} streams answered {timing.ratio:.2f}× the rows per second of one stream"
    )
    if objective != "throughput":
        reason = (
            f"kept 1 stream: the objective is {objective}, and each batch takes longer on a stream with a "
            f"share of the cores ({measured}; `serve --streams {streams}` trades latency for it)"
        )
        return StreamsTrial(streams=streams, timing=timing, chosen=False, reason=reason)
    if timing.unstable:
        return StreamsTrial(streams=streams, timing=timing, chosen=False, reason=f"kept 1 stream: {measured}")
    if timing.ratio < min_speedup:
        reason = f"kept 1 stream: {measured}, below the {min_speedup:g}× a change needs"
        return StreamsTrial(streams=streams, timing=timing, chosen=False, reason=reason)
    return StreamsTrial(streams=streams, timing=timing, chosen=True, reason=f"chose {measured}")
