"""The server monitoring itself, over real HTTP: a trained digits MLP with its reference profile, a real
SQLite prediction log, in-distribution then shifted traffic with a group attribute and delayed labels,
feedback and monitoring endpoints, /metrics, and the live dashboard in headless Chromium."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from slipstream.importers import import_onnx
from slipstream.monitor import profile_from_bundle, write_profiled_bundle
from slipstream.monitor.config import MonitorConfig
from slipstream.monitor.logfile import read_records
from slipstream.monitor.quality import QualityConfig
from slipstream.monitor.threats import ThreatConfig
from slipstream.serve.guard import hash_key
from slipstream.serve.server import settings_from_options
from slipstream.serve.settings import GuardSettings, ServeSettings
from tests.browser import screenshot
from tests.onnx_models import build_trained_digits_mlp
from tests.serve_support import API_KEY, ServerThread, monitored_settings

AUTH = {"Authorization": f"Bearer {API_KEY}"}
DRIFT_RULES = {"input_drift", "multivariate_drift", "prediction_drift"}
QUALITY_RULES = {"accuracy_drop", "estimated_accuracy_drop"}


@dataclass(frozen=True)
class DigitsRepo:
    root: Path
    x_live: np.ndarray
    y_live: np.ndarray


@pytest.fixture(scope="module")
def digits_repo(tmp_path_factory: pytest.TempPathFactory) -> DigitsRepo:
    """repo/digits/1: the MLP + a profile of its held-out split; repo/plain/1: the same model, no profile.

    Live traffic replays the training split: the same distribution, and distinct rows (a window that
    repeats rows looks like evidence to the p-value tests small windows are judged by)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    model, x_test, y_test = build_trained_digits_mlp()
    x, y = load_digits(return_X_y=True)
    x_train, _, y_train, _ = train_test_split(
        (x / 16.0).astype(np.float32), y, test_size=0.3, random_state=0, stratify=y
    )  # the split build_trained_digits_mlp trained on
    work = tmp_path_factory.mktemp("digits-work")
    onnx.save_model(model, str(work / "digits.onnx"))
    bare = import_onnx(work / "digits.onnx", work / "bare", name="digits", version="1").path
    profile = profile_from_bundle(bare, {"pixels": x_test}, y_test)
    root = tmp_path_factory.mktemp("digits-repo")
    write_profiled_bundle(bare, root / "digits" / "1", profile)
    import_onnx(work / "digits.onnx", root / "plain" / "1", name="plain", version="1")
    return DigitsRepo(root, x_train, y_train.astype(np.int64))


@pytest.fixture(scope="module")
def monitored(digits_repo: DigitsRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    db = tmp_path_factory.mktemp("monitor-db") / "monitor.db"
    settings = monitored_settings(
        db, MonitorConfig(evaluate_interval_s=3600, window_rows=300, quality=QualityConfig(window_rows=300))
    )
    with ServerThread(digits_repo.root, settings) as server:
        yield server


def _infer(client: httpx.Client, model: str, row: np.ndarray, rid: str, group: str | None) -> httpx.Response:
    body: dict[str, Any] = {
        "id": rid,
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}],
    }
    if group is not None:
        body["parameters"] = {"group": group}
    return client.post(f"/v2/models/{model}/infer", json=body)


def _send(client: httpx.Client, x: np.ndarray, ids: list[str], groups: list[str]) -> list[int]:
    return [_infer(client, "digits", row, rid, g).status_code for row, rid, g in zip(x, ids, groups, strict=True)]


def _feedback(client: httpx.Client, ids: list[str], labels: np.ndarray) -> None:
    body = {"labels": [{"id": i, "label": int(y)} for i, y in zip(ids, labels, strict=True)]}
    r = client.post("/v2/models/digits/feedback", json=body)
    assert r.status_code == 200 and r.json() == {"received": len(ids), "accepted": len(ids)}


def _evaluate(client: httpx.Client, model: str = "digits") -> dict[str, Any]:
    r = client.get(f"/v2/models/{model}/monitoring", params={"evaluate": "true"})
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


def _firing(doc: dict[str, Any]) -> set[str]:
    return {a["rule"] for a in doc["alerts"] if a["state"] == "firing"}


def test_scenario_drift_after_the_shift_accuracy_bias_and_every_request_accounted_for(
    monitored: ServerThread, digits_repo: DigitsRepo
) -> None:
    x, y = digits_repo.x_live, digits_repo.y_live
    n = 300
    rows = np.stack([x[i % len(x)] for i in range(n)])
    labels = np.array([y[i % len(y)] for i in range(n)])
    # Group "b" never sends a 1: the model selects class 1 at different rates for the two groups.
    groups = ["a" if (i % 2 == 0 or labels[i] == 1) else "b" for i in range(n)]
    statuses: list[int] = []
    with httpx.Client(base_url=monitored.url, headers=AUTH, timeout=30) as client:
        before: list[dict[str, Any]] = []
        for start in range(0, n, 150):
            ids = [f"clean-{i}" for i in range(start, start + 150)]
            statuses += _send(client, rows[start : start + 150], ids, groups[start : start + 150])
            _feedback(client, ids, labels[start : start + 150])
            before.append(_evaluate(client))
        for doc in before:  # zero false alerts on in-distribution traffic
            assert doc["profile"] is True and doc["drift"]["judged"]
            assert doc["drift"]["drifted_features"] == []
            assert not _firing(doc) & (DRIFT_RULES | QUALITY_RULES | {"out_of_distribution"})
        clean = before[-1]
        assert clean["quality"]["labeled"] >= 250 and not clean["quality"]["degraded"]

        # The shift: heavy pixel noise, labels withheld at first. (Inverted pixels drift as loudly, but this
        # ReLU MLP stays ~97 % confident on them while 0.4 % right, so no confidence-based estimate can move:
        # the out-of-distribution screen is the defence there, see test_ood_rejection_and_a_model_without_profile.)
        shifted_ids = [f"shifted-{i}" for i in range(n)]
        noisy = np.clip(rows + np.random.default_rng(1).normal(0, 0.4, rows.shape), 0, 1).astype(np.float32)
        statuses += _send(client, noisy, shifted_ids, groups)
        unlabeled = _evaluate(client)
        assert DRIFT_RULES & _firing(unlabeled)
        assert len(unlabeled["drift"]["drifted_features"]) > 10
        q = unlabeled["quality"]
        # No label of the shifted traffic yet: the realized accuracy still reads the clean labels.
        assert "accuracy_drop" not in _firing(unlabeled)
        assert q["realized"]["accuracy"] == pytest.approx(clean["quality"]["realized"]["accuracy"], abs=0.02)
        # The estimate moved before any label of the shifted traffic arrived.
        assert q["estimated_accuracy"] < clean["quality"]["estimated_accuracy"] - 0.05

        _feedback(client, shifted_ids, labels)
        labeled = _evaluate(client)
        assert "accuracy_drop" in _firing(labeled)
        assert labeled["quality"]["accuracy_drop"] > 0.15
        # Bias: flagged from the start (the groups are treated differently throughout), and still flagged.
        assert clean["fairness"]["flagged"] and "demographic_parity" in _firing(clean)
        assert labeled["fairness"]["flagged"] and {"demographic_parity", "demographic_parity_ratio"} & _firing(labeled)

        # Every request accounted for: observed, sampled (100 %), and logged or counted as dropped.
        assert statuses == [200] * (2 * n)
        assert labeled["requests"] == labeled["rows"] == labeled["sampled"] == 2 * n
        store = labeled["store"]
        assert store["written_predictions"] + store["dropped"] == labeled["sampled"]
        assert store["dropped"] == 0 and store["written_feedback"] == 2 * n

        # Security events: a request without a key is refused and counted against the model it aimed at.
        assert (
            client.post("/v2/models/digits/infer", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        )
        # The monitor's series in /metrics.
        metrics = client.get("/metrics").text
        assert 'slipstream_alert_firing{model="digits",rule="input_drift",version="1"} 1.0' in metrics
        assert 'slipstream_monitor_value{metric="quality.realized_accuracy",model="digits",version="1"}' in metrics
        assert 'slipstream_monitor_value{metric="quality.estimated_accuracy",model="digits",version="1"}' in metrics
        assert 'slipstream_monitor_log_records_total{model="digits",outcome="dropped_buffer_full",version="1"} 0.0' in (
            metrics
        )
        assert 'slipstream_monitor_drift_psi{feature="pixels[' in metrics
        after = _evaluate(client)
        assert after["security"]["counters"]["auth_failed"] == {"missing_or_unknown_key": 1}

    conn = sqlite3.connect(monitored.settings.monitor.db_path or "")
    try:
        assert conn.execute("SELECT SUM(rows) FROM prediction_log").fetchone()[0] == 2 * n
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 2 * n
    finally:
        conn.close()


def test_feedback_and_monitoring_are_guarded_validated_and_404_for_unknown_models(monitored: ServerThread) -> None:
    with httpx.Client(base_url=monitored.url, timeout=30) as client:
        assert client.post("/v2/models/digits/feedback", json={"id": "x", "label": 1}).status_code == 401
        assert client.get("/v2/models/digits/monitoring").status_code == 401
        assert client.get("/v2/monitoring").status_code == 401
        client.headers.update(AUTH)
        single = client.post("/v2/models/digits/versions/1/feedback", json={"id": "late-1", "label": 3})
        assert single.status_code == 200 and single.json()["accepted"] == 1
        bad = client.post(
            "/v2/models/digits/feedback",
            json={"labels": [{"id": "ok", "label": 1}, {"id": "r2", "label": "cat"}, {"label": 2}]},
        )
        assert bad.status_code == 400
        assert "entry 1: label 'cat'" in bad.json()["error"] and "entry 2" in bad.json()["error"]
        assert client.post("/v2/models/digits/feedback", json={"nothing": 1}).status_code == 400
        assert client.post("/v2/models/digits/feedback", content=b"{not json").status_code == 400
        assert client.post("/v2/models/nope/feedback", json={"id": "x", "label": 1}).status_code == 404
        assert client.get("/v2/models/nope/monitoring").status_code == 404
        assert client.get("/v2/models/digits/feedback").status_code == 405


def test_dashboard_renders_live_data_in_headless_chromium(
    monitored: ServerThread, digits_repo: DigitsRepo, tmp_path: Path
) -> None:
    with httpx.Client(base_url=monitored.url, headers=AUTH, timeout=30) as client:
        ids = [f"dash-{i}" for i in range(60)]
        groups = ["a" if i % 3 else "b" for i in range(60)]
        assert _send(client, digits_repo.x_live[:60], ids, groups) == [200] * 60
        _feedback(client, ids, digits_repo.y_live[:60])
        _evaluate(client)
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert b"http://" not in page.content and b"https://" not in page.content  # nothing loaded from elsewhere
        server = client.get("/v2/monitoring").json()
        assert server["requests"]["digits"]["200"] >= 60 and server["models"][0]["model"] in ("digits", "plain")
    out = tmp_path / "dashboard.png"
    facts = screenshot(f"{monitored.url}/dashboard#key={API_KEY}", out, selector="#loaded[data-polls='2']")
    assert out.stat().st_size > 20_000
    assert "model(s)" in str(facts["title"]) and "alert(s) firing" in str(facts["title"])
    # The accuracy drops the alerts decide on are shown with their intervals.
    assert re.search(r"drop -?\d\.\d{3}, interval -?\d\.\d{3} to -?\d\.\d{3}", str(facts["text"]))
    svgs = facts["svgs"]
    assert isinstance(svgs, list) and len(svgs) >= 4  # throughput, latency, accuracy, drift bars
    assert all(s["w"] > 100 for s in svgs)
    assert sum(s["points"] for s in svgs) >= 4  # the charts hold data points (a circle marks each line's last)


def test_ood_rejection_and_a_model_without_profile(digits_repo: DigitsRepo, tmp_path: Path) -> None:
    settings = monitored_settings(
        tmp_path / "m.db", MonitorConfig(evaluate_interval_s=3600, threats=ThreatConfig(reject_ood_above=6.0))
    )
    with (
        ServerThread(digits_repo.root, settings) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        row = digits_repo.x_live[0]
        assert _infer(client, "digits", row, "in", None).status_code == 200
        refused = _infer(client, "digits", (1.0 - row).astype(np.float32), "out", None)
        assert refused.status_code == 400 and "out of distribution" in refused.json()["error"]
        doc = _evaluate(client)
        assert doc["security"]["counters"]["rejected"] == {"out_of_distribution": 1}
        assert doc["requests"] == 1  # the refused request never reached the model
        assert 'slipstream_rejections_total{reason="out_of_distribution"} 1.0' in client.get("/metrics").text

        # No profile: served and monitored (latency, outputs, feedback), drift and OOD honestly absent.
        assert _infer(client, "plain", (1.0 - row).astype(np.float32), "plain-1", "a").status_code == 200
        assert client.post("/v2/models/plain/feedback", json={"id": "plain-1", "label": 0}).json()["accepted"] == 1
        plain = _evaluate(client, "plain")
        assert plain["profile"] is False and "no reference profile" in plain["notes"][0]
        assert plain["drift"] is None and plain["requests"] == 1 and plain["store"]["written_predictions"] >= 1
        assert client.get("/v2/health/ready").status_code == 200


def test_monitoring_off_by_default_costs_nothing_and_says_so(digits_repo: DigitsRepo) -> None:
    with (
        ServerThread(digits_repo.root, ServeSettings(port=0, access_log=False)) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        assert server.app.core.monitors is None
        assert all(e.monitor is None for v in server.app.repository.models.values() for e in v.values())
        assert _infer(client, "digits", digits_repo.x_live[0], "r", "a").status_code == 200
        off = client.post("/v2/models/digits/feedback", json={"id": "r", "label": 1})
        assert off.status_code == 404 and "--monitor-db" in off.json()["error"]
        assert "slipstream_monitor" not in client.get("/metrics").text


def test_nested_monitor_options_become_the_monitor_settings(tmp_path: Path) -> None:
    settings = settings_from_options(
        {"monitor": {"store": {"path": tmp_path / "m.db"}, "group_parameter": "cohort", "standby": False,
                     "restart_max_s": 5.0, "log_max_mb": 1.5,
                     "config": {"sample_rate": 0.25, "threats": {"reject_ood_above": 8.0},
                                "alerts": {"webhook_url": "http://127.0.0.1:9/hook", "keep_firing_for_s": 45.0}}}},
        {},
    )  # fmt: skip
    m = settings.monitor
    assert m.enabled and m.db_path == tmp_path / "m.db" and m.group_parameter == "cohort"
    assert m.config.sample_rate == 0.25 and m.ood_reject_above == 8.0 == m.config.threats.reject_ood_above
    assert m.config.alerts.webhook_url == "http://127.0.0.1:9/hook" and m.config.alerts.keep_firing_for_s == 45.0
    assert not m.standby and m.restart_max_s == 5.0 and m.log_max_mb == 1.5
    assert not ServeSettings().monitor.enabled and ServeSettings().monitor.db_path is None
    from slipstream.errors import ConfigError

    with pytest.raises(ConfigError, match=r"monitor\.config\.sample_rate"):
        settings_from_options({"monitor": {"store": {"path": tmp_path / "m.db"}, "config": {"sample_rate": 2}}}, {})


def test_a_new_version_gets_its_own_monitor_and_the_old_one_is_closed(digits_repo: DigitsRepo, tmp_path: Path) -> None:
    import shutil
    import time

    from tests.serve_support import ADMIN_KEY

    repo = tmp_path / "repo"
    shutil.copytree(digits_repo.root / "digits", repo / "digits")
    settings = monitored_settings(tmp_path / "m.db").model_copy(
        update={"guard": GuardSettings(api_key_hashes=frozenset({hash_key(API_KEY)}),
                                       admin_key_hashes=frozenset({hash_key(ADMIN_KEY)}))}
    )  # fmt: skip
    with ServerThread(repo, settings) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        monitors = server.app.core.monitors
        assert monitors is not None and set(monitors.active) == {("digits", "1")}
        assert _infer(client, "digits", digits_repo.x_live[0], "v1-req", "a").status_code == 200
        first = _evaluate(client)  # in the monitor process, after everything observed so far
        assert first["version"] == "1" and first["requests"] == 1
        shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
        load = client.post("/v2/repository/models/digits/load", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert load.status_code == 200
        deadline = time.monotonic() + 20
        while ("digits", "1") in monitors.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(monitors.active) == {("digits", "2")}  # v1 retired: its monitor closed, the shared log open
        answer = _infer(client, "digits", digits_repo.x_live[1], "v2-req", "a")
        assert answer.status_code == 200 and answer.json()["model_version"] == "2"
        # A late label for a request v1 served still lands in the shared log.
        assert client.post("/v2/models/digits/feedback", json={"id": "v1-req", "label": 0}).json()["accepted"] == 1
        doc = _evaluate(client)
        assert doc["version"] == "2" and doc["requests"] == 1 and doc["store"]["written_feedback"] == 1
    assert [(r.request_id, r.version) for r in read_records(tmp_path / "m.db")] == [("v1-req", "1"), ("v2-req", "2")]


def test_the_monitor_process_and_its_log_writer_yield_to_serving(monitored: ServerThread) -> None:
    """Linux keeps a niceness per thread: the log's writer thread must be as nice as the process."""
    monitors = monitored.app.core.monitors
    assert monitors is not None and monitors.process is not None
    pid = monitors.process.process.pid
    nice = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()
        nice[int(stat.parent.name)] = int(fields[16])  # field 19 of proc(5), counted after the name
    wanted = monitors.settings.process_nice
    assert wanted > 0 and nice[pid] == wanted
    # The main thread and the log's writer; an idle thread that an import starts may stay at 0.
    assert sum(v == wanted for v in nice.values()) >= 2, nice


def test_the_monitor_process_runs_on_a_cpu_the_event_loop_does_not_use(monitored: ServerThread) -> None:
    monitors = monitored.app.core.monitors
    assert monitors is not None and monitors.process is not None
    placed = monitors.placement
    allowed = frozenset(os.sched_getaffinity(0))
    monitor_cpus = frozenset(os.sched_getaffinity(monitors.process.process.pid))
    loop_cpus = frozenset(os.sched_getaffinity(monitored.thread.native_id or 0))  # the server's event loop
    if len(allowed) < 2:
        assert placed.monitor is None and monitor_cpus == loop_cpus == allowed
    else:
        assert (
            monitor_cpus == placed.monitor == frozenset({max(allowed)})
            and loop_cpus == placed.loop == allowed - monitor_cpus
        )


def test_an_unusable_prediction_log_stops_the_server_before_it_serves(digits_repo: DigitsRepo, tmp_path: Path) -> None:
    from slipstream.errors import ConfigError
    from slipstream.serve.app import create_app

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="Cannot open the prediction log") as info:
        create_app(digits_repo.root, monitored_settings(tmp_path / "file" / "monitor.db"))
    assert info.value.hint is not None and "writable" in info.value.hint


def test_the_log_holds_the_same_rows_whether_every_row_or_a_sample_is_logged(tmp_path: Path) -> None:
    """The usual batch (every row sampled, one row per request) is logged as its columns came, without a
    gather; a sampled batch is gathered. Both must say the same about each row they log."""
    from slipstream.monitor.ingest import Ingestor, IngestSettings, Pending, columns
    from slipstream.monitor.logfile import read_batches
    from slipstream.monitor.store import SQLiteStore, StoreConfig
    from slipstream.monitor.threats import ExtractionWatch, SecurityCounters

    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    items = [Pending(f"r{i}", 10.0 + i, {"x": x[i : i + 1]}, {"y": 2 * x[i : i + 1]}, 0.001 * i, f"g{i % 2}", "k", None)
             for i in range(20)]  # fmt: skip
    (cols,), bad = columns(items)
    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    for version, rate in (("whole", 1.0), ("sampled", 0.5)):
        settings = IngestSettings("m", version, rate, True, 64, 100, 100, 1e9, 0)
        Ingestor(settings, None, store, None, ExtractionWatch(), SecurityCounters(), clock=lambda: 0.0).ingest(cols)
    store.close()
    conn = sqlite3.connect(tmp_path / "m.db")
    try:
        (whole,) = read_batches(conn, version="whole")
        (sampled,) = read_batches(conn, version="sampled")
    finally:
        conn.close()
    assert bad == 0 and whole.request_ids == [f"r{i}" for i in range(20)] and 0 < len(sampled) < 20
    for batch in (whole, sampled):
        assert batch.raw_inputs is not None
        for j, rid in enumerate(batch.request_ids):
            i = int(rid[1:])
            assert (batch.ts[j], batch.groups[j], batch.key_ids[j]) == (10.0 + i, f"g{i % 2}", "k")
            assert batch.latency_ms[j] == pytest.approx(i)
            np.testing.assert_array_equal(batch.raw_inputs["x"][j], x[i])
            np.testing.assert_array_equal(batch.outputs["y"][j], 2 * x[i])
            assert batch.input_stats["x.mean"][j] == pytest.approx(x[i].mean())


def test_requests_with_as_many_tensors_under_other_names_are_grouped_not_merged() -> None:
    """columns() takes requests as alike by their tensor counts, then by the first request's names: one with
    the same count under another name must land in a batch of its own, not be dropped or merged."""
    from slipstream.monitor.ingest import Pending, columns

    one = np.ones((1, 3), np.float32)
    items = [Pending(rid, 0.0, {name: one}, {"y": one}, 0.0, None, None, None)
             for rid, name in (("a1", "a"), ("b1", "b"), ("a2", "a"))]  # fmt: skip
    batches, bad = columns(items)
    assert bad == 0
    assert sorted((b.request_ids, sorted(b.inputs)) for b in batches) == [(["a1", "a2"], ["a"]), (["b1"], ["b"])]
