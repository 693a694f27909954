from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np

from slipstream.monitor.profile import Profile
from slipstream.monitor.threats import ExtractionWatch, IntegrityWatch, OODScorer, SecurityCounters, ThreatConfig
from tests.monitor.conftest import Digits


def test_ood_score_separates_real_digits_from_shifted_ones(digits_profile: Profile, digits: Digits) -> None:
    scorer = OODScorer(digits_profile)
    clean = scorer.score({"pixels": digits.x_live})
    inverted = scorer.score({"pixels": Digits.inverted(digits.x_live)})
    noisy = scorer.score({"pixels": digits.noisy(digits.x_live, scale=6.0)})
    assert np.mean(clean > 3.0) < 0.01
    assert np.mean(inverted > 3.0) > 0.95 and np.mean(noisy > 3.0) > 0.5
    broken = digits.x_live[:2].copy()
    broken[0, 5] = np.nan
    assert scorer.score({"pixels": broken})[0] == np.inf and np.isfinite(scorer.score({"pixels": broken})[1])


def test_one_row_scores_the_same_on_the_fast_path(digits_profile: Profile, digits: Digits) -> None:
    scorer = OODScorer(digits_profile)
    rows = np.concatenate([digits.x_live[:20], Digits.inverted(digits.x_live[:20])])
    one = [scorer.score_one({"pixels": rows[i : i + 1]}) for i in range(len(rows))]
    np.testing.assert_allclose(np.array(one, dtype=np.float64), scorer.score({"pixels": rows}), rtol=1e-4, atol=1e-4)
    assert scorer.score_one({"pixels": rows[:2]}) is None  # several rows: the batch path
    broken = rows[:1].copy()
    broken[0, 3] = np.nan
    assert scorer.score_one({"pixels": broken}) == np.inf == scorer.score({"pixels": broken})[0]


def test_probing_by_small_steps_flags_a_key_and_ordinary_traffic_does_not(digits: Digits) -> None:
    watch = ExtractionWatch(ThreatConfig(extraction_min_requests=30))
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    for i in range(40):  # an attacker walks a line through input space in tiny steps
        prober = watch.observe("attacker", base + 0.001 * i, now=float(i))
        honest = watch.observe("honest", rng.normal(size=64), now=float(i))
    assert prober.suspicious and prober.near_duplicates_in_window == 39 and "nearly repeat" in prober.reason
    assert not honest.suspicious and honest.near_duplicates_in_window == 0
    assert [a.key_id for a in watch.suspicious_keys(now=40.0)] == ["attacker"]
    # The window slides: an hour later the key is clean again.
    assert watch.suspicious_keys(now=4000.0) == []


def test_volume_alone_flags_a_key() -> None:
    watch = ExtractionWatch(ThreatConfig(extraction_max_requests=100, extraction_window_s=10))
    rng = np.random.default_rng(1)
    last = None
    for i in range(101):
        last = watch.observe("bulk", rng.normal(size=8), now=i * 0.01)
    assert last is not None and last.suspicious and "101 requests" in last.reason


def test_counters_are_thread_safe() -> None:
    counters = SecurityCounters()

    def work() -> None:
        for _ in range(1000):
            counters.rejected("bad_shape")
            counters.auth_failed()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters.ood(3, rejected=True)
    snap = counters.snapshot()
    assert snap == {
        "rejected": {"bad_shape": 4000},
        "auth_failed": {"unknown_key": 4000},
        "ood_rows": 3,
        "ood_rejected": 1,
    }


def test_integrity_watch_notices_a_changed_file(digits_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(digits_bundle, copy)
    now = [0.0]
    watch = IntegrityWatch(copy, interval_s=60, clock=lambda: now[0])
    assert watch.due() and watch.check().ok and not watch.due()
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    now[0] = 61.0
    assert watch.due()
    status = watch.check()
    assert not status.ok and status.checks == 2 and status.error is not None and "model.onnx" in status.error


def test_few_rows_of_a_key_row_by_row_and_many_at_once_find_the_same_repeats() -> None:
    """Keys with a few requests in a batch take the row-by-row path, keys with many the vectorized one."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3, 16))
    for n in (1, 2, 3, 9, 30):  # around the switch (2) and past it
        watch = ExtractionWatch(ThreatConfig(extraction_min_requests=1))
        watch.record_many("k", base, [0.0, 1.0, 2.0])  # the key's history: three inputs
        fresh = rng.normal(size=(n, 16))
        fresh[::2] = base[0] + 1e-4  # every other row nearly repeats the first input
        got = watch.observe_many("k", fresh, [10.0 + i for i in range(n)])
        assert got.requests_in_window == 3 + n and got.near_duplicates_in_window == (n + 1) // 2, n


def test_many_keys_with_one_request_each_are_each_compared_with_their_own_history() -> None:
    watch = ExtractionWatch(ThreatConfig(extraction_min_requests=2))
    rng = np.random.default_rng(3)
    first = {f"key{i}": rng.normal(size=(1, 8)) for i in range(50)}
    for key, row in first.items():
        watch.record_many(key, row, [0.0])
    for i, (key, row) in enumerate(first.items()):  # even keys repeat their own input, odd keys send new ones
        watch.record_many(key, row if i % 2 == 0 else rng.normal(size=(1, 8)), [1.0])
    flagged = {a.key_id for a in watch.suspicious_keys(now=2.0)}
    assert flagged == {f"key{i}" for i in range(0, 50, 2)}
