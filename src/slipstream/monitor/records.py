"""Logged predictions, column by column: one :class:`PredictionBatch` is one row of the prediction log.

The monitor logs what it ingested every 50 ms as one batch, so the log pays one SQLite insert and one binary
encoding per batch instead of an insert and two JSON documents per request (~6 µs a request, measured,
the largest part of what monitoring cost a served request). :func:`pack` and :func:`unpack` are the
batch's format: a length-prefixed JSON header (the strings, and each array's name, dtype, shape and
offset), then the arrays' raw bytes. :meth:`PredictionBatch.records` gives the rows back one by one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

FORMAT = 1
_LEN = struct.Struct("<I")


@dataclass(slots=True)
class PredictionRecord:
    """One logged request: what :meth:`PredictionBatch.records` yields and what ``Store.put`` takes."""

    request_id: str
    ts: float
    model: str
    version: str
    latency_ms: float
    input_stats: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[float]] = field(default_factory=dict)
    prediction: float | None = None
    confidence: float | None = None
    ood_score: float | None = None
    group: str | None = None
    key_id: str | None = None
    raw_input: dict[str, np.ndarray] | None = None


def _optional(values: np.ndarray | None, i: int) -> float | None:
    if values is None:
        return None
    v = float(values[i])
    return None if v != v else v  # NaN: no value for this row


@dataclass(slots=True)
class PredictionBatch:
    """Logged rows of one model version, column by column (every array has one entry per row).

    ``prediction``, ``confidence`` and ``ood_score`` hold NaN where a row has none; ``input_stats`` maps a
    name such as ``pixels.mean`` to a value per row; ``outputs`` an output name to its values ``[rows, k]``;
    ``raw_inputs``, when logged, an input name to its rows."""

    model: str
    version: str
    request_ids: list[str]
    ts: np.ndarray
    latency_ms: np.ndarray
    groups: list[str | None]
    key_ids: list[str | None]
    prediction: np.ndarray | None = None
    confidence: np.ndarray | None = None
    ood_score: np.ndarray | None = None
    input_stats: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    raw_inputs: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def nbytes(self) -> int:
        """The arrays' bytes, plus an estimate of 64 bytes per row for its strings."""
        return sum(a.nbytes for a in _arrays(self).values()) + 64 * len(self)

    def head(self, n: int) -> PredictionBatch:
        """The first ``n`` rows."""

        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[:n]

        return PredictionBatch(
            self.model, self.version, self.request_ids[:n], self.ts[:n], self.latency_ms[:n], self.groups[:n],
            self.key_ids[:n], cut(self.prediction), cut(self.confidence), cut(self.ood_score),
            {k: v[:n] for k, v in self.input_stats.items()}, {k: v[:n] for k, v in self.outputs.items()},
            None if self.raw_inputs is None else {k: v[:n] for k, v in self.raw_inputs.items()},
        )  # fmt: skip

    @classmethod
    def of(cls, record: PredictionRecord) -> PredictionBatch:
        """A batch of one record."""

        def one(v: float | None) -> np.ndarray:
            return np.array([np.nan if v is None else v], dtype=np.float64)

        return cls(
            model=record.model,
            version=record.version,
            request_ids=[record.request_id],
            ts=one(record.ts),
            latency_ms=one(record.latency_ms),
            groups=[record.group],
            key_ids=[record.key_id],
            prediction=one(record.prediction),
            confidence=one(record.confidence),
            ood_score=one(record.ood_score),
            input_stats={k: one(v) for k, v in record.input_stats.items()},
            outputs={k: np.asarray([v], dtype=np.float64) for k, v in record.outputs.items()},
            raw_inputs=None if record.raw_input is None else {k: v[None] for k, v in record.raw_input.items()},
        )

    def records(self) -> list[PredictionRecord]:
        """The rows one by one."""
        stats = {k: v.tolist() for k, v in self.input_stats.items()}
        outs = {k: v.tolist() for k, v in self.outputs.items()}
        return [
            PredictionRecord(
                request_id=rid, ts=float(self.ts[i]), model=self.model, version=self.version,
                latency_ms=float(self.latency_ms[i]), input_stats={k: v[i] for k, v in stats.items()},
                outputs={k: v[i] for k, v in outs.items()}, prediction=_optional(self.prediction, i),
                confidence=_optional(self.confidence, i), ood_score=_optional(self.ood_score, i),
                group=self.groups[i], key_id=self.key_ids[i],
                raw_input=None if self.raw_inputs is None else {k: v[i] for k, v in self.raw_inputs.items()},
            )
            for i, rid in enumerate(self.request_ids)
        ]  # fmt: skip


def _arrays(batch: PredictionBatch) -> dict[str, np.ndarray]:
    out = {"ts": batch.ts, "latency_ms": batch.latency_ms}
    for name in ("prediction", "confidence", "ood_score"):
        value = getattr(batch, name)
        if value is not None:
            out[name] = value
    out.update({f"stats/{k}": v for k, v in batch.input_stats.items()})
    out.update({f"out/{k}": v for k, v in batch.outputs.items()})
    out.update({f"raw/{k}": v for k, v in (batch.raw_inputs or {}).items()})
    return out


def _plain(a: np.ndarray) -> np.ndarray:
    """The array with a fixed-size dtype: text tensors (Python objects) become unicode."""
    if a.dtype.kind != "O":
        return np.ascontiguousarray(a)
    text = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in a.ravel().tolist()]
    return np.array(text, dtype=str).reshape(a.shape)


def pack(batch: PredictionBatch) -> bytes:
    """The batch as bytes (one BLOB in the log): about a microsecond per row, all columns together."""
    arrays = [(k, _plain(v)) for k, v in _arrays(batch).items()]
    specs: list[tuple[str, str, tuple[int, ...], int]] = []
    offset = 0
    for name, a in arrays:
        specs.append((name, a.dtype.str, a.shape, offset))
        offset += a.nbytes
    header = orjson.dumps(
        {
            "format": FORMAT,
            "model": batch.model,
            "version": batch.version,
            "request_ids": batch.request_ids,
            "groups": batch.groups,
            "key_ids": batch.key_ids,
            "arrays": specs,
        }
    )
    return b"".join([_LEN.pack(len(header)), header, *(a.tobytes() for _, a in arrays)])


def unpack(blob: bytes) -> PredictionBatch:
    """A batch from :func:`pack`'s bytes; ValueError when they are not one."""
    try:
        (size,) = _LEN.unpack_from(blob)
        head = orjson.loads(blob[_LEN.size : _LEN.size + size])
        if head.get("format") != FORMAT:
            raise ValueError(f"prediction batch format {head.get('format')!r}; this slipstream reads {FORMAT}")
        base = _LEN.size + size
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, shape, offset in head["arrays"]:
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(blob, dtype=dt, count=count, offset=base + offset).reshape(shape)
    except (struct.error, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a prediction batch: {exc}") from exc

    def part(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

    raw = part("raw/")
    return PredictionBatch(
        model=head["model"],
        version=head["version"],
        request_ids=head["request_ids"],
        ts=arrays["ts"],
        latency_ms=arrays["latency_ms"],
        groups=head["groups"],
        key_ids=head["key_ids"],
        prediction=arrays.get("prediction"),
        confidence=arrays.get("confidence"),
        ood_score=arrays.get("ood_score"),
        input_stats=part("stats/"),
        outputs=part("out/"),
        raw_inputs=raw or None,
    )


def concat_column(batches: Sequence[PredictionBatch], name: str) -> np.ndarray:
    """One of ``prediction``, ``confidence``, ``ood_score``, ``ts`` or ``latency_ms`` over several batches
    (NaN where a batch has none)."""
    parts = []
    for b in batches:
        value = getattr(b, name)
        parts.append(np.full(len(b), np.nan) if value is None else np.asarray(value, dtype=np.float64))
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(slots=True, frozen=True)
class Feedback:
    request_id: str
    label: float
    ts: float


@dataclass(slots=True, frozen=True)
class Snapshot:
    """A monitor summary (JSON text) at a point in time, for reports over time."""

    ts: float
    model: str
    body: str


@dataclass(frozen=True)
class LabeledRow:
    """A prediction joined with its label (``label`` is None while no feedback has come)."""

    request_id: str
    ts: float
    prediction: float | None
    confidence: float | None
    label: float | None
    group: str | None
    key_id: str | None
    latency_ms: float
    ood_score: float | None
