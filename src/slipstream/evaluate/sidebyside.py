"""Ratios of two timings taken side by side: alternating calls, both warmed up, each with its spread.

A ratio of two timings taken at different moments on a shared machine measures the machine as much as the
models: under load, torch eager on the digits recipe took 71 ms per batch against 2.8 ms quiet, and the
build printed "154× faster". Here the two callables run in alternation (A, B, A, B, ...), so load that comes
and goes touches both alike, and each side keeps its p50, p90 and number of runs. When either side's p90 is
more than twice its p50 the spread is too wide to support a ratio, and the ratio is shown as "unstable (...)".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from pydantic import Field

from slipstream.frozen import Frozen

Clock = Callable[[], float]

# p90 / p50 above this on either side, and the ratio of the two p50s is not shown as a number.
UNSTABLE_SPREAD = 2.0

# Target settings for an engine timed in alternation with another (interleave): onnxruntime without intra-op
# spinning. A spinning session's idle threads take the cores the other side's next call needs. Measured on
# the digits CNN at 2 threads (benchmarks/interleave_bias.py): OpenVINO against a spinning onnxruntime 0.40×
# call by call, 0.79× with spinning off, 0.68× in blocks where nothing interleaves; onnxruntime against torch
# eager 3.45× with spinning, 2.36× without. Off, onnxruntime runs ~6-8 % below its best: the safer figure.
ALTERNATING: dict[str, object] = {"intra_op_spinning": False}


class Spread(Frozen):
    """One side's per-call latencies, summarised."""

    p50_ms: float = Field(description="Median latency of one call, in milliseconds.")
    p90_ms: float = Field(description="90th percentile latency of one call, in milliseconds.")
    n: int = Field(description="How many timed calls the percentiles are over.")

    @property
    def wide(self) -> bool:
        return self.p90_ms > UNSTABLE_SPREAD * self.p50_ms

    def text(self) -> str:
        return f"p50 {self.p50_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, n={self.n}"


class SideBySide(Frozen):
    """How many times faster ``subject`` is than ``reference``, both timed in alternation."""

    reference: str = Field(description="What the subject is compared with (e.g. 'baseline', 'torch eager').")
    subject: str = Field(description="What is being compared (a candidate's name).")
    reference_timing: Spread = Field(description="The reference's latencies, taken interleaved with the subject's.")
    subject_timing: Spread = Field(description="The subject's latencies, taken interleaved with the reference's.")
    ratio: float = Field(description="reference p50 / subject p50 (> 1: the subject is faster).")
    unstable: bool = Field(description=f"Either side's p90 is more than {UNSTABLE_SPREAD:g}× its p50.")
    threads: int | None = Field(default=None, description="The thread count both sides ran with, when matched.")

    def ratio_text(self) -> str:
        """'3.50×', or 'unstable (...)' with the spread that makes the ratio meaningless."""
        if not self.unstable:
            return f"{self.ratio:.2f}×"
        wide = [
            f"{name} p90 {t.p90_ms:.3f} ms is over {UNSTABLE_SPREAD:g} times its p50 {t.p50_ms:.3f} ms"
            for name, t in ((self.reference, self.reference_timing), (self.subject, self.subject_timing))
            if t.wide
        ]
        return f"unstable ({'; '.join(wide)}; n={self.subject_timing.n})"

    def text(self) -> str:
        """The full sentence: ratio, both spreads, and the thread count."""
        threads = f" at {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        return (
            f"{self.subject} vs {self.reference}{threads}, timed side by side: {self.ratio_text()} "
            f"({self.reference} {self.reference_timing.text()}; {self.subject} {self.subject_timing.text()})"
        )


def spread(samples_ms: Sequence[float]) -> Spread:
    """p50, p90 and n of per-call latencies."""
    if not samples_ms:
        raise ValueError("no samples")  # a bug: interleave() always times at least min_runs calls
    arr = np.asarray(samples_ms, dtype=np.float64)
    return Spread(p50_ms=float(np.percentile(arr, 50)), p90_ms=float(np.percentile(arr, 90)), n=len(arr))


def side_by_side(
    reference: str,
    subject: str,
    reference_ms: Sequence[float],
    subject_ms: Sequence[float],
    *,
    threads: int | None = None,
) -> SideBySide:
    """The ratio of two sets of interleaved samples, marked unstable when either spread is too wide."""
    ref, sub = spread(reference_ms), spread(subject_ms)
    return SideBySide(
        reference=reference,
        subject=subject,
        reference_timing=ref,
        subject_timing=sub,
        ratio=ref.p50_ms / sub.p50_ms if sub.p50_ms > 0 else float("inf"),
        unstable=ref.wide or sub.wide,
        threads=threads,
    )


def interleave(
    reference: Callable[[], object],
    subject: Callable[[], object],
    *,
    warmup_runs: int = 5,
    min_runs: int = 20,
    max_runs: int = 2000,
    min_time_s: float = 0.5,
    max_time_s: float = 5.0,
    clock: Clock = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Per-call latencies (ms) of two callables run in alternation, after ``warmup_runs`` calls of each.

    Stops once both have ``min_runs`` timings and ``min_time_s`` has passed, or at ``max_time_s``/``max_runs``.
    Which one goes first alternates too, so neither always runs on a cache the other just warmed.
    """
    for _ in range(warmup_runs):
        reference()
        subject()
    times: tuple[list[float], list[float]] = ([], [])
    start = clock()
    pair = ((reference, times[0]), (subject, times[1]))
    while len(times[1]) < max_runs:
        order = pair if len(times[1]) % 2 == 0 else pair[::-1]
        for fn, out in order:
            t0 = clock()
            fn()
            out.append((clock() - t0) * 1000.0)
        elapsed = clock() - start
        if len(times[1]) >= min_runs and (elapsed >= min_time_s or elapsed >= max_time_s):
            break
    return times
