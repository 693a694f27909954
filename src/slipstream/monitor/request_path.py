"""What a server calls per request, before and after inference (:class:`RequestPath`: :meth:`~RequestPath.screen`
and :meth:`~RequestPath.observe`), and the check of the labels it receives (:func:`check_feedback`).

Shared by the in-process :class:`~slipstream.monitor.service.Monitor` and the server's proxy of a monitor in its
own process (slipstream.monitor.process.proxy), which then needs none of the monitor's statistics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from slipstream.errors import InputError, first_few
from slipstream.monitor.records import Feedback

if TYPE_CHECKING:
    from slipstream.monitor.config import MonitorConfig
    from slipstream.monitor.ingest import PendingRow
    from slipstream.monitor.threats import OODScorer, SecurityCounters


@dataclass(frozen=True, slots=True)
class Screening:
    """The out-of-distribution verdict on one request's rows."""

    scores: np.ndarray | None
    reject: bool

    @property
    def max_score(self) -> float | None:
        return None if self.scores is None or self.scores.size == 0 else float(self.scores.max())


class RequestPath:
    """What a server calls per request: :meth:`screen` before inference, :meth:`observe` after; neither ever
    raises. Shared by :class:`Monitor` and the server's proxy of one in its monitor process, which differ
    only in where an observed request goes (:meth:`_submit`) and where a lost one is counted (:meth:`_lost`)."""

    scorer: OODScorer | None
    config: MonitorConfig
    counters: SecurityCounters
    screen_errors: int

    def _now(self) -> float:
        return time.time()

    def _submit(self, item: PendingRow) -> bool:
        """Queue one observed request; False when the bound was reached (counted by the implementation)."""
        raise NotImplementedError

    def _lost(self) -> None:
        """Count one request that could not be queued."""
        raise NotImplementedError

    def screen(self, inputs: Mapping[str, np.ndarray]) -> Screening:
        """Out-of-distribution scores for a request's rows, before inference; counts OOD rows and, with
        ``reject_ood_above`` set, the refusal. A failure gives no scores and is counted (``screen_errors``)."""
        if self.scorer is None:
            return Screening(None, False)
        t = self.config.threats
        try:
            one = self.scorer.score_one(inputs)  # one row, the usual request: Python floats, no reductions
            scores = np.array([one]) if one is not None else self.scorer.score(inputs)
            worst = one if one is not None else float(scores.max()) if scores.size else -np.inf  # the worst row
            over = int(worst > t.ood_threshold) if one is not None else int(np.sum(scores > t.ood_threshold))
        except Exception:  # screening must never fail a request
            self.screen_errors += 1
            return Screening(None, False)
        reject = t.reject_ood_above is not None and worst > t.reject_ood_above
        self.counters.ood(over, reject)
        if reject:
            self.counters.rejected("out_of_distribution")
        return Screening(scores, reject)

    def observe(
        self,
        request_id: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        *,
        latency_s: float,
        group: str | None = None,
        key_id: str | None = None,
        screening: Screening | None = None,
    ) -> bool:
        """Record one served request (after inference): about a microsecond, never blocks or raises.

        The arrays are referenced, not copied: do not modify them afterwards. The work (features, window,
        scores, log records) happens later, off the request path. Returns False when the pending buffer was
        full (the request is then counted in ``ingest_dropped``)."""
        try:
            scores = screening.scores if screening is not None else None
            # A plain tuple in Pending's field order: constructing a Pending would cost the request ~0.5 µs.
            return self._submit((request_id, self._now(), inputs, outputs, latency_s, group, key_id, scores))
        except Exception:  # the monitor must never fail a request; the loss is counted
            self._lost()
            return False


def check_feedback(items: Iterable[tuple[str, float]], now: float) -> list[Feedback]:
    """Labels as :class:`Feedback`; raises InputError (400) naming every bad entry, so that a client's bad
    batch is refused whole (a label must be a finite number, an id a non-empty string)."""
    checked: list[Feedback] = []
    problems: list[str] = []
    for rid, label in items:
        try:
            value = float(label)
        except (TypeError, ValueError):
            value = float("nan")
        if not isinstance(rid, str) or not rid or not np.isfinite(value):
            problems.append(f"{rid!r}: {label!r}")
        else:
            checked.append(Feedback(rid, value, now))
    if problems:
        raise InputError(
            f"Feedback needs a non-empty request id and a finite numeric label each; got {first_few(problems)}.",
            hint="Send labels as numbers (class index or value), keyed by the request id the server returned.",
        )
    return checked
