"""Offline views of a prediction log: a summary (for ``slipstream monitor status``) and a self-contained HTML
report with inline SVG plots (``slipstream monitor report``): latency over time, drift per feature, accuracy
realized and estimated, per-group metrics, security events and alerts. Reads the log (a SQLite file,
read-only, or a PostgreSQL database a fleet shares) through :func:`slipstream.monitor.logfile.open_log`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from html import escape
from pathlib import Path

import numpy as np
import orjson
from pydantic import Field

from slipstream.errors import ConfigError
from slipstream.frozen import Frozen
from slipstream.monitor import svg
from slipstream.monitor.fairness import FairnessConfig, FairnessReport, fairness_report
from slipstream.monitor.logfile import LogReader, open_log
from slipstream.monitor.records import PredictionBatch, concat_column
from slipstream.monitor.snapshot import DriftSummary, MonitorSnapshot


class Bucket(Frozen):
    start_ts: float
    requests: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    accuracy: float | None = Field(description="Realized, on the bucket's labeled rows.")
    ood_share: float | None


class DbSummary(Frozen):
    path: str
    models: list[str] = Field(description="'name:version' seen in the log.")
    predictions: int
    labeled: int
    first_ts: float | None
    last_ts: float | None
    latency_ms: dict[str, float]
    accuracy: float | None = Field(description="Realized accuracy over every labeled row.")
    ood_threshold: float
    ood_share: float | None
    fairness: FairnessReport | None
    timeline: list[Bucket]
    snapshots: int
    latest: MonitorSnapshot | None = Field(description="The newest monitor summary stored in the log.")
    snapshot_series: dict[str, list[float | None]] = Field(description="Selected metrics over stored summaries.")
    snapshot_ts: list[float]


def _quality_text(latest: MonitorSnapshot | None) -> str:
    """The newest summary's accuracy drops with their intervals: what the accuracy alerts decided on."""
    q = latest.quality if latest is not None else None
    if q is None:
        return "<p>No accuracy summary stored yet.</p>"
    lines = [f"<p>{escape(q.reason)} ({q.labeled} of {q.predictions} predictions labeled, {escape(q.window)}).</p>"]
    for label, value, low, high in (
        ("realized accuracy drop", q.accuracy_drop, q.accuracy_drop_low, q.accuracy_drop_high),
        ("estimated accuracy drop", q.estimated_drop, q.estimated_drop_low, q.estimated_drop_high),
    ):
        if value is not None and low is not None and high is not None:
            how = f", {escape(q.interval)}" if q.interval else ""
            lines.append(f"<p>{label} {value:.3f}: interval {low:.3f} to {high:.3f}{how}.</p>")
    return "".join(lines)


SERIES = (
    "quality.realized_accuracy",
    "quality.estimated_accuracy",
    "drift.drifted_features",
    "threats.ood_share",
    "fairness.demographic_parity_difference",
)


def _batches(log: LogReader) -> Iterator[PredictionBatch]:
    """The log's batches; one that cannot be read is a ConfigError naming the log."""
    try:
        yield from log.batches()
    except ValueError as exc:
        raise ConfigError(
            f"'{log.location}' holds a logged batch this slipstream cannot read: {exc}.",
            field="db",
            hint="Read the log with the slipstream version that wrote it.",
        ) from exc


def export_rows(db: str | Path, output: Path) -> int:
    """Every logged prediction with its label (null until it comes) as JSON lines, batch by batch (the log
    is never held in memory whole); written to a temporary file and renamed, so a failure leaves no half
    file. Returns the number of rows."""
    log = open_log(db)
    tmp = output.with_name(f".{output.name}.tmp")
    rows = 0
    try:
        with tmp.open("wb") as f:
            for batch in _batches(log):
                labels = log.labels_for(batch.request_ids)
                for record in batch.records():
                    doc = {**dataclasses.asdict(record), "label": labels.get(record.request_id)}
                    f.write(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
                    rows += 1
        tmp.replace(output)
    finally:
        log.close()
        tmp.unlink(missing_ok=True)
    return rows


def summarize(
    db: str | Path, *, buckets: int = 30, ood_threshold: float = 3.0, positive_label: float = 1.0
) -> DbSummary:
    log = open_log(db)
    try:
        batches = list(_batches(log))
        labels = log.all_labels()
        snaps = log.snapshots()
    finally:
        log.close()
    ids = [rid for b in batches for rid in b.request_ids]
    groups = [g for b in batches for g in b.groups]
    n = len(ids)
    ts, lat = concat_column(batches, "ts"), concat_column(batches, "latency_ms")
    pred, ood = concat_column(batches, "prediction"), concat_column(batches, "ood_score")
    label = np.array([labels.get(rid, np.nan) for rid in ids], dtype=np.float64)
    labeled = ~np.isnan(label) & ~np.isnan(pred)
    scored = ~np.isnan(ood)
    timeline: list[Bucket] = []
    if n:
        edges = np.linspace(ts.min(), ts.max() + 1e-9, buckets + 1)
        index = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, buckets - 1)
        for b in range(buckets):
            m = index == b
            if not m.any():
                continue
            lm, sm = m & labeled, m & scored
            timeline.append(
                Bucket(
                    start_ts=float(edges[b]),
                    requests=int(m.sum()),
                    latency_p50_ms=float(np.percentile(lat[m], 50)),
                    latency_p99_ms=float(np.percentile(lat[m], 99)),
                    accuracy=float(np.mean(pred[lm] == label[lm])) if lm.any() else None,
                    ood_share=float(np.mean(ood[sm] > ood_threshold)) if sm.any() else None,
                )
            )
    grouped = [i for i, g in enumerate(groups) if g is not None and not np.isnan(pred[i])]
    fairness = (
        fairness_report(
            [str(groups[i]) for i in grouped],
            pred[grouped],
            label[grouped],
            FairnessConfig(positive_label=positive_label),
        )
        if grouped
        else None
    )
    parsed = [MonitorSnapshot.model_validate_json(s.body) for s in snaps]
    return DbSummary(
        path=log.location,
        models=sorted({f"{b.model}:{b.version}" for b in batches}),
        predictions=n,
        labeled=int(labeled.sum()),
        first_ts=float(ts.min()) if n else None,
        last_ts=float(ts.max()) if n else None,
        latency_ms=dict(zip(("p50", "p90", "p99"), np.percentile(lat, [50, 90, 99]).tolist(), strict=True))
        if n
        else {},
        accuracy=float(np.mean(pred[labeled] == label[labeled])) if labeled.any() else None,
        ood_threshold=ood_threshold,
        ood_share=float(np.mean(ood[scored] > ood_threshold)) if scored.any() else None,
        fairness=fairness,
        timeline=timeline,
        snapshots=len(parsed),
        latest=parsed[-1] if parsed else None,
        snapshot_series={k: [p.metrics.get(k) for p in parsed] for k in SERIES},
        snapshot_ts=[p.at for p in parsed],
    )


def _table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _content_html(d: DriftSummary) -> str:
    """The content tests (output shift, embedding MMD): method, p-value, and drifted / not judged / off."""
    rows = []
    for label, r in (("Output shift", d.output_shift), ("Embedding shift", d.embedding_shift)):
        if r is None:
            rows.append([label, "off", "", ""])
            continue
        verdict = ("drifted" if r.drifted else "no drift") if r.judged else f"not judged: {r.reason}"
        rows.append([label, r.method, f"{r.p_value:.3g}", verdict])
    notes = "".join(f"<li>{escape(n)}</li>" for n in d.content_notes)
    return _table(["test", "method", "p-value", "verdict"], rows) + (f"<ul>{notes}</ul>" if notes else "")


def render_html(s: DbSummary) -> str:
    """One self-contained HTML page (inline CSS and SVG; nothing is fetched)."""
    t0 = s.first_ts or 0.0
    bx = [(b.start_ts - t0) for b in s.timeline]
    sx = [(t - t0) for t in s.snapshot_ts]
    latest = s.latest
    sections: list[str] = []
    sections.append(
        "<h2>Overview</h2>"
        + _table(
            ["models", "predictions", "labeled", "realized accuracy", "latency p50 / p99 (ms)", "OOD share"],
            [
                [
                    ", ".join(s.models) or "–",
                    str(s.predictions),
                    str(s.labeled),
                    _num(s.accuracy),
                    f"{_num(s.latency_ms.get('p50'), 2)} / {_num(s.latency_ms.get('p99'), 2)}",
                    _num(s.ood_share),
                ]
            ],
        )
    )
    sections.append(
        "<h2>Latency</h2>"
        + svg.line_chart(
            "Latency over time (ms)",
            bx,
            {"p50": [b.latency_p50_ms for b in s.timeline], "p99": [b.latency_p99_ms for b in s.timeline]},
            x_label="seconds since the first logged request",
            y_min=0.0,
        )
    )
    drift_html = "<p>No monitor summary stored yet.</p>"
    if latest is not None and latest.drift is not None:
        d = latest.drift
        drift_html = (
            f"<p>Method: <code>{escape(d.method)}</code>; window {d.rows} rows; "
            f"{len(d.drifted_features)} drifted input feature(s); drifted outputs: "
            f"{escape(', '.join(d.drifted_outputs) or 'none')}.</p>"
            + svg.bar_chart(
                "PSI per input feature (largest first; red: drifted by the method above; dashes: PSI 0.2)",
                [f.feature for f in d.top],
                [f.psi for f in d.top],
                threshold=0.2,
                flags=[f.drifted for f in d.top],
            )
        )
        if d.multivariate is not None:
            mv = d.multivariate
            drift_html += (
                f"<p>Multivariate: <code>{escape(mv.method)}</code> window error {mv.window_error:.4g} vs reference "
                f"{mv.reference_error:.4g} (z = {mv.z:.1f}, drifted: {mv.drifted}).</p>"
            )
        drift_html += _content_html(d)
    drift_html += svg.line_chart(
        "Drifted input features over time",
        sx,
        {"drifted": s.snapshot_series["drift.drifted_features"]},
        x_label="seconds since the first logged request",
        y_min=0.0,
    )
    sections.append("<h2>Drift</h2>" + drift_html)
    sections.append(
        "<h2>Accuracy</h2>"
        + _quality_text(s.latest)
        + svg.line_chart(
            "Accuracy: realized (labels) and estimated (CBPE, no labels)",
            sx,
            {
                "realized": s.snapshot_series["quality.realized_accuracy"],
                "estimated": s.snapshot_series["quality.estimated_accuracy"],
            },
            x_label="seconds since the first logged request",
            y_min=0.0,
            y_max=1.0,
        )
        + svg.line_chart(
            "Realized accuracy per time bucket (from the log)",
            bx,
            {"accuracy": [b.accuracy for b in s.timeline]},
            x_label="seconds since the first logged request",
            y_min=0.0,
            y_max=1.0,
        )
    )
    if s.fairness is not None:
        f = s.fairness
        sections.append(
            "<h2>Groups</h2>"
            + _table(
                ["group", "rows", "labeled", "selection rate", "accuracy", "TPR", "FPR"],
                [
                    [
                        g.group,
                        str(g.rows),
                        str(g.labeled),
                        _num(g.selection_rate),
                        _num(g.accuracy),
                        _num(g.tpr),
                        _num(g.fpr),
                    ]
                    for g in f.groups
                ],
            )
            + _table(
                ["gap", "value", f"interval ({f.confidence * 100:g} % simultaneous)", "threshold", "verdict"],
                [
                    [
                        gap.metric.replace("_", " "),
                        _num(gap.value),
                        "–" if gap.low is None else f"{_num(gap.low)} to {'∞' if gap.high is None else _num(gap.high)}",
                        f"{'<' if gap.direction == 'below' else '>'} {gap.threshold:g}",
                        gap.status
                        if gap.status != "undecided"
                        else "undecided: "
                        + (f"need ≈ {gap.needed_rows:,} per group" if gap.needed_rows else "not enough rows"),
                    ]
                    for gap in f.gaps
                ],
            )
            + f"<p>Positive label {f.positive_label:g}; intervals over {f.comparisons} pairwise comparison(s). "
            + (f"<strong>Flagged:</strong> {escape('; '.join(f.reasons))}" if f.flagged else "Not flagged.")
            + (
                f" Undecided: {escape('; '.join(g.reason for g in f.gaps if g.status == 'undecided'))}"
                if any(g.status == "undecided" for g in f.gaps)
                else ""
            )
            + "</p>"
            + svg.bar_chart(
                "Selection rate per group", [g.group for g in f.groups], [g.selection_rate for g in f.groups]
            )
        )
    security = [
        svg.line_chart(
            f"Out-of-distribution share (score > {s.ood_threshold:g})",
            bx,
            {"OOD share": [b.ood_share for b in s.timeline]},
            x_label="seconds since the first logged request",
            y_min=0.0,
            y_max=1.0,
        )
    ]
    if latest is not None:
        sec = latest.security
        rejected = sec.counters.get("rejected", {})
        failed = sec.counters.get("auth_failed", {})
        rows = [[f"rejected: {k}", str(v)] for k, v in (rejected.items() if isinstance(rejected, dict) else [])]
        rows += [[f"failed auth: {k}", str(v)] for k, v in (failed.items() if isinstance(failed, dict) else [])]
        rows += [[f"suspicious key {a.key_id}", a.reason] for a in sec.suspicious_keys]
        rows += [[f"boundary probing by key {a.key_id}", a.reason] for a in sec.probing_keys]
        rows += [["note", note] for note in sec.notes]
        if sec.integrity is not None:
            rows.append(["model files", "verified" if sec.integrity.ok else f"FAILED: {sec.integrity.error}"])
        security.append(_table(["event", "detail"], rows or [["none", ""]]))
        alert_rows = [[a.rule, a.state, a.reason] for a in latest.alerts if a.state != "inactive"]
        security.append("<h3>Alerts</h3>" + _table(["rule", "state", "reason"], alert_rows or [["none", "", ""]]))
    sections.append("<h2>Security</h2>" + "".join(security))
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#111}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f3f4f6}svg{display:block;margin:.5em 0}"
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>slipstream monitor report</title>"
        f"<style>{style}</style></head><body><h1>slipstream monitor report</h1>"
        f"<p>Log: <code>{escape(s.path)}</code>; {s.snapshots} stored monitor summaries.</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
