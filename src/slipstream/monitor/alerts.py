"""Alert rules over monitor metrics, their state, and an optional webhook.

A rule watches one named metric (e.g. ``quality.accuracy_drop``) against a threshold in a direction; the
condition must hold for ``for_s`` seconds before the alert fires (pending meanwhile), and the alert resolves
when the condition stops holding. A rule that decides on the interval (``decide_on="interval"``) reads the
metric's confidence bounds, published beside it as ``<metric>.low`` and ``<metric>.high``: it holds only when
the whole interval lies beyond the threshold (the lower bound above it, or the upper bound below it), so a
gap that sampling noise alone could explain never fires. A firing interval rule resolves when the point
estimate is back on the good side of the threshold; while only the interval still reaches past it, the rule is
undecided and stays as it is, and the reason says so.

Per-key rules (extraction, boundary probing) name their keys: the monitor passes a note per metric
(:meth:`AlertManager.explain`), added to the reason while the rule holds. Every transition is logged and
returned as an :class:`AlertEvent`; a :class:`Webhook` posts events as JSON
from its own thread through a bounded queue, so neither evaluating rules nor a slow receiver ever blocks a
caller. A metric with no value (``None``) leaves the state as it is.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from pydantic import Field

from slipstream.frozen import Frozen

log = logging.getLogger(__name__)


class AlertRule(Frozen):
    name: str = Field(min_length=1, description="Unique rule name, shown in /metrics and the logs.")
    metric: str = Field(description="The monitor metric it watches, e.g. 'drift.drifted_features'.")
    threshold: float = Field(description="The value the metric is compared with.")
    direction: Literal["above", "below"] = Field(description="Fire when the metric is above / below it.")
    for_s: float = Field(default=0.0, ge=0, description="How long the condition must hold before firing.")
    keep_firing_for_s: float | None = Field(
        default=None,
        ge=0,
        description="How long a firing alert stays firing after its condition stops holding: a metric that "
        "dips under the threshold for one evaluation and comes back is one alert, not a resolve and a new fire "
        "(Prometheus' keep_firing_for). 0: resolve at the first evaluation that clears; None: the "
        "AlertsConfig's keep_firing_for_s.",
    )
    severity: Literal["info", "warning", "critical"] = Field(default="warning", description="For the receiver.")
    decide_on: Literal["value", "interval"] = Field(
        default="value",
        description="'value': compare the metric itself; 'interval': compare its confidence bound "
        "('<metric>.low' for 'above', '<metric>.high' for 'below'), so only a gap beyond noise fires.",
    )

    @property
    def bound_metric(self) -> str:
        """The metric this rule compares: the metric itself, or the bound of its interval."""
        if self.decide_on == "value":
            return self.metric
        return f"{self.metric}.low" if self.direction == "above" else f"{self.metric}.high"


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(name="input_drift", metric="drift.drifted_features", threshold=0, direction="above"),
    AlertRule(name="multivariate_drift", metric="drift.multivariate_drifted", threshold=0.5, direction="above"),
    AlertRule(name="prediction_drift", metric="drift.drifted_outputs", threshold=0, direction="above"),
    # Content drift (monitor.content): 1 when the test's p-value is below its alpha (0.01 by default).
    AlertRule(name="output_shift", metric="drift.output_shift", threshold=0.5, direction="above"),
    AlertRule(name="embedding_drift", metric="drift.embedding_shift", threshold=0.5, direction="above"),
    AlertRule(
        name="accuracy_drop",
        metric="quality.accuracy_drop",
        threshold=0.05,
        direction="above",
        severity="critical",
        decide_on="interval",
    ),
    AlertRule(
        name="estimated_accuracy_drop",
        metric="quality.estimated_drop",
        threshold=0.05,
        direction="above",
        decide_on="interval",
    ),
    AlertRule(
        name="demographic_parity",
        metric="fairness.demographic_parity_difference",
        threshold=0.1,
        direction="above",
        decide_on="interval",
    ),
    AlertRule(
        name="demographic_parity_ratio",
        metric="fairness.demographic_parity_ratio",
        threshold=0.8,
        direction="below",
        decide_on="interval",
    ),
    AlertRule(
        name="equalized_odds",
        metric="fairness.equalized_odds_difference",
        threshold=0.1,
        direction="above",
        decide_on="interval",
    ),
    AlertRule(name="prediction_log_drops", metric="store.dropped", threshold=0, direction="above"),
    AlertRule(name="out_of_distribution", metric="threats.ood_share", threshold=0.05, direction="above"),
    AlertRule(name="model_extraction", metric="threats.suspicious_keys", threshold=0, direction="above"),
    # The keys whose rows sit near the decision boundary far more often than the reference's (monitor.probing).
    AlertRule(name="boundary_probing", metric="threats.probing_keys", threshold=0, direction="above"),
    AlertRule(
        name="model_integrity", metric="threats.integrity_ok", threshold=0.5, direction="below", severity="critical"
    ),
)


class AlertsConfig(Frozen):
    rules: tuple[AlertRule, ...] = Field(default=DEFAULT_RULES, description="The rules in force.")
    keep_firing_for_s: float = Field(
        default=0.0,
        ge=0,
        description="keep_firing_for_s of every rule that sets none (see AlertRule); 0: resolve at once.",
    )
    webhook_url: str | None = Field(default=None, description="POST every transition here as JSON (None: off).")
    webhook_timeout_s: float = Field(default=2.0, gt=0, description="Per-POST timeout.")
    webhook_queue: int = Field(default=100, ge=1, description="Events waiting for the webhook, at most.")


AlertStateName = Literal["inactive", "pending", "firing", "resolved"]


class AlertState(Frozen):
    rule: str
    metric: str
    state: AlertStateName
    since: float | None = Field(description="When the current state began.")
    value: float | None = Field(description="The metric's last value.")
    low: float | None = Field(default=None, description="Interval rules: the lower confidence bound.")
    high: float | None = Field(default=None, description="Interval rules: the upper confidence bound.")
    reason: str
    clearing_since: float | None = Field(
        default=None,
        description="Firing, but the condition has not held since then (rules with keep_firing_for_s): it "
        "resolves once that has lasted keep_firing_for_s.",
    )


class AlertEvent(Frozen):
    rule: str
    state: Literal["firing", "resolved"]
    at: float
    value: float | None
    low: float | None = None
    high: float | None = None
    severity: str
    reason: str


def _holds(rule: AlertRule, value: float) -> bool:
    return value > rule.threshold if rule.direction == "above" else value < rule.threshold


def _describe(rule: AlertRule, value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None:
        return f"{rule.metric} has no value yet"
    sign = ">" if rule.direction == "above" else "<"
    if rule.decide_on == "value":
        return f"{rule.metric} = {value:.4g} {'' if _holds(rule, value) else 'not '}{sign} {rule.threshold:g}"
    if low is None or high is None:
        return f"{rule.metric} = {value:.4g}, no interval yet: not judged"
    bound = low if rule.direction == "above" else high
    interval = f"{rule.metric} = {value:.4g} (interval {low:.4g} to {high:.4g})"
    if _holds(rule, bound):
        return f"{interval}: all of it {sign} {rule.threshold:g}"
    if _holds(rule, value) or (low <= rule.threshold <= high):
        return f"{interval} contains {rule.threshold:g}: not enough evidence either way"
    return f"{interval}: not {sign} {rule.threshold:g}"


def _number(value: float | None) -> float | None:
    return None if value is None else float(value)


class AlertManager:
    """Holds the state of every rule; :meth:`update` with fresh metric values returns the transitions."""

    def __init__(self, config: AlertsConfig | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config or AlertsConfig()
        names = [r.name for r in self.config.rules]
        if len(set(names)) != len(names):
            from slipstream.errors import ConfigError

            raise ConfigError(f"Alert rule names must be unique; got {names}.", field="alerts.rules")
        self._clock = clock
        self._lock = threading.Lock()
        self._states = {
            r.name: AlertState(
                rule=r.name, metric=r.metric, state="inactive", since=None, value=None, reason=_describe(r, None)
            )
            for r in self.config.rules
        }
        self.webhook = Webhook(self.config) if self.config.webhook_url else None
        self._notes: dict[str, str] = {}

    def explain(self, notes: Mapping[str, str]) -> None:
        """What the next steps add to the reason of a holding rule on each metric (e.g. which keys); replaces
        the notes given before."""
        with self._lock:
            self._notes = {k: v for k, v in notes.items() if v}

    def update(self, metrics: Mapping[str, float | None], now: float | None = None) -> list[AlertEvent]:
        """Step every rule with fresh metric values, then log the transitions and send them to the webhook."""
        events = self.step(metrics, now)
        self.notify(events)
        return events

    def step(self, metrics: Mapping[str, float | None], now: float | None = None) -> list[AlertEvent]:
        """The transitions fresh metric values cause, applied to the held state; nothing is logged or sent.

        Apart from :meth:`notify` so that a fleet (slipstream.monitor.fleet) can step the state it loaded from
        the database and send the events only once the transaction that records them has committed."""
        t = self._clock() if now is None else now
        events: list[AlertEvent] = []
        with self._lock:
            for rule in self.config.rules:
                raw, bound = metrics.get(rule.metric), metrics.get(rule.bound_metric)
                if raw is None or bound is None:
                    continue
                value = float(raw)
                low, high = (
                    (None, None)
                    if rule.decide_on == "value"
                    else (_number(metrics.get(f"{rule.metric}.low")), _number(metrics.get(f"{rule.metric}.high")))
                )
                old = self._states[rule.name]
                holds = _holds(rule, float(bound))
                reason = _describe(rule, value, low, high)
                if holds and rule.metric in self._notes:
                    reason = f"{reason}: {self._notes[rule.metric]}"
                state, since, clearing = old.state, old.since, None
                if holds:
                    if old.state in ("inactive", "resolved"):
                        state, since = "pending", t
                    if state == "pending" and since is not None and t - since >= rule.for_s:
                        state, since = "firing", t
                elif old.state == "firing" and not _holds(rule, value):
                    clearing = t if old.clearing_since is None else old.clearing_since
                    keep = self.config.keep_firing_for_s if rule.keep_firing_for_s is None else rule.keep_firing_for_s
                    if t - clearing >= keep:
                        state, since, clearing = "resolved", t, None
                    else:
                        reason = f"{reason}; clear for {t - clearing:.0f} s of the {keep:g} s it needs"
                elif old.state == "pending":
                    state, since = "inactive", t
                # else: firing with the point estimate still past the threshold (interval rules): undecided
                if state != old.state and state in ("firing", "resolved"):
                    events.append(
                        AlertEvent(
                            rule=rule.name,
                            state="firing" if state == "firing" else "resolved",
                            at=t,
                            value=value,
                            low=low,
                            high=high,
                            severity=rule.severity,
                            reason=reason,
                        )
                    )
                self._states[rule.name] = AlertState(
                    rule=rule.name,
                    metric=rule.metric,
                    state=state,
                    since=since,
                    value=value,
                    low=low,
                    high=high,
                    reason=reason,
                    clearing_since=clearing,
                )
        return events

    def notify(self, events: list[AlertEvent]) -> None:
        """Log each transition and queue it for the webhook (never blocks)."""
        for e in events:
            log.log(
                logging.WARNING if e.state == "firing" else logging.INFO, "alert %s %s: %s", e.rule, e.state, e.reason
            )
            if self.webhook is not None:
                self.webhook.send(e)

    def load(self, states: Iterable[AlertState]) -> None:
        """Take these states as the held ones (a fleet's, read from its database); rules not among them keep
        theirs, and states of rules not in force are ignored."""
        with self._lock:
            for s in states:
                if s.rule in self._states:
                    self._states[s.rule] = s

    def states(self) -> list[AlertState]:
        with self._lock:
            return list(self._states.values())

    def firing(self) -> list[str]:
        return [s.rule for s in self.states() if s.state == "firing"]

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()


class Webhook:
    """POSTs alert events as JSON from a background thread; :meth:`send` never blocks or raises."""

    def __init__(self, config: AlertsConfig) -> None:
        if not config.webhook_url:
            from slipstream.errors import ConfigError

            raise ConfigError("A webhook needs webhook_url.", field="alerts.webhook_url")
        self.url = config.webhook_url
        self.timeout_s = config.webhook_timeout_s
        self._queue: queue.Queue[AlertEvent | None] = queue.Queue(maxsize=config.webhook_queue)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="slipstream-alert-webhook", daemon=True)
        self._thread.start()

    def send(self, event: AlertEvent) -> bool:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            body = json.dumps({"alert": event.model_dump(mode="json")}).encode()
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                self.sent += 1
            except Exception as exc:  # a failing receiver must not kill the thread; counted and logged
                self.failed += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("alert webhook POST to %s failed: %s", self.url, self.last_error)

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)
