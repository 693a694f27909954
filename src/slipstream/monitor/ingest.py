"""From served requests to monitor state, off the request path.

The request path only appends a small tuple to a bounded deque (:meth:`Ingestor.submit`, about a
microsecond, never blocks or raises; a full deque drops and counts). :meth:`Ingestor.drain`, called by the
monitor's own thread (and by ``Monitor.evaluate``), processes everything pending in vectorized batches:
features, out-of-distribution scores, predictions, the rolling drift window, per-key extraction tracking,
sampling, and the prediction-log records.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from slipstream.monitor.features import featurize
from slipstream.monitor.profile import Profile, predictions
from slipstream.monitor.store import PredictionRecord, Store
from slipstream.monitor.threats import ExtractionWatch, OODScorer, SecurityCounters

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pending:
    """One served request waiting to be ingested (the arrays are the request's own; nothing is copied)."""

    request_id: str
    ts: float
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    latency_s: float
    group: str | None
    key_id: str | None
    scores: np.ndarray | None


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


def _row_stats(name: str, x: np.ndarray) -> list[dict[str, float]]:
    flat = x.reshape(x.shape[0], -1).astype(np.float64, copy=False)
    stats = np.stack([flat.mean(axis=1), flat.std(axis=1), flat.min(axis=1), flat.max(axis=1)], axis=1).tolist()
    return [{f"{name}.mean": m, f"{name}.std": s, f"{name}.min": lo, f"{name}.max": hi} for m, s, lo, hi in stats]


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
        self._pending: deque[Pending] = deque()
        self._drain_lock = threading.Lock()  # one drain at a time (monitor thread vs evaluate)
        self._lock = threading.Lock()  # the window and the counters
        self._rng = np.random.default_rng(settings.seed)
        self._widths = (
            {t.name: len(t.features.names) for t in (*profile.inputs, *profile.outputs)} if profile is not None else {}
        )
        self._inputs: dict[str, Ring] = {}
        self._outputs: dict[str, Ring] = {}
        self._predicted = Ring(settings.window_rows)
        self._ood = Ring(settings.window_rows)
        self._latency = Ring(settings.window_rows)
        self.requests = self.rows = self.sampled = self.errors = self.dropped = 0

    # -- request path -----------------------------------------------------------------------------

    def submit(self, item: Pending) -> bool:
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
                batch: list[Pending] = []
                while self._pending and len(batch) < max_requests:
                    batch.append(self._pending.popleft())
                taken += len(batch)
                self._process(batch)
        return taken

    def _fail(self, n: int, exc: Exception) -> None:
        self.errors += n
        if self.errors == n:
            log.warning("monitor: request(s) could not be ingested (further ones are only counted): %s", exc)

    @staticmethod
    def _signature(item: Pending) -> tuple[object, ...]:
        def sig(arrays: Mapping[str, np.ndarray]) -> tuple[object, ...]:
            return tuple((k, np.shape(v)[1:], np.asarray(v).dtype.str) for k, v in arrays.items())

        try:  # the server passes numpy arrays: read their attributes directly (~3 µs less per request)
            return (
                tuple([(k, v.shape[1:], v.dtype.str) for k, v in item.inputs.items()]),
                tuple([(k, v.shape[1:], v.dtype.str) for k, v in item.outputs.items()]),
            )
        except AttributeError:
            return sig(item.inputs), sig(item.outputs)

    def _process(self, batch: list[Pending]) -> None:
        """Requests with the same tensor names, row shapes and dtypes are processed together, vectorized."""
        groups: dict[tuple[object, ...], list[Pending]] = {}
        for item in batch:
            try:
                groups.setdefault(self._signature(item), []).append(item)
            except Exception as exc:  # one bad request must not stop the others; counted, first one logged
                self._fail(1, exc)
        for items in groups.values():
            try:
                self._process_group(items)
            except Exception as exc:  # e.g. a request that does not fit the profile; counted
                self._fail(len(items), exc)

    def _process_group(self, items: list[Pending]) -> None:
        raw_in = {k: np.concatenate([np.asarray(it.inputs[k]) for it in items]) for k in items[0].inputs}
        raw_out = {k: np.concatenate([np.asarray(it.outputs[k]) for it in items]) for k in items[0].outputs}
        counts = [int(np.shape(next(iter(it.inputs.values())))[0]) for it in items]
        total = sum(counts)
        feats_in = {k: featurize(v) for k, v in raw_in.items() if v.dtype.kind in "biuf"}
        feats_out = {k: featurize(v) for k, v in raw_out.items() if v.dtype.kind in "biuf"}
        for k, f in (*feats_in.items(), *feats_out.items()):
            if f.shape[0] != total or (k in self._widths and f.shape[1] != self._widths[k]):
                raise ValueError(f"'{k}' has shape {f.shape}; expected {total} rows × {self._widths.get(k)} features")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
        scores, z = self._scores(items, counts, feats_in)
        pred = conf = None
        spec = self.profile.prediction if self.profile is not None else None
        if spec is not None and spec.output in raw_out:
            pred, conf = predictions(spec, raw_out[spec.output])
        if z is not None:
            by_key: dict[str, list[int]] = {}
            for idx, it in enumerate(items):
                if it.key_id is not None:
                    by_key.setdefault(it.key_id, []).append(idx)
            for key, idxs in by_key.items():  # one vectorized comparison per key and batch
                self.extraction.observe_many(key, z[starts[idxs]], [items[i].ts for i in idxs])
        sampled = self._rng.random(total) < self.s.sample_rate
        latency = np.array([it.latency_s * 1000.0 for it in items])
        with self._lock:
            self.requests += len(items)
            self.rows += total
            self.sampled += int(sampled.sum())
            for k, f in feats_in.items():
                self._inputs.setdefault(k, Ring(self.s.window_rows)).add(f)
            for k, f in feats_out.items():
                self._outputs.setdefault(k, Ring(self.s.window_rows)).add(f)
            if pred is not None:
                self._predicted.add(pred)
            if scores is not None:
                self._ood.add((scores > self.s.ood_threshold).astype(np.float64))
            self._latency.add(latency)
        if self.store is not None and sampled.any():
            self._log(self.store, items, counts, starts, raw_in, raw_out, sampled, pred, conf, scores)

    def _scores(
        self, items: list[Pending], counts: list[int], feats_in: dict[str, np.ndarray]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """OOD scores of every row (reusing those screened on the request path) and the standardized rows."""
        if self.scorer is None:
            return None, None
        z = self.scorer.standardize_features(np.concatenate([feats_in[n] for n in self.scorer.names], axis=1))
        given = [it.scores for it in items]
        if all(g is not None for g in given):
            return np.concatenate([g for g in given if g is not None]), z
        scores = self.scorer.score_standardized(z)
        # Rows screened on the request path were counted there; count the others now.
        fresh = np.repeat(np.array([it.scores is None for it in items]), counts)
        self.counters.ood(int(np.sum((scores > self.s.ood_threshold) & fresh)), False)
        return scores, z

    def _log(
        self,
        store: Store,
        items: list[Pending],
        counts: list[int],
        starts: np.ndarray,
        raw_in: dict[str, np.ndarray],
        raw_out: dict[str, np.ndarray],
        sampled: np.ndarray,
        pred: np.ndarray | None,
        conf: np.ndarray | None,
        scores: np.ndarray | None,
    ) -> None:
        s = self.s
        total = int(sampled.shape[0])
        pred_l = None if pred is None else pred.tolist()
        conf_l = None if conf is None else conf.tolist()
        scores_l = None if scores is None else scores.tolist()
        stats: list[dict[str, float]] = [{} for _ in range(total)]
        for k, v in raw_in.items():
            if v.dtype.kind in "biuf":
                for row, st in zip(stats, _row_stats(k, v), strict=True):
                    row.update(st)
        outs = {
            k: v.reshape(total, -1).tolist()
            for k, v in raw_out.items()
            if v.dtype.kind in "biuf" and v.size // max(total, 1) <= s.max_logged_output_values
        }
        for it, n, start in zip(items, counts, starts.tolist(), strict=True):
            for i in range(n):
                j = start + i
                if not sampled[j]:
                    continue
                raw = None
                if s.log_raw_inputs:
                    buf = io.BytesIO()
                    one: dict[str, np.ndarray] = {k: v[j : j + 1] for k, v in raw_in.items()}
                    np.savez(buf, *(), **one)  # type: ignore[arg-type]  # numpy's stub types **kwds oddly
                    raw = buf.getvalue()
                store.put(
                    PredictionRecord(
                        request_id=it.request_id if n == 1 else f"{it.request_id}/{i}",
                        ts=it.ts,
                        model=s.model,
                        version=s.version,
                        latency_ms=it.latency_s * 1000.0,
                        input_stats=stats[j],
                        outputs={k: v[j] for k, v in outs.items()},
                        prediction=None if pred_l is None else pred_l[j],
                        confidence=None if conf_l is None else conf_l[j],
                        ood_score=None if scores_l is None else scores_l[j],
                        group=it.group,
                        key_id=it.key_id,
                        raw_input=raw,
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
