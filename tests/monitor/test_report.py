from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slipstream.cli import app
from slipstream.monitor.profile import Profile
from slipstream.monitor.report import render_html, summarize
from slipstream.monitor.service import Monitor, MonitorConfig
from slipstream.monitor.store import SQLiteStore, StoreConfig
from slipstream.runtime.engine import Engine
from tests.monitor.conftest import Digits

runner = CliRunner()


@pytest.fixture(scope="module")
def log_db(
    digits_profile: Profile, digits: Digits, digits_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A real prediction log: clean then noisy digits, labels for all, two groups, monitor summaries."""
    db = tmp_path_factory.mktemp("log") / "monitor.db"
    store = SQLiteStore(StoreConfig(path=db))
    monitor = Monitor(model="digits", version="1", profile=digits_profile, store=store,
                      config=MonitorConfig(window_rows=200, seed=0))  # fmt: skip
    for phase, x in (("c", digits.x_live[:300]), ("s", digits.noisy(digits.x_live[:300], scale=6.0))):
        for start in range(0, 300, 100):
            for i in range(start, start + 100):
                feeds = {"pixels": x[i : i + 1]}
                group = "a" if (i % 2 == 0 or digits.y_live[i] == 1) else "b"
                monitor.observe(f"{phase}{i}", feeds, digits_engine.run(feeds), latency_s=0.001 + 0.001 * (i % 7),
                                group=group, key_id="k")  # fmt: skip
            monitor.feedback_many((f"{phase}{i}", float(digits.y_live[i])) for i in range(start, start + 100))
            store.flush()
            monitor.evaluate()
    monitor.close()
    return db


def test_summary_counts_what_the_log_holds(log_db: Path, digits: Digits) -> None:
    s = summarize(log_db)
    assert s.predictions == 600 and s.labeled == 600 and s.models == ["digits:1"]
    assert s.snapshots == 6 and s.latest is not None and s.latest.drift is not None
    assert s.accuracy is not None and 0.5 < s.accuracy < 1.0
    assert s.fairness is not None and {g.group for g in s.fairness.groups} == {"a", "b"}
    # Every gap comes with its interval; group "b" never sends a 1, so its selection rate of class 1 is far lower.
    assert [g.metric for g in s.fairness.gaps] == [
        "demographic_parity_difference",
        "demographic_parity_ratio",
        "equalized_odds_difference",
    ]
    ratio = s.fairness.gap("demographic_parity_ratio")
    assert ratio is not None and ratio.status == "beyond threshold" and ratio.high is not None and ratio.high < 0.8
    assert s.ood_share is not None and 0.3 < s.ood_share < 0.7  # the noisy half is out of distribution
    est = s.snapshot_series["quality.estimated_accuracy"]
    assert est[0] is not None and est[-1] is not None and est[-1] < est[0]


def test_html_report_is_offline_and_has_every_section(log_db: Path) -> None:
    html = render_html(summarize(log_db))
    for heading in ("Overview", "Latency", "Drift", "Accuracy", "Groups", "Security"):
        assert f"<h2>{heading}</h2>" in html
    assert html.count("<svg") >= 7 and "<polyline" in html and "<rect" in html
    assert "interval (99 % simultaneous)" in html and "demographic parity ratio" in html
    # The accuracy drops the alerts decided on, with their intervals, from the newest stored summary.
    assert re.search(r"realized accuracy drop -?\d\.\d{3}: interval -?\d\.\d{3} to -?\d\.\d{3}", html)
    assert re.search(r"estimated accuracy drop -?\d\.\d{3}: interval", html)
    # Nothing is fetched: no scripts, no links, no external sources (the only URL is the SVG namespace).
    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert set(re.findall(r"https?://[^\"' ]+", html)) == {"http://www.w3.org/2000/svg"}


def test_cli_status_and_report(log_db: Path, tmp_path: Path) -> None:
    out = runner.invoke(app, ["monitor", "status", "--db", str(log_db)])
    assert out.exit_code == 0, out.output
    assert "predictions / labeled" in out.output and "600 / 600" in out.output and "firing" in out.output
    assert "simultaneous intervals" in out.output and "beyond threshold" in out.output
    as_json = runner.invoke(app, ["monitor", "status", "--db", str(log_db), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["predictions"] == 600
    html = tmp_path / "monitor.html"
    rep = runner.invoke(app, ["monitor", "report", "--db", str(log_db), "-o", str(html)])
    assert rep.exit_code == 0, rep.output
    assert html.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_cli_exports_every_row_with_its_label(log_db: Path, tmp_path: Path, digits: Digits) -> None:
    out = tmp_path / "rows.jsonl"
    done = runner.invoke(app, ["monitor", "export", "--db", str(log_db), "-o", str(out)])
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 600 and "600 rows" in done.output and not list(tmp_path.glob(".*.tmp"))
    first = rows[0]
    assert first["request_id"] == "c0" and first["label"] == float(digits.y_live[0]) and first["model"] == "digits"
    assert len(first["outputs"]["probabilities"]) == 10 and set(first["input_stats"]) >= {"pixels.mean"}


def test_cli_refuses_a_missing_or_foreign_db(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["monitor", "status", "--db", str(tmp_path / "nope.db")])
    assert missing.exit_code == 1 and "No prediction log" in missing.output
    other = tmp_path / "other.db"
    import sqlite3

    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    foreign = runner.invoke(app, ["monitor", "report", "--db", str(other), "-o", str(tmp_path / "r.html")])
    assert foreign.exit_code == 1 and "not a slipstream prediction log" in foreign.output


def test_an_unreadable_batch_is_a_clear_error_and_export_leaves_no_file(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "log.db"
    SQLiteStore(StoreConfig(path=db)).close()
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO prediction_log (ts_first, ts_last, model, version, rows, body) VALUES (1, 2, 'm', '1', 3, ?)",
        (b"\x00\x01garbage",),
    )
    conn.commit()
    conn.close()
    status = runner.invoke(app, ["monitor", "status", "--db", str(db)])
    assert status.exit_code == 1 and "cannot read" in status.output
    out = tmp_path / "rows.jsonl"
    export = runner.invoke(app, ["monitor", "export", "--db", str(db), "-o", str(out)])
    assert export.exit_code == 1 and not out.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_report_renders_in_headless_chromium(log_db: Path, tmp_path: Path) -> None:
    from tests.browser import screenshot

    html = tmp_path / "monitor.html"
    html.write_text(render_html(summarize(log_db)), encoding="utf-8")
    png = tmp_path / "monitor.png"
    facts = screenshot(html.as_uri(), png, selector="svg")
    assert facts["title"] == "slipstream monitor report"
    svgs = facts["svgs"]
    assert isinstance(svgs, list) and len(svgs) >= 7
    for svg in svgs:  # every plot is laid out with real size
        assert svg["w"] >= 600 and svg["h"] >= 200
    assert png.stat().st_size > 20_000
