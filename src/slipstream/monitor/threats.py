"""Security signals: out-of-distribution inputs, model-extraction patterns, refused requests, failed auth
and the integrity of the model files on disk.

* :class:`OODScorer`: per row, the PCA reconstruction error of the standardized input features divided by
  the reference's 99th percentile (so ~1 is the edge of the reference; NaN or inf inputs score inf).
* :class:`ExtractionWatch`: per API key, the request volume in a sliding window and the share of requests
  that nearly repeat one of the key's recent inputs (probing a decision boundary by small steps); and, given
  a :class:`~.probing.ProbingTest`, the share of the key's rows whose top-2 margin sits far below the
  reference's (probing the boundary by any steps: :mod:`.probing`).
* :class:`SecurityCounters`: plain thread-safe counters the server increments (rejections by reason,
  failed authentication, out-of-distribution rows seen and refused).
* :class:`IntegrityWatch`: re-hashes the bundle's files against its manifest, on demand or when due.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from slipstream.errors import ConfigError, SlipstreamError
from slipstream.frozen import Frozen
from slipstream.monitor._blas import cross
from slipstream.monitor.features import featurize
from slipstream.monitor.probing import BUCKETS_PER_WINDOW, ProbeCounts, ProbingTest
from slipstream.monitor.profile import Profile, reconstruction_error


class ThreatConfig(Frozen):
    ood_threshold: float = Field(default=3.0, gt=0, description="Count a row as out of distribution above this score.")
    reject_ood_above: float | None = Field(
        default=None, gt=0, description="Refuse requests scoring above this (None: count only)."
    )
    extraction_window_s: float = Field(default=60.0, gt=0, description="Sliding window for per-key volume.")
    extraction_max_requests: int = Field(default=600, ge=1, description="Requests per key per window that alone flag.")
    extraction_min_requests: int = Field(default=30, ge=1, description="Below this, near-duplicates are not judged.")
    near_duplicate_distance: float = Field(
        default=0.05, gt=0, description="RMS distance (reference std units) under which two inputs nearly repeat."
    )
    near_duplicate_share: float = Field(default=0.5, gt=0, le=1, description="Share of near repeats that flags a key.")
    history_per_key: int = Field(default=64, ge=1, description="Recent inputs kept per key for the comparison.")
    max_keys: int = Field(default=10_000, ge=1, description="Keys tracked at once (least recent evicted).")
    integrity_interval_s: float = Field(default=300.0, gt=0, description="How often the bundle is re-hashed.")
    probing_quantile: float = Field(
        default=0.05, ge=0.001, le=0.1, description="A row is near the boundary below this reference margin quantile."
    )
    probing_window_s: float = Field(default=300.0, gt=0, description="Sliding window of a key's rows for probing.")
    probing_min_requests: int = Field(default=30, ge=1, description="Below this many rows a key is not judged.")
    probing_min_share: float = Field(
        default=0.25, gt=0, le=1, description="Flag only a key with at least this share of its rows near the boundary."
    )
    probing_alpha: float = Field(
        default=1e-6, gt=0, lt=1, description="False-alarm probability per evaluation, shared by the keys judged."
    )


class OODScorer:
    """Out-of-distribution score per row against the profile's PCA basis."""

    def __init__(self, profile: Profile) -> None:
        mv = profile.multivariate
        if mv is None:
            raise ConfigError(
                "This profile has no multivariate basis, so inputs cannot be scored for out-of-distribution.",
                field="profile.multivariate",
                hint="Rebuild the profile with at least 20 rows and 2 to pca_max_features input features.",
            )
        self.names = [t.name for t in profile.inputs]
        self._mean = np.asarray(mv.mean)
        self._inv_scale = 1.0 / np.asarray(mv.scale)
        self._comps = np.asarray(mv.components)
        self._q99 = max(mv.error_q99, 1e-12)
        # For one row (score_one), in float32: its rounding (~1e-5 of a score) is far below any threshold.
        stacked = np.concatenate([np.diag(self._inv_scale), self._comps * self._inv_scale])  # [I; C] · diag(1/s)
        self._stacked = stacked.astype(np.float32)
        self._offset = (stacked @ self._mean).astype(np.float32)
        self._width = len(self._mean)
        self._sign = np.concatenate([np.ones(self._width), -np.ones(len(self._comps))]).astype(np.float32)

    def _features(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The input tensors' features side by side, in profile order."""
        feats = [featurize(np.asarray(inputs[n])) for n in self.names]
        return feats[0] if len(feats) == 1 else np.concatenate(feats, axis=1)

    def standardize(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.standardize_features(self._features(inputs))

    def standardize_features(self, x: np.ndarray) -> np.ndarray:
        """Standardize already featurized rows (input tensors' features side by side, in profile order)."""
        return np.asarray((x - self._mean) * self._inv_scale)

    def score(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.score_standardized(self.standardize(inputs))

    def score_one(self, inputs: Mapping[str, np.ndarray]) -> float | None:
        """The score of a one-row request, or None when it has several rows (use :meth:`score`).

        Standardizing and projecting are one matrix-vector product with a matrix prepared once
        (``[diag(1/scale); components · diag(1/scale)]``), so a request costs four small numpy calls
        instead of a dozen. inf when the row is not finite, as :meth:`score_standardized` gives it."""
        x = self._features(inputs)
        if x.shape[0] != 1:
            return None
        y = np.dot(self._stacked, x[0]) - self._offset  # [z; C z]
        value = float(y.dot(y * self._sign))  # |z|² - |C z|²
        if not math.isfinite(value):
            return math.inf
        return max(value, 0.0) / self._width / self._q99

    def score_standardized(self, z: np.ndarray) -> np.ndarray:
        finite = np.isfinite(z)
        if finite.all():
            return reconstruction_error(z, self._comps) / self._q99
        err = reconstruction_error(np.where(finite, z, 0.0), self._comps) / self._q99
        return np.where(finite.all(axis=1), err, np.inf)


@dataclass
class _KeyState:
    times: deque[float] = field(default_factory=deque)
    near: deque[float] = field(default_factory=deque)  # times of near-duplicate requests
    history: np.ndarray | None = None  # [history_per_key, features] ring of recent standardized inputs
    filled: int = 0
    next: int = 0
    probes: ProbeCounts | None = None  # rows and rows near the decision boundary (with a ProbingTest)


def _compare_rows(state: _KeyState, rows: np.ndarray, times: list[float], limit: float) -> None:
    """Each row against the key's ring of recent inputs (which then takes the row): three numpy calls a row."""
    assert state.history is not None
    size = state.history.shape[0]
    for row, t in zip(rows, times, strict=True):
        diff = state.history[: state.filled] - row
        state.times.append(t)
        if state.filled and float(np.einsum("ij,ij->i", diff, diff).min()) < limit:
            state.near.append(t)
        state.history[state.next] = row
        state.next = (state.next + 1) % size
        state.filled = min(state.filled + 1, size)


def _compare_chunk(state: _KeyState, chunk: np.ndarray, times: list[float], limit: float) -> None:
    """Every row of ``chunk`` (at most the ring's size) against the ring and the rows before it, at once."""
    assert state.history is not None
    size, h, k = state.history.shape[0], state.filled, chunk.shape[0]
    cand = np.concatenate([state.history[:h], chunk])
    sq = (
        np.einsum("ij,ij->i", chunk, chunk)[:, None]
        + np.einsum("ij,ij->i", cand, cand)[None, :]
        - 2 * cross(chunk, cand)
    )
    earlier = np.arange(h + k)[None, :] < (h + np.arange(k))[:, None]  # history + rows before it
    near = np.where(earlier, sq, np.inf).min(axis=1) < limit
    state.times.extend(times)
    state.near.extend(itertools.compress(times, near.tolist()))
    state.history[(state.next + np.arange(k)) % size] = chunk
    state.next = (state.next + k) % size
    state.filled = min(h + k, size)


class KeyActivity(Frozen):
    key_id: str
    requests_in_window: int
    near_duplicates_in_window: int
    suspicious: bool
    reason: str
    signal: Literal["extraction", "boundary_probing"] = Field(
        default="extraction", description="Which watch judged the key (probing: rows, not requests, counted)."
    )
    near_boundary_in_window: int | None = Field(default=None, description="Probing: rows near the boundary.")
    p_value: float | None = Field(default=None, description="Probing: the key's binomial p-value.")


class ExtractionWatch:
    """Per-key volume and near-duplicate probing over a sliding window, and with a ``probing`` test the key's
    rows near the decision boundary (:mod:`.probing`). Thread-safe; O(history) per call."""

    def __init__(
        self,
        config: ThreatConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        probing: ProbingTest | None = None,
    ) -> None:
        self.config = config or ThreatConfig()
        self.probing = probing
        self._clock = clock
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, key_id: str, z_row: np.ndarray, now: float | None = None) -> KeyActivity:
        """Record one request (its standardized feature row) for ``key_id`` and judge the key."""
        t = self._clock() if now is None else now
        return self.observe_many(key_id, np.asarray(z_row, dtype=np.float64).reshape(1, -1), [t])

    def observe_many(self, key_id: str, rows: np.ndarray, times: list[float]) -> KeyActivity:
        """Record several requests of one key at once (rows ``[m, features]``, in arrival order), and judge it.

        Each row is compared with the key's recent history and with the rows before it in this call, in one
        vectorized distance computation."""
        with self._lock:
            return self._judge(key_id, self._record(key_id, rows, times), times[-1])

    def record_many(self, key_id: str, rows: np.ndarray, times: list[float]) -> None:
        """:meth:`observe_many` without the judgement (the monitor's ingest: keys are judged when evaluated)."""
        with self._lock:
            self._record(key_id, rows, times)

    def record_batch(
        self,
        key_ids: Sequence[str | None],
        ts: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        z: np.ndarray | None,
        margins: np.ndarray | None,
    ) -> None:
        """Record an ingest batch of requests (``starts``/``counts``: each request's rows), grouped by key: each
        request's first standardized row ``z`` for the near-duplicate comparison, every row's top-2 margin for
        the probing count. Requests without a key are not tracked."""
        probing = self.probing
        if z is None and (margins is None or probing is None):
            return
        single = len(set(key_ids)) == 1
        groups = [(key_ids[0], None)] if single else _by_key(key_ids)
        one_row_each = int(counts.sum()) == len(key_ids)
        near, width = None, 0.0
        if margins is not None and probing is not None:  # compared once for the whole batch
            near, width = margins < probing.threshold, probing.window_s / BUCKETS_PER_WINDOW
        for key, idx in groups:
            if key is None:
                continue
            if z is not None:
                self.record_many(
                    key, z[starts if idx is None else starts[idx]], (ts if idx is None else ts[idx]).tolist()
                )
            if near is None:
                continue
            if idx is None:
                rows, times = near, ts if one_row_each else np.repeat(ts, counts)
            elif one_row_each:
                rows, times = near[idx], ts[idx]
            else:
                rows = near[np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in idx.tolist()])]
                times = np.repeat(ts[idx], counts[idx])
            self._count_near(key, rows, times, width)

    def record_margins(self, key_id: str, margins: np.ndarray, times: np.ndarray) -> None:
        """Count one key's rows (their top-2 margins, in arrival order) for the probing test; a no-op without it."""
        test = self.probing
        if test is not None:
            near = np.asarray(margins) < test.threshold
            self._count_near(key_id, near, np.asarray(times), test.window_s / BUCKETS_PER_WINDOW)

    def _count_near(self, key_id: str, near: np.ndarray, times: np.ndarray, width: float) -> None:
        with self._lock:
            state = self._state(key_id)
            if state.probes is None:
                state.probes = ProbeCounts()
            state.probes.add(times, near, width)

    def _state(self, key_id: str) -> _KeyState:
        """The key's state, now the most recent (the least recent keys beyond ``max_keys`` are evicted)."""
        state = self._keys.pop(key_id, None) or _KeyState()
        self._keys[key_id] = state
        while len(self._keys) > self.config.max_keys:
            self._keys.popitem(last=False)
        return state

    def _record(self, key_id: str, rows: np.ndarray, times: list[float]) -> _KeyState:
        c = self.config
        z = np.asarray(rows, dtype=np.float32)  # float32 halves the distance arithmetic; near is far above its error
        m, d = z.shape
        state = self._state(key_id)
        if state.history is None or state.history.shape[1] != d:
            state.history = np.empty((c.history_per_key, d), dtype=np.float32)
            state.filled = state.next = 0
        limit = (c.near_duplicate_distance**2) * max(d, 1)
        step = c.history_per_key
        for lo in range(0, m, step):  # chunks: each row meets at most 2 × history_per_key candidates
            chunk, chunk_times = z[lo : lo + step], times[lo : lo + step]
            if chunk.shape[0] <= 2:  # a few requests of this key (many keys, few each): row by row is cheaper
                _compare_rows(state, chunk, chunk_times, limit)
            else:
                _compare_chunk(state, chunk, chunk_times, limit)
        return state

    def _judge(self, key_id: str, state: _KeyState, now: float) -> KeyActivity:
        c = self.config
        cutoff = now - c.extraction_window_s
        for q in (state.times, state.near):
            while q and q[0] < cutoff:
                q.popleft()
        n, near = len(state.times), len(state.near)
        if n > c.extraction_max_requests:
            reason = f"{n} requests in {c.extraction_window_s:g} s (limit {c.extraction_max_requests})"
        elif n >= c.extraction_min_requests and near / n >= c.near_duplicate_share:
            reason = f"{near} of {n} requests nearly repeat a recent input (share limit {c.near_duplicate_share:g})"
        else:
            return KeyActivity(
                key_id=key_id, requests_in_window=n, near_duplicates_in_window=near, suspicious=False, reason="normal"
            )
        return KeyActivity(
            key_id=key_id, requests_in_window=n, near_duplicates_in_window=near, suspicious=True, reason=reason
        )

    def suspicious_keys(self, now: float | None = None) -> list[KeyActivity]:
        t = self._clock() if now is None else now
        with self._lock:
            judged = [self._judge(k, s, t) for k, s in self._keys.items()]
        return [a for a in judged if a.suspicious]

    def probing_keys(self, now: float | None = None) -> list[KeyActivity] | None:
        """The keys whose rows sit near the decision boundary beyond what the reference implies; None when
        there is no probing test (no margin reference: see :func:`~.probing.probing_test`)."""
        test = self.probing
        if test is None:
            return None
        t = self._clock() if now is None else now
        width = test.window_s / BUCKETS_PER_WINDOW
        with self._lock:
            counted = [
                (k, s.probes.totals(t - test.window_s, width)) for k, s in self._keys.items() if s.probes is not None
            ]
        verdicts = test.judge([c for _, c in counted])
        return [
            KeyActivity(
                key_id=key,
                requests_in_window=n,
                near_duplicates_in_window=0,
                suspicious=True,
                reason=v.reason,
                signal="boundary_probing",
                near_boundary_in_window=near,
                p_value=v.p_value,
            )
            for (key, (n, near)), v in zip(counted, verdicts, strict=True)
            if v.suspicious
        ]


def _by_key(key_ids: Sequence[str | None]) -> list[tuple[str | None, np.ndarray | None]]:
    """The positions of each key's requests, keys in order of first appearance."""
    by_key: dict[str, list[int]] = {}
    for idx, key in enumerate(key_ids):
        if key is not None:
            by_key.setdefault(key, []).append(idx)
    return [(key, np.asarray(idxs)) for key, idxs in by_key.items()]


class SecurityCounters:
    """Counters the server increments; read them with :meth:`snapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rejected: dict[str, int] = {}
        self._auth_failed: dict[str, int] = {}
        self.ood_rows = 0
        self.ood_rejected = 0

    def rejected(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + n

    def auth_failed(self, reason: str = "unknown_key", n: int = 1) -> None:
        with self._lock:
            self._auth_failed[reason] = self._auth_failed.get(reason, 0) + n

    def ood(self, rows: int, rejected: bool | int) -> None:
        """``rows`` more out-of-distribution rows, ``rejected`` (a flag or a count) more refused requests."""
        with self._lock:
            self.ood_rows += rows
            self.ood_rejected += int(rejected)

    def take(self) -> dict[str, dict[str, int] | int]:
        """What was counted since the last ``take`` (as :meth:`snapshot`), and start from zero again."""
        with self._lock:
            out = self._snapshot()
            self._rejected, self._auth_failed = {}, {}
            self.ood_rows = self.ood_rejected = 0
        return out

    def add(self, counts: Mapping[str, Mapping[str, int] | int]) -> None:
        """Add counts taken elsewhere (the server counts, its monitor process keeps the totals)."""
        for reason, n in _reasons(counts.get("rejected")).items():
            self.rejected(reason, n)
        for reason, n in _reasons(counts.get("auth_failed")).items():
            self.auth_failed(reason, n)
        rows, refused = counts.get("ood_rows", 0), counts.get("ood_rejected", 0)
        self.ood(rows if isinstance(rows, int) else 0, refused if isinstance(refused, int) else 0)

    def snapshot(self) -> dict[str, dict[str, int] | int]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, dict[str, int] | int]:
        return {
            "rejected": dict(self._rejected),
            "auth_failed": dict(self._auth_failed),
            "ood_rows": self.ood_rows,
            "ood_rejected": self.ood_rejected,
        }


def _reasons(value: Mapping[str, int] | int | None) -> Mapping[str, int]:
    return value if isinstance(value, Mapping) else {}


class IntegrityStatus(Frozen):
    ok: bool
    checked_at: float
    checks: int = Field(description="Checks run so far.")
    error: str | None = Field(default=None, description="What failed, from the bundle's integrity check.")


class IntegrityWatch:
    """Re-verifies every file of a bundle (sizes and sha256) against its manifest."""

    def __init__(self, bundle_dir: str | Path, *, interval_s: float = 300.0, clock: Callable[[], float] = time.time):
        self.path = Path(bundle_dir)
        self.interval_s = interval_s
        self._clock = clock
        self._checks = 0
        self.status: IntegrityStatus | None = None

    def due(self) -> bool:
        return self.status is None or self._clock() - self.status.checked_at >= self.interval_s

    def check(self) -> IntegrityStatus:
        from slipstream.artifact.bundle import read_manifest, verify_files

        self._checks += 1
        try:
            verify_files(self.path, read_manifest(self.path))
            status = IntegrityStatus(ok=True, checked_at=self._clock(), checks=self._checks)
        except SlipstreamError as exc:
            status = IntegrityStatus(ok=False, checked_at=self._clock(), checks=self._checks, error=exc.message)
        self.status = status
        return status
