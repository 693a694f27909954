"""The Monitor: the one object a server talks to, per model version.

Life cycle: build it at model load (``Monitor(model=, version=, profile=load_profile(bundle), store=,
bundle_dir=)``), call :meth:`Monitor.start` (its thread ingests every ``ingest_interval_s`` and evaluates every
``evaluate_interval_s``), and :meth:`Monitor.close` at unload (ingests what is left, flushes the log).

Per request, after inference, the server calls :meth:`Monitor.observe`: it appends a reference to the
request's arrays to a bounded queue (about a microsecond; never blocks, never raises). Everything else
(features, drift window, out-of-distribution score, per-key extraction and probing tracking, sampling, the log batch)
happens on the monitor thread, vectorized over whatever arrived since the last pass. Optionally, before
inference, :meth:`Monitor.screen` scores the inputs (~5 µs for one row) and says whether to refuse them.
Labels arrive through :meth:`Monitor.feedback_many`. Drift, quality, fairness, alert rules and the integrity
re-hash run in :meth:`Monitor.evaluate`; :meth:`Monitor.snapshot` returns the latest summary for JSON
endpoints, :meth:`Monitor.metric_values` flat numbers (and :class:`~.prometheus.MonitorCollector` Prometheus).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from slipstream.monitor.alerts import AlertManager
from slipstream.monitor.config import MonitorConfig as MonitorConfig  # re-exported: its home until issue 20
from slipstream.monitor.content import ContentDrift
from slipstream.monitor.drift import DriftDetector, DriftReport
from slipstream.monitor.fairness import FairnessReport, fairness_metrics, fairness_report
from slipstream.monitor.ingest import Ingestor, IngestSettings, PendingRow, WindowView
from slipstream.monitor.probing import probing_test
from slipstream.monitor.profile import Profile
from slipstream.monitor.quality import QualityMonitor, QualityReport
from slipstream.monitor.records import Snapshot
from slipstream.monitor.request_path import RequestPath, check_feedback
from slipstream.monitor.shift import ShiftResult
from slipstream.monitor.snapshot import DriftSummary, FeatureDrift, MonitorSnapshot, SecuritySummary
from slipstream.monitor.store import Store
from slipstream.monitor.threats import (
    ExtractionWatch,
    IntegrityWatch,
    KeyActivity,
    OODScorer,
    SecurityCounters,
)

log = logging.getLogger(__name__)


def _shift_metrics(name: str, result: ShiftResult | None) -> dict[str, float | None]:
    """1/0 drifted and the p-value of a content test; None when it did not judge (off, or too few rows)."""
    judged = result is not None and result.judged
    return {
        name: float(result.drifted) if result is not None and judged else None,
        f"{name}.p_value": result.p_value if result is not None and judged else None,
    }


def _percentiles(latency_ms: np.ndarray | None) -> dict[str, float]:
    if latency_ms is None:
        return {}
    return dict(zip(("p50", "p90", "p99"), np.percentile(latency_ms, [50, 90, 99]).tolist(), strict=True))


def _keys_note(keys: list[KeyActivity] | None, shown: int = 3) -> str:
    """The flagged keys for an alert's reason: the first few, each with why."""
    if not keys:
        return ""
    named = "; ".join(f"key {a.key_id}: {a.reason}" for a in keys[:shown])
    return named + (f"; and {len(keys) - shown} more" if len(keys) > shown else "")


class Monitor(RequestPath):
    """See the module docstring. One per served model version."""

    def __init__(
        self,
        *,
        model: str,
        version: str,
        profile: Profile | None,
        store: Store | None,
        config: MonitorConfig | None = None,
        bundle_dir: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model, self.version = model, version
        self.profile = profile
        self.store = store
        self.config = c = config or MonitorConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self.detector = DriftDetector(profile, c.drift) if profile is not None else None
        self.content = ContentDrift(profile.content, c.content_drift) if profile is not None else None
        self.quality = QualityMonitor(profile, c.quality) if profile is not None and profile.prediction else None
        self.scorer = OODScorer(profile) if profile is not None and profile.multivariate is not None else None
        t = c.threats
        probing, off = probing_test(
            profile,
            quantile=t.probing_quantile,
            window_s=t.probing_window_s,
            min_requests=t.probing_min_requests,
            min_share=t.probing_min_share,
            alpha=t.probing_alpha,
        )
        self.security_notes = [off] if off is not None and profile is not None else []
        for note in self.security_notes:  # once per monitored version; the status shows it on
            log.info("monitor %s/%s: %s", model, version, note)
        self.extraction = ExtractionWatch(c.threats, clock=clock, probing=probing)
        self.counters = SecurityCounters()
        self.integrity = (
            IntegrityWatch(bundle_dir, interval_s=c.threats.integrity_interval_s, clock=clock) if bundle_dir else None
        )
        self.alerts = AlertManager(c.alerts, clock=clock)
        self.ingestor = Ingestor(
            IngestSettings(
                model=model,
                version=version,
                sample_rate=c.sample_rate,
                log_raw_inputs=c.log_raw_inputs,
                max_logged_output_values=c.max_logged_output_values,
                window_rows=c.window_rows,
                max_pending_requests=c.max_pending_requests,
                ood_threshold=c.threats.ood_threshold,
                seed=c.seed,
            ),
            profile,
            store,
            self.scorer,
            self.extraction,
            self.counters,
            clock,
        )
        self.screen_errors = 0
        self._eval_lock = threading.Lock()  # the monitor thread and an on-demand caller take turns
        self._last_dropped = 0
        self._last: MonitorSnapshot | None = None
        # A fleet (slipstream.monitor.fleet) replaces these two: the alert state lives in its database, and
        # the drift window is read from the log every replica writes. None: this process alone.
        self.share_alerts: Callable[[AlertManager, dict[str, float | None], float], object] | None = None
        self.window_source: Callable[[WindowView], WindowView] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- per request ------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock()

    def _submit(self, item: PendingRow) -> bool:
        return self.ingestor.submit(item)

    def _lost(self) -> None:
        self.ingestor.dropped += 1

    def ingest(self) -> int:
        """Process pending requests now (the monitor thread does this every ``ingest_interval_s``)."""
        return self.ingestor.drain()

    def feedback(self, request_id: str, label: float) -> bool:
        """A ground-truth label for an earlier request (row ids of batched requests: ``id/row``)."""
        return self.feedback_many([(request_id, label)]) == 1

    def feedback_many(self, items: Iterable[tuple[str, float]]) -> int:
        """Labels in bulk; returns how many were queued (a full log buffer drops and counts the rest).

        Raises InputError (400) before queuing anything when a label is not a finite number or an id is
        empty, so a client's bad batch is refused whole, with every problem named."""
        checked = check_feedback(items, self._clock())
        if self.store is None:
            return 0
        return self.store.put_feedback(checked)

    # -- periodic ---------------------------------------------------------------------------------

    def _drift(self, window: WindowView) -> DriftSummary | None:
        if self.detector is None or not window.inputs:
            return None
        rows = min(v.shape[0] for v in window.inputs.values())
        ins = {k: v[-rows:] for k, v in window.inputs.items()}
        outs = {k: v[-rows:] for k, v in window.outputs.items() if v.shape[0] >= rows}
        pred = window.predicted[-rows:] if window.predicted is not None and window.predicted.shape[0] >= rows else None
        summary = self._summarize(self.detector.compare_features(ins, outs or None, pred))
        if self.content is None:
            return summary
        # The content tests see every window row of their output (their own bound), not only the aligned ones.
        output_shift, embedding_shift, notes = self.content.test(window.outputs)
        return summary.model_copy(
            update={"output_shift": output_shift, "embedding_shift": embedding_shift, "content_notes": notes}
        )

    def _summarize(self, report: DriftReport) -> DriftSummary:
        feats: list[FeatureDrift] = []
        for t in report.inputs:
            for i, name in enumerate(t.features):
                feats.append(
                    FeatureDrift(
                        feature=name,
                        psi=t.psi[i],
                        jensen_shannon=t.jensen_shannon[i],
                        wasserstein=t.wasserstein[i],
                        p_value=None if t.p_value is None else t.p_value[i],
                        drifted=t.drifted[i],
                    )
                )
        feats.sort(key=lambda f: -f.psi)
        return DriftSummary(
            rows=report.rows,
            judged=report.judged,
            method=report.method,
            drifted_features=report.drifted_features,
            drifted_outputs=report.drifted_outputs,
            top=feats[: self.config.top_features],
            multivariate=report.multivariate,
        )

    def _quality_and_fairness(self, now: float) -> tuple[QualityReport | None, FairnessReport | None]:
        if self.store is None:
            return None, None
        window = self.quality.query(now) if self.quality is not None else {"since_ts": None, "limit": 2000}
        since = window["since_ts"]
        limit = window["limit"]
        n = None if limit is None else int(limit)
        # One log may serve several models: read only this model version's rows.
        recent = self.store.labeled(since_ts=since, limit=n, model=self.model, version=self.version)
        quality = None
        if self.quality is not None:
            labeled = self.store.labeled(
                since_ts=since, limit=n, labeled_only=True, model=self.model, version=self.version
            )
            quality = self.quality.evaluate(recent, labeled)
        grouped = [r for r in recent if r.group is not None and r.prediction is not None]
        fairness = None
        if grouped:
            labels = np.array([np.nan if r.label is None else r.label for r in grouped], dtype=np.float64)
            fairness = fairness_report(
                [r.group for r in grouped],
                np.array([r.prediction for r in grouped], dtype=np.float64),
                labels,
                self.config.fairness,
            )
        return quality, fairness

    def evaluate(self) -> MonitorSnapshot:
        """Compute drift, quality, fairness and security now, update the alerts, store and return the summary."""
        with self._eval_lock:
            return self._evaluate()

    def _evaluate(self) -> MonitorSnapshot:
        self.ingestor.drain()
        if self.store is not None:
            # Read what was just ingested: let the writer catch up (bounded; this is the monitor's thread).
            self.store.flush(timeout_s=self.config.evaluate_flush_timeout_s)
        now = self._clock()
        window = self.ingestor.window()
        drift = self._drift(window if self.window_source is None else self.window_source(window))
        quality, fairness = self._quality_and_fairness(now)
        integrity = None
        if self.integrity is not None:
            integrity = self.integrity.check() if self.integrity.due() else self.integrity.status
        ood, lat = window.ood, window.latency_ms
        ing = self.ingestor
        requests, rows, sampled = ing.requests, ing.rows, ing.sampled
        errors = ing.errors + self.screen_errors
        store_counts = self.store.counts() if self.store is not None else {}
        dropped = store_counts.get("dropped", 0)
        suspicious = self.extraction.suspicious_keys(now)
        probing = self.extraction.probing_keys(now)
        self.alerts.explain(
            {"threats.suspicious_keys": _keys_note(suspicious), "threats.probing_keys": _keys_note(probing)}
        )
        ood_share = float(ood.mean()) if ood is not None and ood.size else None
        metrics: dict[str, float | None] = {
            "drift.drifted_features": float(len(drift.drifted_features)) if drift and drift.judged else None,
            "drift.drifted_outputs": float(len(drift.drifted_outputs)) if drift and drift.judged else None,
            "drift.multivariate_drifted": (
                float(drift.multivariate.drifted) if drift and drift.judged and drift.multivariate else None
            ),
            **_shift_metrics("drift.output_shift", drift.output_shift if drift else None),
            **_shift_metrics("drift.embedding_shift", drift.embedding_shift if drift else None),
            "quality.accuracy_drop": (
                quality.accuracy_drop if quality and quality.labeled >= self.config.quality.min_labeled else None
            ),
            "quality.accuracy_drop.low": (
                quality.accuracy_drop_low if quality and quality.labeled >= self.config.quality.min_labeled else None
            ),
            "quality.accuracy_drop.high": (
                quality.accuracy_drop_high if quality and quality.labeled >= self.config.quality.min_labeled else None
            ),
            "quality.estimated_drop": quality.estimated_drop if quality else None,
            "quality.estimated_drop.low": quality.estimated_drop_low if quality else None,
            "quality.estimated_drop.high": quality.estimated_drop_high if quality else None,
            "quality.realized_accuracy": quality.realized.get("accuracy") if quality else None,
            "quality.estimated_accuracy": quality.estimated_accuracy if quality else None,
            **fairness_metrics(fairness),  # each gap with its interval: the fairness alert rules read the bounds
            "store.dropped": float(dropped - self._last_dropped) if self.store is not None else None,
            "store.dropped_total": float(dropped) if self.store is not None else None,
            "threats.ood_share": ood_share,
            "threats.suspicious_keys": float(len(suspicious)),
            "threats.probing_keys": None if probing is None else float(len(probing)),
            "threats.integrity_ok": None if integrity is None else float(integrity.ok),
            "monitor.observe_errors": float(errors),
            "monitor.ingest_dropped": float(ing.dropped),
        }
        self._last_dropped = dropped
        if self.share_alerts is None:
            self.alerts.update(metrics, now)
        else:
            self.share_alerts(self.alerts, metrics, now)
        snap = MonitorSnapshot(
            model=self.model,
            version=self.version,
            at=now,
            requests=requests,
            rows=rows,
            sampled=sampled,
            observe_errors=errors,
            ingest_dropped=ing.dropped,
            latency_ms=_percentiles(lat),
            drift=drift,
            quality=quality,
            fairness=fairness,
            security=SecuritySummary(
                counters=self.counters.snapshot(),
                ood_share=ood_share,
                suspicious_keys=suspicious,
                integrity=integrity,
                probing_keys=probing or [],
                notes=self.security_notes,
            ),
            store=store_counts,
            alerts=self.alerts.states(),
            metrics=metrics,
        )
        self._last = snap
        if self.store is not None and self.config.snapshot_to_store:
            self.store.put_snapshot(Snapshot(ts=now, model=self.model, body=snap.model_dump_json()))
        return snap

    def follow(self, fleet_json: str) -> MonitorSnapshot:
        """Take the fleet's evaluation (another replica evaluated this version: slipstream.monitor.fleet) as
        this monitor's latest, with this replica's own traffic counters, latency, log counts and security
        counters in place of the evaluator's; drift, quality, fairness and the alerts stay the fleet's."""
        fleet = MonitorSnapshot.model_validate_json(fleet_json)
        ing, counts = self.ingestor, self.store.counts() if self.store is not None else {}
        errors = ing.errors + self.screen_errors
        own = {"monitor.observe_errors": float(errors), "monitor.ingest_dropped": float(ing.dropped)}
        if self.store is not None:
            own["store.dropped_total"] = float(counts.get("dropped", 0))
        update = {"requests": ing.requests, "rows": ing.rows, "sampled": ing.sampled, "store": counts}
        update |= {"observe_errors": errors, "ingest_dropped": ing.dropped, "metrics": {**fleet.metrics, **own}}
        update["latency_ms"] = _percentiles(ing.window().latency_ms)
        update["security"] = fleet.security.model_copy(update={"counters": self.counters.snapshot()})
        self._last = snap = fleet.model_copy(update=update)
        return snap

    @property
    def latest(self) -> MonitorSnapshot | None:
        """The latest evaluation, or None before the first one."""
        return self._last

    def snapshot(self) -> MonitorSnapshot:
        """The latest evaluation (computed now if there is none yet)."""
        return self._last if self._last is not None else self.evaluate()

    def metric_values(self) -> dict[str, float]:
        """Flat numbers for /metrics from the latest evaluation, plus 1/0 per alert rule (``alert.<rule>``)."""
        snap = self.snapshot()
        out = {k: v for k, v in snap.metrics.items() if v is not None}
        out.update({f"alert.{s.rule}": float(s.state == "firing") for s in snap.alerts})
        return out

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Evaluate every ``evaluate_interval_s`` on a daemon thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"slipstream-monitor-{self.model}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_eval = time.monotonic() + self.config.evaluate_interval_s
        while not self._stop.wait(self.config.ingest_interval_s):
            try:
                self.ingestor.drain()
                if time.monotonic() >= next_eval:
                    next_eval = time.monotonic() + self.config.evaluate_interval_s
                    self.evaluate()
            except Exception as exc:  # keep monitoring; the failure is logged with its traceback
                log.exception("monitor evaluation failed: %s", exc)

    def close(self, *, close_store: bool = True) -> None:
        """Stop the monitor thread, ingest what is left, stop the webhook, and flush and close the store
        (pass ``close_store=False`` when other monitors share it; it is flushed either way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.ingestor.drain()  # what was served before close is still logged
        if self.store is not None:
            if close_store:
                self.store.close()
            else:
                self.store.flush()
        self.alerts.close()
