"""Boundary probing (monitor.probing): the reference margins, the per-key binomial test, the watch's window, an
old profile without margins, and a bisecting client against a real server with monitoring."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from scipy.stats import beta, binom

from slipstream.monitor.alerts import AlertManager
from slipstream.monitor.config import MonitorConfig
from slipstream.monitor.probing import ProbingTest, binomial_sf, top2_margin, upper_share
from slipstream.monitor.profile import Profile, write_profiled_bundle
from slipstream.monitor.service import Monitor
from slipstream.monitor.store import StoreConfig
from slipstream.monitor.threats import ExtractionWatch
from slipstream.runtime.engine import Engine
from slipstream.serve.guard import hash_key
from slipstream.serve.settings import GuardSettings, MonitorServing, ServeSettings
from tests.monitor.conftest import Digits
from tests.serve_support import ServerThread


def _test(**change: Any) -> ProbingTest:
    base: dict[str, Any] = {"threshold": 0.1, "level": 0.05, "null_share": 0.05, "window_s": 300.0}
    base |= {"min_requests": 30, "min_share": 0.25, "alpha": 1e-6}
    return ProbingTest(**(base | change))


def test_margins_of_probabilities_and_logits_agree_and_labels_have_none() -> None:
    logits = np.random.default_rng(0).normal(0, 3, (50, 4))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ordered = np.sort(p, axis=1)
    expected = ordered[:, -1] - ordered[:, -2]
    np.testing.assert_allclose(top2_margin("probabilities", p.astype(np.float32)), expected, atol=1e-6)
    np.testing.assert_allclose(top2_margin("logits", logits), expected, atol=1e-12)
    assert top2_margin("labels", np.arange(5)[:, None].astype(np.float32)) is None
    assert top2_margin("probabilities", np.ones((5, 1), dtype=np.float32)) is None


def test_the_profile_counts_reference_rows_strictly_below_each_margin(
    digits_profile: Profile, digits_engine: Engine, digits: Digits
) -> None:
    ref = digits_profile.margin
    assert ref is not None and ref.rows == len(digits.x_ref) and digits_profile.schema_version == 4
    margins = top2_margin("probabilities", digits_engine.run({"pixels": digits.x_ref})["probabilities"])
    assert margins is not None
    assert ref.below == [int(np.sum(margins < v)) for v in ref.values]
    assert ref.values == sorted(ref.values) and ref.values[0] >= 0.0 and ref.values[-1] <= 1.0
    assert Profile.from_json_bytes(digits_profile.to_json_bytes()).margin == ref


def test_the_binomial_tail_and_the_reference_bound_are_exact() -> None:
    n = np.array([30, 30, 30, 200, 200, 1, 5])
    k = np.array([0, 3, 20, 10, 60, 1, 6])
    np.testing.assert_allclose(binomial_sf(k, n, 0.07), binom.sf(k - 1, n, 0.07), rtol=1e-9, atol=1e-300)
    assert upper_share(30, 600) == pytest.approx(float(beta.ppf(0.999, 31, 570)), rel=1e-9)
    assert upper_share(600, 600) == 1.0


def test_small_keys_are_not_judged_many_keys_share_the_level_and_a_mild_excess_is_no_probe() -> None:
    test = _test()
    alone = test.judge([(30, 10)])  # p = 1.2e-6: just short of 1e-6
    assert not alone[0].suspicious and alone[0].p_value == pytest.approx(float(binom.sf(9, 30, 0.05)))
    strong = (40, 13)  # p = 4.1e-8: past 1e-6 alone, not past 1e-6 / 100
    assert test.judge([strong])[0].suspicious
    crowd = test.judge([strong] + [(40, 2)] * 99)
    assert not any(v.suspicious for v in crowd) and "normal" in crowd[0].reason
    few = test.judge([(29, 29), strong])  # under min_requests: not judged, and not counted in the family
    assert not few[0].suspicious and "not judged" in few[0].reason and few[1].suspicious
    mild = test.judge([(5000, 500)])  # 10 % near the boundary: far beyond 5 % by the test, but no probe
    assert mild[0].p_value < 1e-20 and not mild[0].suspicious
    assert "13 of 40 rows within margin 0.1" in test.judge([strong])[0].reason


def test_a_shift_that_confuses_the_model_for_every_key_is_not_probing_but_one_key_beyond_the_rest_is() -> None:
    test = _test()
    shifted = [(60, 24)] * 20  # 40 % of every key's rows near the boundary: drift, for the drift rules
    assert not any(v.suspicious for v in test.judge(shifted))
    verdicts = test.judge([*shifted, (60, 55)])  # one key at 92 %, far beyond the others' 40 %
    assert [v.suspicious for v in verdicts] == [False] * 20 + [True] and "other keys now: at most 4" in verdicts[
        -1
    ].reason
    assert test.judge([(60, 24)])[0].suspicious  # alone, nothing to compare with but the reference


def test_the_watch_counts_every_row_of_batched_requests_per_key_and_its_window_slides() -> None:
    watch = ExtractionWatch(probing=_test(window_s=300.0))
    # Three requests: key a (2 rows, both near), key b (1 row, far), key a (3 rows, one near).
    key_ids = ["a", "b", "a"]
    margins = np.array([0.01, 0.05, 0.9, 0.02, 0.5, 0.6])
    for t in range(10):
        watch.record_batch(key_ids, np.full(3, 100.0 + t), np.array([0, 2, 3]), np.array([2, 1, 3]), None, margins)
    flagged = watch.probing_keys(now=110.0)
    assert flagged is not None and [a.key_id for a in flagged] == ["a"]
    assert flagged[0].requests_in_window == 50 and flagged[0].near_boundary_in_window == 30
    assert watch.probing_keys(now=100.0 + 300.0 + 20.0) == []  # every bucket has left the window
    assert ExtractionWatch().probing_keys() is None  # no test (no margin reference): no signal


def test_one_key_sending_batched_requests_counts_their_rows() -> None:
    watch = ExtractionWatch(probing=_test())
    margins = np.array([0.01, 0.02, 0.5, 0.03, 0.04])
    for t in range(8):  # two requests of 2 and 3 rows from one key: 40 rows, 32 near the boundary
        watch.record_batch(["a", "a"], np.full(2, 10.0 + t), np.array([0, 2]), np.array([2, 3]), None, margins)
    (flagged,) = watch.probing_keys(now=20.0) or []
    assert (flagged.requests_in_window, flagged.near_boundary_in_window) == (40, 32)


def test_an_alert_names_what_its_note_says_only_while_it_holds() -> None:
    alerts = AlertManager()
    alerts.explain({"threats.probing_keys": "key abc: 40 of 45 rows near the boundary"})
    alerts.update({"threats.probing_keys": 1.0}, now=1.0)
    (firing,) = [s for s in alerts.states() if s.rule == "boundary_probing"]
    assert firing.state == "firing" and firing.reason.endswith(": key abc: 40 of 45 rows near the boundary")
    alerts.update({"threats.probing_keys": 0.0}, now=2.0)
    (resolved,) = [s for s in alerts.states() if s.rule == "boundary_probing"]
    assert resolved.state == "resolved" and "key abc" not in resolved.reason


def test_an_old_profile_without_margins_has_no_probing_signal_and_says_so(
    digits_profile: Profile, digits_engine: Engine, digits: Digits, caplog: pytest.LogCaptureFixture
) -> None:
    raw = json.loads(digits_profile.to_json_bytes())
    del raw["margin"]
    raw["schema_version"] = 3
    old = Profile.from_json_bytes(json.dumps(raw).encode())
    with caplog.at_level(logging.INFO, logger="slipstream.monitor.service"):
        monitor = Monitor(model="digits", version="1", profile=old, store=None)
    said = [r.getMessage() for r in caplog.records if "boundary probing" in r.getMessage()]
    assert len(said) == 1 and "rebuild the profile" in said[0]
    rows = digits.x_live[:40]
    for i, row in enumerate(rows):
        out = digits_engine.run({"pixels": row[None]})
        monitor.observe(str(i), {"pixels": row[None]}, out, latency_s=0.001, key_id="k")
    snap = monitor.evaluate()
    monitor.close()
    assert snap.metrics["threats.probing_keys"] is None and snap.security.probing_keys == []
    assert any("rebuild the profile" in n for n in snap.security.notes)
    (rule,) = [a for a in snap.alerts if a.rule == "boundary_probing"]
    assert rule.state == "inactive" and "no value yet" in rule.reason


# -- against a real server -------------------------------------------------------------------------------

NORMAL_KEYS = [f"normal-caller-{i}-long-enough" for i in range(3)]
PROBER_KEY = "prober-caller-long-enough-key"


@dataclass(frozen=True)
class Served:
    server: ServerThread
    x_live: np.ndarray
    key_ids: dict[str, str]  # API key -> the id the monitor names it by (a digest prefix, never the key)


@pytest.fixture(scope="module")
def served(
    digits_bundle: Path, digits_profile: Profile, digits: Digits, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """repo/digits/1: the digits classifier and its profile (held-out split); monitoring in the monitor
    process; four API keys."""
    root = tmp_path_factory.mktemp("probing-repo")
    write_profiled_bundle(digits_bundle, root / "digits" / "1", digits_profile)
    hashes = {k: hash_key(k) for k in [*NORMAL_KEYS, PROBER_KEY]}
    settings = ServeSettings(
        port=0,
        access_log=False,
        guard=GuardSettings(api_key_hashes=frozenset(hashes.values())),
        monitor=MonitorServing(
            store=StoreConfig(path=root / "monitor.db"), config=MonitorConfig(evaluate_interval_s=3600)
        ),
    )
    with ServerThread(root, settings) as server:
        yield Served(server, digits.x_live, {k: h.rsplit("$", 1)[1][:16] for k, h in hashes.items()})


def _client(served: Served, key: str) -> httpx.Client:
    return httpx.Client(base_url=served.server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _probabilities(client: httpx.Client, row: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}]}
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"], dtype=np.float64)


def _evaluate(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/v2/models/digits/monitoring", params={"evaluate": "true"})
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _rule(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (rule,) = [a for a in doc["alerts"] if a["rule"] == name]
    return rule


def _normal_traffic(served: Served, start: int, per_key: int) -> None:
    for k, key in enumerate(NORMAL_KEYS):
        with _client(served, key) as client:
            for i in range(per_key):
                _probabilities(client, served.x_live[(start + k * per_key + i) % len(served.x_live)])


def _bisect(client: httpx.Client, a: np.ndarray, b: np.ndarray, steps: int, rng: np.random.Generator) -> int:
    """Walk the segment a→b towards where the served prediction changes class, as a decision-based attack
    does, each query jittered a little so that none nearly repeats another. Returns the queries sent."""
    side = int(_probabilities(client, a).argmax())
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        t = (lo + hi) / 2
        row = np.clip(a + t * (b - a) + rng.normal(0, 0.3, a.shape), 0, 16).astype(np.float32)
        if int(_probabilities(client, row).argmax()) == side:
            lo = t
        else:
            hi = t
    return steps + 1


def test_a_bisecting_client_fires_boundary_probing_for_its_key_and_normal_keys_stay_silent(served: Served) -> None:
    _normal_traffic(served, 0, per_key=60)
    with _client(served, NORMAL_KEYS[0]) as client:
        quiet = _evaluate(client)
    assert quiet["metrics"]["threats.probing_keys"] == 0.0
    assert quiet["security"]["probing_keys"] == [] and quiet["security"]["notes"] == []
    assert _rule(quiet, "boundary_probing")["state"] == "inactive"

    rng = np.random.default_rng(0)
    x = served.x_live
    queries = 0
    with _client(served, PROBER_KEY) as prober:
        classes = [int(_probabilities(prober, x[i]).argmax()) for i in range(40)]
        pairs = [(i, j) for i in range(40) for j in range(i + 1, 40) if classes[i] != classes[j]][:6]
        for i, j in pairs:
            queries += _bisect(prober, x[i], x[j], steps=9, rng=rng)
    _normal_traffic(served, 180, per_key=20)  # the others keep sending meanwhile

    with _client(served, NORMAL_KEYS[1]) as client:
        doc = _evaluate(client)
        metrics = client.get("/metrics").text
    prober_id = served.key_ids[PROBER_KEY]
    flagged = doc["security"]["probing_keys"]
    assert [k["key_id"] for k in flagged] == [prober_id], flagged
    (only,) = flagged
    assert only["signal"] == "boundary_probing" and only["requests_in_window"] == queries + 40
    assert only["near_boundary_in_window"] >= queries // 2 and only["p_value"] < 1e-9
    alert = _rule(doc, "boundary_probing")
    assert alert["state"] == "firing" and f"key {prober_id}" in alert["reason"], alert
    assert not any(served.key_ids[k] in alert["reason"] for k in NORMAL_KEYS)
    # The jittered steps never nearly repeat: the extraction watch alone would not have seen this client.
    assert doc["security"]["suspicious_keys"] == [] and _rule(doc, "model_extraction")["state"] == "inactive"
    assert doc["metrics"]["threats.probing_keys"] == 1.0
    assert 'slipstream_alert_firing{model="digits",rule="boundary_probing",version="1"} 1.0' in metrics
    assert 'slipstream_monitor_value{metric="threats.probing_keys",model="digits",version="1"} 1.0' in metrics
