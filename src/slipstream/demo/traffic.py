"""The demo's traffic: normal, drifted, malformed, unauthenticated and over-the-rate-limit requests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Phase:
    """What one kind of traffic got back."""

    name: str
    statuses: Counter[int] = field(default_factory=Counter)
    correct: int = 0
    scored: int = 0
    request_ids: list[tuple[str, int]] = field(default_factory=list)  # (id, label) for feedback

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None


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


def send_labelled(
    client: Any, url: str, phase: Phase, x: np.ndarray, y: np.ndarray, *, key: str, rows: int, group_of: Any
) -> None:
    """Requests of ``rows`` digits each; counts correct predictions and remembers ids for feedback."""
    for i, (xb, yb) in enumerate(batches(x, y, rows)):
        request_id = f"{phase.name}-{i}"
        group = group_of(i)
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
    phase = Phase("malformed")
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
    phase = Phase("unauthenticated")
    for i, (xb, _) in enumerate(batches(x[:40], x[:40, 0, 0, 0], 8)):
        headers = {} if i % 2 == 0 else {"Authorization": "Bearer wrong-key"}
        phase.statuses[client.post(url, json=infer_body(xb, f"anon-{i}"), headers=headers).status_code] += 1
    return phase


def send_burst(client: Any, url: str, x: np.ndarray, key: str, count: int) -> Phase:
    """One client firing requests back to back: beyond its token bucket it must get 429s."""
    phase = Phase("over the rate limit")
    body = infer_body(x[:1], "burst")
    for _ in range(count):
        phase.statuses[client.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code] += 1
    return phase


def send_feedback(client: Any, url: str, key: str, phases: list[Phase], chunk: int = 500) -> int:
    """The ground truth for every answered row, sent back later in bulk as a labelling team would."""
    pairs = [pair for p in phases for pair in p.request_ids]
    for i in range(0, len(pairs), chunk):
        body = {"labels": [{"id": rid, "label": label} for rid, label in pairs[i : i + chunk]]}
        client.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).raise_for_status()
    return len(pairs)
