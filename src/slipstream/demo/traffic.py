"""The demo's traffic: normal, drifted, biased, malformed, unauthenticated and over-the-rate-limit requests.

Every random choice comes from one seeded generator (:class:`Sampler`): which held-out rows each labelled
phase sends (drawn with replacement, so each phase is a fresh sample of the reference, in random order) and
which group each request belongs to (drawn per request, independent of the digit). Normal traffic is drawn
from the held-out digits because the monitor's reference profile was built on them: the training digits,
on which the model is more confident, would be a real shift in its outputs, not a sample of the reference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slipstream.demo.result import PhaseKind, PhaseResult

MINORITY = "b"  # the group whose digits of the class of interest the biased phase mirrors


@dataclass
class Phase:
    """What one kind of traffic got back, while it is being sent (:meth:`result` freezes it)."""

    kind: PhaseKind
    name: str
    statuses: Counter[int] = field(default_factory=Counter)
    correct: int = 0
    scored: int = 0
    perturbed: int = 0
    labels_sent: int = 0
    request_ids: list[tuple[str, int]] = field(default_factory=list)  # (id, label) for feedback

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    def result(self) -> PhaseResult:
        return PhaseResult(
            kind=self.kind,
            name=self.name,
            requests=self.sent,
            statuses=dict(sorted(self.statuses.items())),
            rows=self.scored,
            accuracy=self.accuracy,
            perturbed_rows=self.perturbed,
            labels_sent=self.labels_sent,
        )


@dataclass(frozen=True)
class Batch:
    """One labelled phase's rows, in sending order, with the group of each request."""

    x: np.ndarray  # [rows, 1, 8, 8]
    y: np.ndarray  # [rows]
    groups: list[str]  # one per request of `rows_per_request` rows
    rows_per_request: int
    perturbed: int = 0

    def row_groups(self) -> np.ndarray:
        return np.repeat(np.array(self.groups), self.rows_per_request)[: len(self.y)]


class Sampler:
    """Every random choice of the demo's traffic, from one seed: rows, their order, and groups."""

    def __init__(self, seed: int, x: np.ndarray, y: np.ndarray, *, minority_share: float = 0.3) -> None:
        self.rng = np.random.default_rng(seed)
        self.x, self.y = x, y
        self.minority_share = minority_share

    def batch(self, rows: int, rows_per_request: int) -> Batch:
        """``rows`` held-out digits drawn with replacement; each request's group drawn on its own."""
        idx = self.rng.integers(0, len(self.y), size=rows)
        requests = -(-rows // rows_per_request)
        minority = self.rng.random(requests) < self.minority_share
        groups = [MINORITY if m else "a" for m in minority.tolist()]
        return Batch(self.x[idx], self.y[idx], groups, rows_per_request)


def inverted(batch: Batch) -> Batch:
    """Every pixel inverted (1 - x): a shift of the input distribution the image statistics see at once."""
    return Batch(1.0 - batch.x, batch.y, batch.groups, batch.rows_per_request, perturbed=len(batch.y))


def mirrored_for_minority(batch: Batch, positive_label: int) -> Batch:
    """The minority group's digits of the class of interest mirrored left to right, the rest untouched.

    A mirror keeps every pixel, so each image's mean and spread (what the input-drift profile watches) are
    exactly the same: the only trace is in what the model answers, and only for one group. The model reads
    a mirrored 3 as another digit, so it selects the class of interest less often for that group."""
    mask = (batch.row_groups() == MINORITY) & (batch.y == positive_label)
    x = batch.x.copy()
    x[mask] = x[mask][..., ::-1]
    return Batch(x, batch.y, batch.groups, batch.rows_per_request, perturbed=int(mask.sum()))


def infer_body(pixels: np.ndarray, request_id: str, group: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "inputs": [
            {"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32", "data": pixels.ravel().tolist()}
        ],
    }
    if group is not None:
        body["parameters"] = {"group": group}
    return body


def batches(x: np.ndarray, y: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


def send_labelled(client: Any, url: str, phase: Phase, batch: Batch, *, key: str, prefix: str = "") -> None:
    """One request per ``batch.rows_per_request`` digits, each with its group; counts correct predictions and
    remembers the row ids for feedback."""
    phase.perturbed += batch.perturbed
    requests = batches(batch.x, batch.y, batch.rows_per_request)
    for i, ((xb, yb), group) in enumerate(zip(requests, batch.groups, strict=True)):
        request_id = f"{prefix}{phase.kind}-{i}"
        r = client.post(url, json=infer_body(xb, request_id, group), headers={"Authorization": f"Bearer {key}"})
        phase.statuses[r.status_code] += 1
        if r.status_code != 200:
            continue
        logits = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(len(xb), -1)
        phase.correct += int((logits.argmax(axis=1) == yb).sum())
        phase.scored += len(yb)
        phase.request_ids.extend((f"{request_id}/{j}", int(label)) for j, label in enumerate(yb))


def send_malformed(client: Any, url: str, key: str) -> Phase:
    """Requests a careless client sends: each must get a precise 4xx, never a 5xx."""
    phase = Phase("malformed", "malformed")
    auth = {"Authorization": f"Bearer {key}"}
    good = np.zeros((1, 1, 8, 8), np.float32)
    bodies: list[Any] = [
        {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]},  # wrong rank
        {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]},  # name
        {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 10}]},  # count
        {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "BYTES", "data": ["x"] * 64}]},  # type
        {"inputs": "not a list"},
    ]
    for body in bodies:
        phase.statuses[client.post(url, json=body, headers=auth).status_code] += 1
    not_json = client.post(url, content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    phase.statuses[not_json.status_code] += 1
    nan = infer_body(good, "nan")
    nan["inputs"][0]["data"][0] = float("nan")
    phase.statuses[client.post(url, content=_json_with_nan(nan), headers=auth).status_code] += 1
    return phase


def _json_with_nan(doc: dict[str, Any]) -> bytes:
    import json

    return json.dumps(doc).encode()  # json writes NaN, as some clients do


def send_unauthenticated(client: Any, url: str, x: np.ndarray) -> Phase:
    phase = Phase("unauthenticated", "unauthenticated")
    for i, (xb, _) in enumerate(batches(x[:40], x[:40, 0, 0, 0], 8)):
        headers = {} if i % 2 == 0 else {"Authorization": "Bearer wrong-key"}
        phase.statuses[client.post(url, json=infer_body(xb, f"anon-{i}"), headers=headers).status_code] += 1
    return phase


def send_burst(client: Any, url: str, x: np.ndarray, key: str, count: int) -> Phase:
    """One client firing requests back to back: beyond its token bucket it must get 429s."""
    phase = Phase("burst", "over the rate limit")
    body = infer_body(x[:1], "burst")
    for _ in range(count):
        phase.statuses[client.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code] += 1
    return phase


def send_feedback(client: Any, url: str, key: str, phases: Sequence[Phase], chunk: int = 500) -> int:
    """The ground truth for every answered row, sent back later in bulk as a labelling team would."""
    total = 0
    for phase in phases:
        pairs = phase.request_ids
        for i in range(0, len(pairs), chunk):
            body = {"labels": [{"id": rid, "label": label} for rid, label in pairs[i : i + chunk]]}
            client.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).raise_for_status()
        phase.labels_sent += len(pairs)
        total += len(pairs)
    return total
