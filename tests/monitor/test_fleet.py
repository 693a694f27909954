"""The fleet as one model (slipstream.monitor.fleet) on a real PostgreSQL cluster (the ``postgres_dsn`` fixture):
one evaluator per model version, taken over when its connection dies, one alert state, one webhook call."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import psycopg
import pytest

from slipstream.monitor.alerts import AlertManager, AlertRule, AlertsConfig
from slipstream.monitor.fleet import FleetCoordinator, Key, evaluation_key
from slipstream.monitor.fleetwindow import fleet_window, newest_rows
from slipstream.monitor.ingest import WindowView
from slipstream.monitor.profile import Profile
from slipstream.monitor.records import PredictionBatch
from slipstream.monitor.service import Monitor, MonitorConfig
from slipstream.monitor.snapshot import MonitorSnapshot
from slipstream.monitor.store import StoreConfig
from slipstream.monitor.store_pg import PostgresStore
from slipstream.runtime.engine import Engine
from slipstream.serve.server import settings_from_options
from tests.monitor.conftest import Digits
from tests.serve_support import API_KEY, ServerThread, add_version

RULE = AlertRule(name="drift", metric="drift.drifted_features", threshold=0, direction="above")
FIRE = {"drift.drifted_features": 3.0}
CALM = {"drift.drifted_features": 0.0}


@pytest.fixture
def key() -> Key:
    """A model version no other test uses: the tests share one database."""
    return (f"m-{uuid.uuid4().hex[:8]}", "1")


@pytest.fixture
def pair(postgres_dsn: str) -> Iterator[tuple[FleetCoordinator, FleetCoordinator]]:
    a, b = FleetCoordinator(postgres_dsn, name="replica-a"), FleetCoordinator(postgres_dsn, name="replica-b")
    yield a, b
    a.close()
    b.close()


class Receiver:
    """A real HTTP server on loopback that records every POSTed alert."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.arrived:
                    receiver.bodies.append(body["alert"])
                    receiver.arrived.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[dict[str, object]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.bodies) >= n, timeout_s)
            return list(self.bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _takes_over(c: FleetCoordinator, key: Key) -> None:
    """Tick until ``c`` evaluates: the old evaluator's backend ends (and releases its lock) asynchronously."""
    deadline = time.monotonic() + 5
    while c.role(key) != "evaluator":
        assert time.monotonic() < deadline, f"{c.name} never took over"
        time.sleep(0.02)


def test_exactly_one_replica_evaluates_each_version(pair: tuple[FleetCoordinator, FleetCoordinator], key: Key) -> None:
    a, b = pair
    assert [a.role(key), b.role(key)] == ["evaluator", "follower"]
    assert [a.role(key), b.role(key)] == ["evaluator", "follower"]  # held, not taken twice
    other = (key[0], "2")  # another version has its own election
    assert [b.role(other), a.role(other)] == ["evaluator", "follower"]
    assert evaluation_key(*key) == evaluation_key(*key) != evaluation_key(*other)


def test_the_other_replica_takes_over_when_the_evaluators_connection_closes(
    pair: tuple[FleetCoordinator, FleetCoordinator], key: Key, postgres_dsn: str
) -> None:
    a, b = pair
    assert a.role(key) == "evaluator" and b.role(key) == "follower"
    # The evaluator's session dies as with a crashed replica: the server ends it; the lock goes with it.
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            ("slipstream-fleet replica-a",),
        ).fetchall()
    assert ended == [(True,)]
    _takes_over(b, key)
    assert not a.publish(key, "{}", 1.0)  # the old evaluator is fenced off: it does not write
    assert a.role(key) == "follower"  # it reconnects and competes again, and loses


def test_alert_state_is_shared_and_survives_a_takeover(
    pair: tuple[FleetCoordinator, FleetCoordinator], key: Key
) -> None:
    a, b = pair
    config = AlertsConfig(rules=(RULE,))
    assert a.role(key) == "evaluator"
    (fired,) = a.update_alerts(key, AlertManager(config), FIRE, now=100.0)
    assert fired.state == "firing"
    assert [(s.rule, s.state, s.since) for s in b.alerts(key)] == [("drift", "firing", 100.0)]
    a.close()
    _takes_over(b, key)
    fresh = AlertManager(config)  # a new evaluator knows nothing in memory: the state comes from the database
    assert b.update_alerts(key, fresh, FIRE, now=110.0) == []  # still firing: no second event
    (resolved,) = b.update_alerts(key, fresh, CALM, now=120.0)
    assert resolved.state == "resolved"
    assert [(e.rule, e.state, e.at) for e in b.events(key)] == [
        ("drift", "firing", 100.0),
        ("drift", "resolved", 120.0),
    ]
    assert [(s.state, s.since) for s in b.alerts(key)] == [("resolved", 120.0)]


def test_a_dip_being_waited_out_survives_a_takeover(pair: tuple[FleetCoordinator, FleetCoordinator], key: Key) -> None:
    """keep_firing_for_s: the moment the condition stopped holding is fleet state too, so a new evaluator
    resolves when the old one would have, not a whole wait later."""
    a, b = pair
    config = AlertsConfig(rules=(RULE.model_copy(update={"keep_firing_for_s": 30.0}),))
    assert a.role(key) == "evaluator"
    a.update_alerts(key, AlertManager(config), FIRE, now=100.0)
    assert a.update_alerts(key, AlertManager(config), CALM, now=110.0) == []  # dipping: still firing
    assert [(s.state, s.clearing_since) for s in b.alerts(key)] == [("firing", 110.0)]
    a.close()
    _takes_over(b, key)
    fresh = AlertManager(config)
    assert b.update_alerts(key, fresh, CALM, now=125.0) == []
    (resolved,) = b.update_alerts(key, fresh, CALM, now=140.0)  # 30 s after the dip began at 110
    assert resolved.state == "resolved"
    assert [(e.state, e.at) for e in b.events(key)] == [("firing", 100.0), ("resolved", 140.0)]


def test_alert_transitions_older_than_the_logs_retention_go_when_a_new_one_comes(postgres_dsn: str, key: Key) -> None:
    c = FleetCoordinator(postgres_dsn, name="replica-r", events_max_age_s=100.0)
    try:
        assert c.role(key) == "evaluator"
        manager = AlertManager(AlertsConfig(rules=(RULE,)))
        for t, metrics in ((0.0, FIRE), (50.0, CALM), (120.0, FIRE)):
            c.update_alerts(key, manager, metrics, now=t)
        assert [e.at for e in c.events(key)] == [50.0, 120.0]  # the one at 0 is over 100 s older than 120
        assert c.update_alerts(key, manager, FIRE, now=400.0) == []  # no transition: nothing written, none go
        assert [e.at for e in c.events(key)] == [50.0, 120.0]
    finally:
        c.close()


def test_a_fleet_table_from_before_keep_firing_gains_its_column(postgres_dsn: str) -> None:
    """A database whose fleet_alerts predates clearing_since: a replica adds the column and keeps the rows."""
    name = f"old_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = postgres_dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(dsn, autocommit=True) as old:
        old.execute(
            "CREATE TABLE fleet_alerts (model TEXT NOT NULL, version TEXT NOT NULL, rule TEXT NOT NULL, "
            "metric TEXT NOT NULL, state TEXT NOT NULL, since DOUBLE PRECISION, value DOUBLE PRECISION, "
            "low DOUBLE PRECISION, high DOUBLE PRECISION, reason TEXT NOT NULL, fired_at DOUBLE PRECISION, "
            "resolved_at DOUBLE PRECISION, updated_at DOUBLE PRECISION NOT NULL, evaluator TEXT NOT NULL, "
            "PRIMARY KEY (model, version, rule))"
        )
        old.execute(
            "INSERT INTO fleet_alerts VALUES ('m', '1', 'drift', 'drift.drifted_features', 'firing', 5, 3, NULL, "
            "NULL, 'drift.drifted_features = 3 > 0', 5, NULL, 5, 'replica-old')"
        )
    c = FleetCoordinator(dsn, name="replica-new")
    try:
        assert [(s.rule, s.state, s.since, s.clearing_since) for s in c.alerts(("m", "1"))] == [
            ("drift", "firing", 5.0, None)
        ]
        config = AlertsConfig(rules=(RULE.model_copy(update={"keep_firing_for_s": 30.0}),))
        assert c.role(("m", "1")) == "evaluator"
        assert c.update_alerts(("m", "1"), AlertManager(config), CALM, now=10.0) == []
        assert [s.clearing_since for s in c.alerts(("m", "1"))] == [10.0]
    finally:
        c.close()


def test_a_follower_publishes_nothing_and_reads_the_evaluators_snapshot(
    pair: tuple[FleetCoordinator, FleetCoordinator], key: Key
) -> None:
    a, b = pair
    assert b.latest(key) is None
    assert a.role(key) == "evaluator" and b.role(key) == "follower"
    assert a.publish(key, '{"at": 1}', 1.0)
    assert not b.publish(key, '{"at": 2}', 2.0)
    assert a.latest(key) == b.latest(key) == '{"at": 1}'
    assert b.evaluator(key) == "replica-a"


def test_the_webhook_gets_one_call_per_alert_from_two_replicas(
    pair: tuple[FleetCoordinator, FleetCoordinator], key: Key, receiver: Receiver
) -> None:
    config = AlertsConfig(rules=(RULE,), webhook_url=receiver.url)
    managers = {c.name: AlertManager(config) for c in pair}
    try:
        # Both replicas tick on the same metrics and both step their alerts, as both monitor processes would
        # (the follower's own step is local and sends nothing); the evaluator dies midway, while it fires.
        for t, metrics in enumerate([CALM, FIRE, FIRE, FIRE, FIRE, CALM, CALM]):
            if t == 3:
                pair[0].close()
                _takes_over(pair[1], key)
            for coordinator in pair:
                coordinator.role(key)
                coordinator.update_alerts(key, managers[coordinator.name], metrics, now=float(t))
        bodies = receiver.wait_for(2)
        time.sleep(0.2)  # a duplicate would arrive in this time: the webhooks' threads are idle by now
        assert [(b["rule"], b["state"], b["at"]) for b in receiver.bodies] == [
            ("drift", "firing", 1.0),
            ("drift", "resolved", 5.0),
        ]
        assert len(bodies) == 2
    finally:
        for m in managers.values():
            m.close()


def test_an_unreachable_database_is_a_clear_error_and_a_lost_one_makes_the_replica_offline(
    postgres_dsn: str, key: Key
) -> None:
    from slipstream.errors import ConfigError

    with pytest.raises(ConfigError, match="Cannot reach the fleet's PostgreSQL"):
        FleetCoordinator("postgresql://postgres@127.0.0.1:1/slipstream", connect_timeout_s=1)
    c = FleetCoordinator(postgres_dsn, name="replica-x")
    try:
        assert c.role(key) == "evaluator"
        c.dsn = "postgresql://postgres@127.0.0.1:1/slipstream"  # where it would reconnect to: nowhere
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                ("slipstream-fleet replica-x",),
            )
        deadline = time.monotonic() + 5
        while c.role(key) != "offline":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        manager = AlertManager(AlertsConfig(rules=(RULE,)))
        (event,) = c.update_alerts(key, manager, FIRE, now=1.0)  # stepped locally, recorded nowhere, sent nowhere
        assert event.state == "firing" and c.events(key) == []
    finally:
        c.close()


def _serve(monitor: Monitor, engine: Engine, x: np.ndarray, ids: list[str]) -> None:
    for rid, row in zip(ids, x, strict=True):
        feeds = {"pixels": row[None, :]}
        monitor.observe(rid, feeds, engine.run(feeds), latency_s=0.001)


def test_two_replicas_are_one_model_drift_alert_and_feedback(
    postgres_dsn: str,
    key: Key,
    receiver: Receiver,
    digits_profile: Profile,
    digits: Digits,
    digits_engine: Engine,
) -> None:
    """Two replicas, each with its own monitor, log and coordinator, on one database: half the traffic each."""
    drift_rule = AlertRule(name="input_drift", metric="drift.drifted_features", threshold=0, direction="above")
    config = MonitorConfig(
        window_rows=300, seed=0, log_raw_inputs=True, alerts=AlertsConfig(rules=(drift_rule,), webhook_url=receiver.url)
    )
    stores = [PostgresStore(StoreConfig(url=postgres_dsn)) for _ in range(2)]
    monitors = [Monitor(model=key[0], version=key[1], profile=digits_profile, store=s, config=config) for s in stores]
    fleet = [FleetCoordinator(postgres_dsn, name=f"replica-{i}") for i in range(2)]
    for coordinator, mon in zip(fleet, monitors, strict=True):
        coordinator.join(key, mon)

    def tick() -> list[MonitorSnapshot]:
        for mon, store in zip(monitors, stores, strict=True):  # every replica's rows are in the log
            mon.ingest()
            store.flush()
        docs = [c.evaluate(key, m) for c, m in zip(fleet, monitors, strict=True)]
        return [MonitorSnapshot.model_validate_json(d) for d in docs]

    try:
        clean_ids = [f"{key[0]}-c{i}" for i in range(300)]
        for i in range(2):  # the balancer alternates: replica i serves every other request
            _serve(monitors[i], digits_engine, digits.x_live[i:300:2], clean_ids[i::2])
        a, b = tick()
        assert fleet[0].role(key) == "evaluator" and fleet[1].role(key) == "follower"
        assert a.drift is not None and a.drift.rows == 300  # the fleet's window, not the evaluator's 150 rows
        assert b.drift == a.drift and b.requests == 150 and a.requests == 150  # b shows the fleet's verdict
        assert not {s.rule for s in b.alerts if s.state == "firing"}

        shifted = digits.noisy(digits.x_live[:300], scale=6.0)
        shifted_ids = [f"{key[0]}-s{i}" for i in range(300)]
        for i in range(2):
            _serve(monitors[i], digits_engine, shifted[i::2], shifted_ids[i::2])
        for _ in range(2):
            a, b = tick()
            for snap in (a, b):  # every replica shows the one alert
                assert [(s.rule, s.state) for s in snap.alerts] == [("input_drift", "firing")]
        assert [(s.rule, s.state) for s in fleet[1].alerts(key)] == [("input_drift", "firing")]
        bodies = receiver.wait_for(1)
        time.sleep(0.2)  # a second call would have arrived by now
        assert (
            [(x["rule"], x["state"]) for x in receiver.bodies]
            == [("input_drift", "firing")]
            == [(x["rule"], x["state"]) for x in bodies]
        )

        # Labels for replica 0's predictions reach replica 1, and replica 0's evaluation joins them.
        labels = list(zip(clean_ids[0::2], digits.y_live[0:300:2].tolist(), strict=True))
        assert monitors[1].feedback_many(labels) == 150
        stores[1].flush()
        joined = stores[0].labeled(labeled_only=True, model=key[0], version=key[1])
        assert sorted(r.request_id for r in joined) == sorted(clean_ids[0::2])
        assert all(r.label == y for r, y in zip(sorted(joined, key=lambda r: r.request_id),
                                               [lab for _, lab in sorted(labels)], strict=True))  # fmt: skip
    finally:
        for mon in monitors:
            mon.close()
        for coordinator in fleet:
            coordinator.close()


def _batch(n: int, *, raw: bool, start: float) -> PredictionBatch:
    rng = np.random.default_rng(int(start))
    return PredictionBatch(
        model="m", version="1", request_ids=[f"r{start + i}" for i in range(n)],
        ts=np.arange(n, dtype=np.float64) + start, latency_ms=np.full(n, start), groups=[None] * n,
        key_ids=[None] * n, prediction=np.full(n, start), confidence=None, ood_score=np.full(n, 9.0),
        outputs={"probs": rng.random((n, 3))}, raw_inputs={"x": rng.random((n, 4))} if raw else None,
    )  # fmt: skip


def test_the_fleet_window_reads_what_the_log_holds_and_the_rest_from_the_evaluator() -> None:
    local = WindowView(
        inputs={"x": np.zeros((5, 4)), "codes": np.ones((5, 1))}, outputs={"slipstream.embedding": np.ones((5, 8))},
        predicted=np.zeros(5), ood=np.zeros(5), latency_ms=np.zeros(5),
    )  # fmt: skip
    newest_first = [_batch(4, raw=True, start=300), _batch(4, raw=True, start=200), _batch(4, raw=True, start=100)]
    batches = newest_rows(iter(newest_first), 6)  # two batches hold 8 >= 6 rows: the third is never read
    assert [b.ts[0] for b in batches] == [200.0, 300.0]
    window = fleet_window(local, batches, 6, ood_threshold=1.0)
    assert window.inputs["x"].shape == (6, 4) and np.array_equal(
        window.inputs["x"][-4:], newest_first[0].raw_inputs["x"]
    )  # type: ignore[index]
    assert window.inputs["codes"] is local.inputs["codes"]  # string columns' codes are never logged
    assert window.outputs["probs"].shape == (6, 3) and "slipstream.embedding" in window.outputs
    assert window.predicted.tolist() == [200.0] * 2 + [300.0] * 4  # type: ignore[union-attr]
    assert window.ood.tolist() == [1.0] * 6 and window.latency_ms.shape == (6,)  # type: ignore[union-attr]
    # One batch without raw inputs: the log cannot give a fair input window, so the evaluator's stands.
    mixed = fleet_window(local, [_batch(4, raw=False, start=1), _batch(4, raw=True, start=2)], 6, 1.0)
    assert mixed.inputs["x"] is local.inputs["x"] and mixed.outputs["probs"].shape == (6, 3)
    assert fleet_window(local, [], 6, 1.0) is local


def test_two_servers_on_one_database_evaluate_once_and_join_feedback_across(
    postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two real servers, each with its own monitor process, on one PostgreSQL database."""
    name = f"fleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = postgres_dsn.rsplit("/", 1)[0] + "/" + name
    repo = tmp_path_factory.mktemp("repo")
    add_version(repo, "mlp", "1", tmp_path_factory.mktemp("work"))
    options = {"port": 0, "access_log": False, "monitor": {"store": {"path": url}, "standby": False,
                                                          "config": {"evaluate_interval_s": 3600}}}  # fmt: skip
    settings = settings_from_options(options, {"SLIPSTREAM_API_KEYS": API_KEY})
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}], "id": "req-a"}
    try:
        with ServerThread(repo, settings) as a, ServerThread(repo, settings) as b:
            with httpx.Client(base_url=a.url, headers=auth, timeout=30) as client:
                assert client.post("/v2/models/mlp/infer", json=body).status_code == 200
            with httpx.Client(base_url=b.url, headers=auth, timeout=30) as client:  # the label reaches replica b
                r = client.post("/v2/models/mlp/feedback", json={"id": "req-a", "label": 3})
                assert r.status_code in (200, 202)
            for server in (a, b):
                assert server.app.monitors is not None and server.app.monitors.flush()["pending"] == 0
            snaps = [s.app.monitors.monitors()[0].evaluate() for s in (a, b)]  # type: ignore[union-attr]
            assert snaps[0].at == snaps[1].at  # one evaluation, shown by both
            assert [snaps[0].requests, snaps[1].requests] == [1, 0]  # each its own traffic counters
            with psycopg.connect(url) as conn:
                assert len(conn.execute("SELECT evaluator FROM fleet_snapshots").fetchall()) == 1
            reader = PostgresStore(StoreConfig(url=url))
            try:
                joined = reader.labeled(labeled_only=True, model="mlp", version="1")
            finally:
                reader.close()
            assert [(r.request_id, r.label) for r in joined] == [("req-a", 3.0)]
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
