from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from slipstream.errors import ConfigError
from slipstream.monitor.alerts import DEFAULT_RULES, AlertManager, AlertRule, AlertsConfig

RULE = AlertRule(name="acc", metric="quality.accuracy_drop", threshold=0.05, direction="above", for_s=10)


def test_rule_goes_pending_then_firing_then_resolved() -> None:
    alerts = AlertManager(AlertsConfig(rules=(RULE,)))
    assert alerts.update({"quality.accuracy_drop": 0.2}, now=0) == []
    assert alerts.states()[0].state == "pending"
    assert alerts.update({"quality.accuracy_drop": 0.2}, now=5) == []
    (fired,) = alerts.update({"quality.accuracy_drop": 0.3}, now=10)
    assert fired.state == "firing" and fired.value == 0.3 and "0.3 > 0.05" in fired.reason
    assert alerts.firing() == ["acc"]
    assert alerts.update({"other": 1.0}, now=11) == []  # no value: the state stays
    assert alerts.update({"quality.accuracy_drop": None}, now=12) == []
    (resolved,) = alerts.update({"quality.accuracy_drop": 0.01}, now=20)
    assert resolved.state == "resolved" and "not >" in resolved.reason
    assert alerts.states()[0].state == "resolved" and alerts.firing() == []


def test_a_blip_shorter_than_for_s_never_fires_and_below_rules_work() -> None:
    below = AlertRule(name="ratio", metric="fairness.demographic_parity_ratio", threshold=0.8, direction="below")
    alerts = AlertManager(AlertsConfig(rules=(RULE, below)))
    alerts.update({"quality.accuracy_drop": 0.2, "fairness.demographic_parity_ratio": 0.9}, now=0)
    events = alerts.update({"quality.accuracy_drop": 0.0, "fairness.demographic_parity_ratio": 0.5}, now=3)
    assert [(e.rule, e.state) for e in events] == [("ratio", "firing")]
    assert {s.rule: s.state for s in alerts.states()} == {"acc": "inactive", "ratio": "firing"}


def test_an_interval_rule_fires_only_when_the_whole_interval_is_past_the_threshold() -> None:
    rule = AlertRule(name="dpr", metric="f.ratio", threshold=0.8, direction="below", decide_on="interval")
    assert rule.bound_metric == "f.ratio.high"
    alerts = AlertManager(AlertsConfig(rules=(rule,)))
    # The point estimate is past the threshold, but the interval reaches over it: undecided, no alert.
    assert alerts.update({"f.ratio": 0.7, "f.ratio.low": 0.5, "f.ratio.high": 0.95}, now=0) == []
    state = alerts.states()[0]
    assert state.state == "inactive" and "contains 0.8" in state.reason and (state.low, state.high) == (0.5, 0.95)
    assert alerts.update({"f.ratio": 0.7}, now=1) == []  # no interval: not judged, the state stays
    (fired,) = alerts.update({"f.ratio": 0.6, "f.ratio.low": 0.5, "f.ratio.high": 0.75}, now=2)
    assert fired.state == "firing" and (fired.low, fired.high) == (0.5, 0.75) and "all of it < 0.8" in fired.reason
    # Still past the threshold at the point, interval now straddling: stays firing.
    assert alerts.update({"f.ratio": 0.75, "f.ratio.low": 0.6, "f.ratio.high": 0.9}, now=3) == []
    assert alerts.firing() == ["dpr"]
    (resolved,) = alerts.update({"f.ratio": 0.9, "f.ratio.low": 0.7, "f.ratio.high": 1.0}, now=4)
    assert resolved.state == "resolved"


def test_keep_firing_for_holds_a_firing_alert_through_a_dip_and_resolves_after_it() -> None:
    rule = AlertRule(
        name="drift", metric="drift.drifted_features", threshold=0, direction="above", keep_firing_for_s=30
    )
    alerts = AlertManager(AlertsConfig(rules=(rule,)))
    (fired,) = alerts.update({"drift.drifted_features": 3}, now=0)
    assert fired.state == "firing"
    # One clean window, then drift again: still the same alert, never a resolve and a second fire.
    assert alerts.update({"drift.drifted_features": 0}, now=10) == []
    dipping = alerts.states()[0]
    assert dipping.state == "firing" and dipping.clearing_since == 10 and "clear for 0 s of the 30 s" in dipping.reason
    assert alerts.update({"drift.drifted_features": 2}, now=20) == []
    assert alerts.states()[0].clearing_since is None  # holding again: the clock starts over at the next dip
    assert alerts.update({"drift.drifted_features": 0}, now=30) == []
    assert alerts.update({"drift.drifted_features": 0}, now=50) == []
    assert alerts.states()[0].reason.endswith("clear for 20 s of the 30 s it needs")
    (resolved,) = alerts.update({"drift.drifted_features": 0}, now=60)
    assert resolved.state == "resolved" and resolved.at == 60 and alerts.states()[0].clearing_since is None
    # Without it (the default), the first clean window resolves; the config's value applies to rules without one.
    plain = AlertManager(AlertsConfig(rules=(rule.model_copy(update={"keep_firing_for_s": None}),)))
    plain.update({"drift.drifted_features": 3}, now=0)
    assert [e.state for e in plain.update({"drift.drifted_features": 0}, now=10)] == ["resolved"]
    held = AlertManager(AlertsConfig(rules=DEFAULT_RULES, keep_firing_for_s=60))
    held.update({"drift.drifted_features": 3}, now=0)
    assert held.update({"drift.drifted_features": 0}, now=10) == []  # clear from 10 on
    assert held.update({"drift.drifted_features": 0}, now=69) == [] and held.firing() == ["input_drift"]
    assert [e.rule for e in held.update({"drift.drifted_features": 0}, now=70)] == ["input_drift"]


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        AlertManager(AlertsConfig(rules=(RULE, RULE)))


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, object]]] = []
    release = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).release.wait(10)
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Receiver", (_Receiver,), {"received": [], "release": threading.Event()})
    handler.release.set()
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    server.shutdown()
    server.server_close()


def test_webhook_posts_transitions_to_a_real_loopback_receiver(receiver: tuple[str, type[_Receiver]]) -> None:
    url, handler = receiver
    handler.release.clear()  # a receiver that hangs until released: update() must not wait for it
    alerts = AlertManager(AlertsConfig(rules=(RULE.model_copy(update={"for_s": 0}),), webhook_url=url))
    alerts.update({"quality.accuracy_drop": 0.5}, now=1)
    alerts.update({"quality.accuracy_drop": 0.0}, now=2)
    assert handler.received == []  # both updates returned while the receiver still hangs
    handler.release.set()
    alerts.close()
    assert [e["alert"]["state"] for e in handler.received] == ["firing", "resolved"]  # type: ignore[index]
    assert handler.received[0]["alert"]["rule"] == "acc"  # type: ignore[index]
    assert alerts.webhook is not None and alerts.webhook.sent == 2 and alerts.webhook.failed == 0


def test_an_unreachable_webhook_is_counted_not_raised() -> None:
    alerts = AlertManager(
        AlertsConfig(
            rules=(RULE.model_copy(update={"for_s": 0}),), webhook_url="http://127.0.0.1:9/", webhook_timeout_s=1
        )
    )
    alerts.update({"quality.accuracy_drop": 0.5}, now=1)
    alerts.close()
    assert alerts.webhook is not None and alerts.webhook.failed == 1 and alerts.webhook.last_error is not None
