"""Served requests as columns: one concatenation per tensor when requests are alike, grouped when not, and
malformed ones counted, never raised; security counters that travel as deltas between processes."""

from __future__ import annotations

import numpy as np

from slipstream.monitor.ingest import Pending, columns
from slipstream.monitor.threats import SecurityCounters


def _pending(rid: str, x: np.ndarray, scores: np.ndarray | None = None) -> Pending:
    out = {"probabilities": np.full((x.shape[0], 3), 0.5, dtype=np.float32)}
    return Pending(rid, 100.0 + len(rid), {"pixels": x}, out, 0.002, "g", "k", scores)


def test_alike_requests_become_one_batch_in_arrival_order() -> None:
    rows = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    items = [_pending("a", rows[:1]), _pending("bb", rows[1:3]), _pending("ccc", rows[3:5])]
    batches, bad = columns(items)
    assert bad == 0 and len(batches) == 1
    b = batches[0]
    assert b.request_ids == ["a", "bb", "ccc"] and b.counts.tolist() == [1, 2, 2] and b.requests == 3
    np.testing.assert_array_equal(b.inputs["pixels"], rows)
    assert b.outputs["probabilities"].shape == (5, 3)
    assert b.ts.tolist() == [101.0, 102.0, 103.0] and b.latency_s.tolist() == [0.002] * 3
    assert b.groups == ["g"] * 3 and b.key_ids == ["k"] * 3 and b.scores is None


def test_unalike_requests_are_grouped_and_malformed_ones_counted() -> None:
    short, long_ = np.zeros((1, 4), np.float32), np.ones((1, 6), np.float32)
    broken = Pending("bad", 0.0, {"pixels": np.float32(1.0)}, {}, 0.0, None, None, None)  # no batch dimension
    batches, bad = columns([_pending("s1", short), _pending("l1", long_), _pending("s2", short), broken])
    assert bad == 1
    assert sorted((b.request_ids, b.inputs["pixels"].shape) for b in batches) == [
        (["l1"], (1, 6)),
        (["s1", "s2"], (2, 4)),
    ]
    assert columns([]) == ([], 0)


def test_screening_scores_travel_with_nan_for_requests_that_were_not_screened() -> None:
    x = np.zeros((2, 4), np.float32)
    (b,), _ = columns([_pending("a", x, np.array([0.5, 7.0])), _pending("b", x[:1])])
    assert b.scores is not None and b.scores[:2].tolist() == [0.5, 7.0] and np.isnan(b.scores[2])


def test_security_counters_are_taken_as_deltas_and_added_elsewhere() -> None:
    here, there = SecurityCounters(), SecurityCounters()
    here.rejected("bad_shape")
    here.rejected("bad_shape", 2)
    here.auth_failed("missing_or_unknown_key")
    here.ood(5, True)
    there.add(here.take())
    here.ood(1, False)
    there.add(here.take())
    assert here.snapshot() == {"rejected": {}, "auth_failed": {}, "ood_rows": 0, "ood_rejected": 0}
    assert there.snapshot() == {
        "rejected": {"bad_shape": 3},
        "auth_failed": {"missing_or_unknown_key": 1},
        "ood_rows": 6,
        "ood_rejected": 1,
    }
