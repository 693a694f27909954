"""From served requests to monitor state, off the request path.

The request path only appends a small tuple to a bounded deque (:meth:`Ingestor.submit`, about a
microsecond, never blocks or raises; a full deque drops and counts). :func:`columns` turns a list of those
into :class:`Columns`, one per tensor signature: the rows of every request side by side, cheap to build and
to send to another process (the server ships them to its monitor process). :meth:`Ingestor.ingest` then does
the work, vectorized: features, out-of-distribution scores, predictions, the rolling drift window, per-key
extraction and boundary-probing tracking, sampling, and the prediction-log batch. :meth:`Ingestor.drain` is
both in one process.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Final, NamedTuple

import numpy as np

from slipstream.monitor.categorical import by_tensor, tensor_codes
from slipstream.monitor.content import EMBEDDING_OUTPUT
from slipstream.monitor.features import featurize
from slipstream.monitor.probing import top2_margin
from slipstream.monitor.profile import Profile, predictions
from slipstream.monitor.records import PredictionBatch
from slipstream.monitor.store import Store
from slipstream.monitor.threats import ExtractionWatch, OODScorer, SecurityCounters

log = logging.getLogger(__name__)


class Pending(NamedTuple):
    """One served request waiting to be ingested (the arrays are the request's own; nothing is copied).

    The request path queues a plain tuple of these fields in this order (:data:`PendingRow`): a NamedTuple's or
    a dataclass's constructor is a Python-level call, about half a microsecond a request on the event loop
    (measured), so everything that reads a queued request indexes it by position."""

    request_id: str
    ts: float
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    latency_s: float
    group: str | None
    key_id: str | None
    scores: np.ndarray | None


PendingRow = tuple[
    str, float, Mapping[str, np.ndarray], Mapping[str, np.ndarray], float, str | None, str | None, np.ndarray | None
]
"""What the request path queues: :class:`Pending`'s fields, in order (a Pending is one)."""
# Positions in a PendingRow (Final: literal to mypy, so that indexing by them is typed).
_RID: Final = 0
_TS: Final = 1
_INPUTS: Final = 2
_OUTPUTS: Final = 3
_LATENCY: Final = 4
_GROUP: Final = 5
_KEY: Final = 6
_SCORES: Final = 7


@dataclass(slots=True)
class Columns:
    """Requests with the same tensor names, row shapes and dtypes, their rows concatenated.

    ``scores`` holds every row's screening score when the requests were screened (NaN for a request that
    was not), else None."""

    request_ids: list[str]
    ts: np.ndarray
    latency_s: np.ndarray
    groups: list[str | None]
    key_ids: list[str | None]
    counts: np.ndarray
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    scores: np.ndarray | None

    @property
    def requests(self) -> int:
        return len(self.request_ids)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _columns_of(items: list[PendingRow]) -> Columns:
    n = len(items)
    per_input = {k: [it[_INPUTS][k] for it in items] for k in items[0][_INPUTS]}
    if not per_input:
        raise ValueError("a request with no input tensors")
    counts = np.fromiter(map(len, next(iter(per_input.values()))), dtype=np.int64, count=n)
    scores = None
    given = list(map(_scores, items))
    if any(s is not None for s in given):
        scores = np.concatenate(
            [s if s is not None else np.full(r, np.nan) for s, r in zip(given, counts.tolist(), strict=True)]
        )
    return Columns(
        request_ids=list(map(_request_id, items)),
        ts=np.fromiter(map(_ts, items), dtype=np.float64, count=n),
        latency_s=np.fromiter(map(_latency, items), dtype=np.float64, count=n),
        groups=list(map(_group, items)),
        key_ids=list(map(_key_id, items)),
        counts=counts,
        inputs={k: _stack(v) for k, v in per_input.items()},
        outputs={k: _stack([it[_OUTPUTS][k] for it in items]) for k in items[0][_OUTPUTS]},
        scores=scores,
    )


_request_id, _ts, _latency = itemgetter(_RID), itemgetter(_TS), itemgetter(_LATENCY)
_group, _key_id, _scores = itemgetter(_GROUP), itemgetter(_KEY), itemgetter(_SCORES)


def _signature(item: PendingRow) -> tuple[object, ...]:
    return (
        tuple([(k, np.shape(v)[1:], np.asarray(v).dtype.str) for k, v in item[_INPUTS].items()]),
        tuple([(k, np.shape(v)[1:], np.asarray(v).dtype.str) for k, v in item[_OUTPUTS].items()]),
    )


def columns(items: list[PendingRow]) -> tuple[list[Columns], int]:
    """The requests as :class:`Columns`, and how many could not be taken (malformed; counted by the caller).

    The common case, every request of one model version alike, is one concatenation per tensor (about a
    microsecond per request); only when that fails are the requests grouped by signature."""
    if not items:
        return [], 0
    try:
        n_in, n_out = len(items[0][_INPUTS]), len(items[0][_OUTPUTS])
        # As many tensors as the first request each: _columns_of takes every request's by the first's names,
        # so a name it lacks is a KeyError, and equal counts with every name found are the same names
        # (counting is a third of the cost of comparing the names, per request, on the event loop).
        if all(len(it[_INPUTS]) == n_in and len(it[_OUTPUTS]) == n_out for it in items):
            cols = _columns_of(items)
            if all(v.ndim >= 1 for v in (*cols.inputs.values(), *cols.outputs.values())):
                return [cols], 0
    except (ValueError, TypeError, AttributeError, StopIteration, KeyError):  # not alike: group them below
        pass
    groups: dict[tuple[object, ...], list[PendingRow]] = {}
    bad = 0
    for item in items:
        try:
            groups.setdefault(_signature(item), []).append(item)
        except Exception:  # one malformed request must not stop the others
            bad += 1
    out = []
    for group in groups.values():
        try:
            out.append(_columns_of(group))
        except Exception:
            bad += len(group)
    return out, bad


class Ring:
    """A fixed-capacity ring of rows; appends copy, views return rows oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: np.ndarray | None = None
        self._next = 0
        self._size = 0

    def add(self, rows: np.ndarray) -> None:
        rows = rows[-self.capacity :]
        if self._data is None:
            self._data = np.empty((self.capacity, *rows.shape[1:]), dtype=rows.dtype)
        n = rows.shape[0]
        first = min(n, self.capacity - self._next)
        self._data[self._next : self._next + first] = rows[:first]
        if n > first:
            self._data[: n - first] = rows[first:]
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def view(self) -> np.ndarray | None:
        if self._data is None or self._size == 0:
            return None
        if self._size < self.capacity:
            return self._data[: self._size].copy()
        return np.concatenate([self._data[self._next :], self._data[: self._next]])


@dataclass(frozen=True)
class WindowView:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    predicted: np.ndarray | None
    ood: np.ndarray | None
    latency_ms: np.ndarray | None


def _row_stats(x: np.ndarray) -> np.ndarray:
    """Mean, std, min and max of each row: ``[rows, 4]``, sums in float64 over the rows' own dtype (no copy),
    the std from the sums of values and of squares (two passes fewer than ``np.std``)."""
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype.kind not in "f":
        flat = flat.astype(np.float64)
    n = max(flat.shape[1], 1)
    mean = np.add.reduce(flat, axis=1, dtype=np.float64) / n
    square = np.einsum("ij,ij->i", flat, flat, dtype=np.float64) / n
    std = np.sqrt(np.maximum(square - mean * mean, 0.0))
    return np.stack([mean, std, flat.min(axis=1), flat.max(axis=1)], axis=1)


@dataclass(frozen=True)
class IngestSettings:
    model: str
    version: str
    sample_rate: float
    log_raw_inputs: bool
    max_logged_output_values: int
    window_rows: int
    max_pending_requests: int
    ood_threshold: float
    seed: int | None


class Ingestor:
    def __init__(
        self,
        settings: IngestSettings,
        profile: Profile | None,
        store: Store | None,
        scorer: OODScorer | None,
        extraction: ExtractionWatch,
        counters: SecurityCounters,
        clock: Callable[[], float],
    ) -> None:
        self.s = settings
        self.profile = profile
        self.store = store
        self.scorer = scorer
        self.extraction = extraction
        self.counters = counters
        self._clock = clock
        self._pending: deque[PendingRow] = deque()
        self._drain_lock = threading.Lock()  # one drain at a time (monitor thread vs evaluate)
        self._lock = threading.Lock()  # the window and the counters
        self._rng = np.random.default_rng(settings.seed)
        self._widths = (
            {t.name: len(t.features.names) for t in (*profile.inputs, *profile.outputs)} if profile is not None else {}
        )
        self._inputs: dict[str, Ring] = {}  # numeric features, and string columns as bucket codes (2 bytes/value)
        self._categorical = by_tensor(profile.categorical) if profile is not None else {}
        self._outputs: dict[str, Ring] = {}
        self._predicted = Ring(settings.window_rows)
        self._ood = Ring(settings.window_rows)
        self._latency = Ring(settings.window_rows)
        self.requests = self.rows = self.sampled = self.errors = self.dropped = 0

    # -- request path -----------------------------------------------------------------------------

    def submit(self, item: PendingRow) -> bool:
        """Queue a served request; False (counted in ``dropped``) when the bound is reached."""
        if len(self._pending) >= self.s.max_pending_requests:
            self.dropped += 1  # a lost increment under a race only under-counts drops of a full buffer
            return False
        self._pending.append(item)  # deque.append is atomic
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- background -------------------------------------------------------------------------------

    def drain(self, max_requests: int = 4096) -> int:
        """Process pending requests in batches; returns how many were taken."""
        taken = 0
        with self._drain_lock:
            while self._pending:
                batch: list[PendingRow] = []
                while self._pending and len(batch) < max_requests:
                    batch.append(self._pending.popleft())
                taken += len(batch)
                cols, bad = columns(batch)
                if bad:
                    self._fail(bad, ValueError(f"{bad} request(s) with malformed tensors"))
                for c in cols:
                    self.ingest(c)
        return taken

    def _fail(self, n: int, exc: Exception) -> None:
        self.errors += n
        if self.errors == n:
            log.warning("monitor: request(s) could not be ingested (further ones are only counted): %s", exc)

    def ingest(self, cols: Columns) -> None:
        """Process one batch of alike requests; a failure (e.g. tensors that do not fit the profile) is
        counted in ``errors``, never raised."""
        try:
            self._ingest(cols)
        except Exception as exc:
            self._fail(cols.requests, exc)

    def _ingest(self, cols: Columns) -> None:
        raw_in, raw_out, counts = cols.inputs, cols.outputs, cols.counts
        total = int(counts.sum())
        feats_in = {k: featurize(v) for k, v in raw_in.items() if v.dtype.kind in "biuf"}
        feats_out = {k: featurize(v) for k, v in raw_out.items() if v.dtype.kind in "biuf"}
        codes_in = {k: tensor_codes(f, raw_in[k]) for k, f in self._categorical.items() if k in raw_in}
        for k, f in (*feats_in.items(), *feats_out.items()):
            if f.shape[0] != total or (k in self._widths and f.shape[1] != self._widths[k]):
                raise ValueError(f"'{k}' has shape {f.shape}; expected {total} rows × {self._widths.get(k)} features")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        scores, z = self._scores(cols, feats_in)
        pred = conf = None
        spec = self.profile.prediction if self.profile is not None else None
        if spec is not None and spec.output in raw_out:
            pred, conf = predictions(spec, raw_out[spec.output])
        margins = None
        if self.extraction.probing is not None and spec is not None and spec.output in raw_out:
            margins = top2_margin(spec.kind, raw_out[spec.output])
        # Per key: the near-duplicate comparison (one vectorized one per key and batch) and the probing count.
        self.extraction.record_batch(cols.key_ids, cols.ts, starts, counts, z, margins)
        sampled = self._rng.random(total) < self.s.sample_rate
        with self._lock:
            self.requests += cols.requests
            self.rows += total
            self.sampled += int(sampled.sum())
            for k, f in (*feats_in.items(), *codes_in.items()):
                self._inputs.setdefault(k, Ring(self.s.window_rows)).add(f)
            for k, f in feats_out.items():
                self._outputs.setdefault(k, Ring(self.s.window_rows)).add(f)
            if pred is not None:
                self._predicted.add(pred)
            if scores is not None:
                self._ood.add((scores > self.s.ood_threshold).astype(np.float64))
            self._latency.add(cols.latency_s * 1000.0)
        if self.store is not None and sampled.any():
            self._log(self.store, cols, starts, sampled, pred, conf, scores)

    def _scores(self, cols: Columns, feats_in: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """OOD scores of every row (reusing those screened on the request path) and the standardized rows."""
        if self.scorer is None:
            return None, None
        z = self.scorer.standardize_features(np.concatenate([feats_in[n] for n in self.scorer.names], axis=1))
        given = cols.scores
        if given is not None and not np.isnan(given).any():
            return given, z
        scores = self.scorer.score_standardized(z)
        # Rows screened on the request path were counted there; count the others now.
        fresh = np.ones(scores.shape[0], dtype=bool) if given is None else np.isnan(given)
        self.counters.ood(int(np.sum((scores > self.s.ood_threshold) & fresh)), False)
        return scores, z

    def _log(
        self,
        store: Store,
        cols: Columns,
        starts: np.ndarray,
        sampled: np.ndarray,
        pred: np.ndarray | None,
        conf: np.ndarray | None,
        scores: np.ndarray | None,
    ) -> None:
        """The sampled rows as one :class:`PredictionBatch`: every column is a slice or a gather, no per-row
        Python beyond the row ids of batched requests. The usual batch, every row logged and one row per
        request, is the columns as they came: no gather, no list rebuilt (the arrays are not written to after)."""
        s = self.s
        raw_in, raw_out = cols.inputs, cols.outputs
        total = int(sampled.shape[0])
        rows = np.flatnonzero(sampled)
        whole = rows.shape[0] == total and cols.requests == total

        def take(values: np.ndarray) -> np.ndarray:
            return values if whole else values[rows]

        stats: dict[str, np.ndarray] = {}
        for k, v in raw_in.items():
            if v.dtype.kind in "biuf":
                row_stats = _row_stats(take(v))
                for i, stat in enumerate(("mean", "std", "min", "max")):
                    stats[f"{k}.{stat}"] = row_stats[:, i]
        outputs = {  # the monitoring-only embedding feeds the window's MMD test; the log keeps what clients saw
            k: take(v.reshape(total, -1))
            for k, v in raw_out.items()
            if v.dtype.kind in "biuf"
            and v.size // max(total, 1) <= s.max_logged_output_values
            and k != EMBEDDING_OUTPUT
        }

        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else take(np.asarray(values, dtype=np.float64))

        if whole:
            request_ids, groups, key_ids = cols.request_ids, cols.groups, cols.key_ids
            ts, latency_s = cols.ts, cols.latency_s
        else:
            request = np.repeat(np.arange(cols.requests), cols.counts)[rows]
            ids, counts, first = cols.request_ids, cols.counts.tolist(), starts.tolist()
            req = request.tolist()
            if cols.requests == total:  # one row per request: the request's own id
                request_ids = [ids[r] for r in req]
            else:  # rows of a batched request: ID/ROW
                request_ids = [
                    ids[r] if counts[r] == 1 else f"{ids[r]}/{j - first[r]}"
                    for j, r in zip(rows.tolist(), req, strict=True)
                ]
            groups, key_ids = [cols.groups[r] for r in req], [cols.key_ids[r] for r in req]
            ts, latency_s = cols.ts[request], cols.latency_s[request]
        store.put_batch(
            PredictionBatch(
                model=s.model,
                version=s.version,
                request_ids=request_ids,
                ts=ts,
                latency_ms=latency_s * 1000.0,
                groups=groups,
                key_ids=key_ids,
                prediction=pick(pred),
                confidence=pick(conf),
                ood_score=pick(scores),
                input_stats=stats,
                outputs=outputs,
                raw_inputs={k: take(v) for k, v in raw_in.items()} if s.log_raw_inputs else None,
            )
        )

    def window(self) -> WindowView:
        with self._lock:
            ins = {k: r.view() for k, r in self._inputs.items()}
            outs = {k: r.view() for k, r in self._outputs.items()}
            return WindowView(
                inputs={k: v for k, v in ins.items() if v is not None},
                outputs={k: v for k, v in outs.items() if v is not None},
                predicted=self._predicted.view(),
                ood=self._ood.view(),
                latency_ms=self._latency.view(),
            )
