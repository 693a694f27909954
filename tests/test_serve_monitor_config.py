"""One monitor config from the command line to the monitor process: every `slipstream serve` monitor flag
lands in ServeSettings.monitor (the monitor's own MonitorConfig and StoreConfig, embedded), survives the JSON
the server sends its monitor process, and is what that process's Worker uses, unchanged."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from slipstream.cli.app import app
from slipstream.monitor.config import MonitorConfig
from slipstream.monitor.process.serving import ServeMonitors
from slipstream.monitor.process.worker import Worker, niceness
from slipstream.monitor.store import StoreConfig
from slipstream.serve.server import settings_from_options
from slipstream.serve.settings import MonitorServing, ServeSettings

Check = Callable[[MonitorServing, Worker], bool]


def _rule(config: MonitorConfig, name: str) -> float:
    (rule,) = [r for r in config.alerts.rules if r.name == name]
    return rule.threshold


# flag name (the Python parameter) -> (its command-line words, what must hold in the process that monitors)
FLAGS: dict[str, tuple[list[str], Check]] = {
    "monitor_db": (
        ["--monitor-db", "{db}"],
        lambda s, w: w.store.config.path == s.db_path and s.db_path.name == "m.db",
    ),
    "monitor_db_degraded_start": (
        ["--monitor-db-degraded-start"],
        lambda s, w: w.store.config.degraded_start is True,
    ),
    "monitor_sample_rate": (["--monitor-sample-rate", "0.25"], lambda s, w: w.config.sample_rate == 0.25),
    "monitor_raw_inputs": (["--monitor-raw-inputs"], lambda s, w: w.config.log_raw_inputs is True),
    "ood_reject": (["--ood-reject", "7.5"], lambda s, w: w.config.threats.reject_ood_above == 7.5),
    "group_parameter": (["--group-parameter", "cohort"], lambda s, w: w.settings.group_parameter == "cohort"),
    "accuracy_drop_alert": (
        ["--accuracy-drop-alert", "0.03"],
        lambda s, w: (
            w.config.quality.max_accuracy_drop == 0.03
            and _rule(w.config, "accuracy_drop") == 0.03 == _rule(w.config, "estimated_accuracy_drop")
        ),
    ),
    "fairness_max_difference": (
        ["--fairness-max-difference", "0.2"],
        lambda s, w: (
            w.config.fairness.max_difference == 0.2
            and _rule(w.config, "demographic_parity") == 0.2 == _rule(w.config, "equalized_odds")
        ),
    ),
    "fairness_min_ratio": (
        ["--fairness-min-ratio", "0.7"],
        lambda s, w: w.config.fairness.min_ratio == 0.7 == _rule(w.config, "demographic_parity_ratio"),
    ),
    "fairness_positive_label": (["--fairness-positive-label", "3"], lambda s, w: w.config.fairness.positive_label == 3),
    "fairness_confidence": (["--fairness-confidence", "0.95"], lambda s, w: w.config.fairness.confidence == 0.95),
    "webhook": (
        ["--webhook", "http://127.0.0.1:9/hook"],
        lambda s, w: w.config.alerts.webhook_url == "http://127.0.0.1:9/hook",
    ),
    "monitor_retention_days": (["--monitor-retention-days", "2"], lambda s, w: w.store.config.max_age_s == 2 * 86400),
    "monitor_max_rows": (["--monitor-max-rows", "1234"], lambda s, w: w.store.config.max_rows == 1234),
    "monitor_interval": (["--monitor-interval", "42"], lambda s, w: w.config.evaluate_interval_s == 42),
    "monitor_nice": (["--monitor-nice", "7"], lambda s, w: w.settings.process_nice == 7 and niceness(w.settings) >= 7),
    "monitor_placement": (["--monitor-placement", "none"], lambda s, w: w.settings.placement == "none"),
    "monitor_standby": (["--no-monitor-standby"], lambda s, w: w.settings.standby is False),
    "monitor_restart_max": (
        ["--monitor-restart-max", "5"],
        lambda s, w: w.settings.restart_max_s == 5 and w.settings.restart_backoff_s(100) == 5,
    ),
    "monitor_log_max_mb": (
        ["--monitor-log-max-mb", "1.5"],
        lambda s, w: w.settings.log_max_mb == 1.5 and w.store._max_pages is not None,
    ),
}
OTHER_NAMES = {"ood_reject", "group_parameter", "accuracy_drop_alert", "webhook"}


def _recorder(got: list[ServeSettings]) -> Callable[..., None]:
    """Stands in for starting the server: keeps the settings it was given (whatever else it is passed)."""

    def record(*args: object, **kwargs: object) -> None:
        got.extend(a for a in (*args, *kwargs.values()) if isinstance(a, ServeSettings))

    return record


def _serve_params() -> set[str]:
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {p.name for p in serve.params}


def test_every_monitor_flag_has_a_row_here() -> None:
    """A monitor flag added to `slipstream serve` without a row above fails here, not silently in production."""
    names = _serve_params()
    monitor = {n for n in names if n.startswith(("monitor_", "fairness_")) or n in OTHER_NAMES}
    assert monitor == set(FLAGS)


@pytest.fixture
def parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServeSettings]:
    """`slipstream serve` with every monitor flag at a value other than its default; the settings it would
    serve with (the server's start is replaced by a recorder: everything up to it is the real CLI)."""
    import slipstream.serve.server

    got: list[ServeSettings] = []
    monkeypatch.setattr(slipstream.serve.server, "serve", _recorder(got))
    words = [w.format(db=tmp_path / "m.db") for args, _ in FLAGS.values() for w in args]
    result = CliRunner().invoke(app, ["serve", str(tmp_path), *words])
    assert result.exit_code == 0, result.output
    (settings,) = got
    yield settings


def test_every_monitor_flag_reaches_the_monitor_process_unchanged(parsed: ServeSettings) -> None:
    sent = parsed.monitor.model_dump_json()  # what the server sends its monitor process (MonitorProcess)
    received = MonitorServing.model_validate_json(sent)  # what run_worker reads
    assert received == parsed.monitor
    ServeMonitors(received)  # prepares the log, as the server does
    mine, theirs = socket.socketpair()
    worker = Worker(Connection(theirs.detach()), received, run="cli")
    try:
        assert worker.config == parsed.monitor.config  # no translation: the same config, field for field
        failed = [name for name, (_, holds) in FLAGS.items() if not holds(received, worker)]
    finally:
        worker._close()
        Connection(mine.detach()).close()
    assert failed == []


def test_defaults_match_the_monitor_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With only --monitor-db, the monitor runs on MonitorConfig's own defaults: the CLI adds no second set."""
    import slipstream.serve.server

    got: list[ServeSettings] = []
    monkeypatch.setattr(slipstream.serve.server, "serve", _recorder(got))
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--monitor-db", str(tmp_path / "m.db")])
    assert result.exit_code == 0, result.output
    (settings,) = got
    assert settings.monitor.config == MonitorConfig()
    assert settings.monitor.store == StoreConfig(path=tmp_path / "m.db")
    without = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert without.exit_code == 0 and not got[1].monitor.enabled


def test_with_thresholds_moves_a_check_and_its_rules_together() -> None:
    config = MonitorConfig().with_thresholds(max_accuracy_drop=0.1, min_ratio=0.6)
    assert config.quality.max_accuracy_drop == 0.1 == _rule(config, "accuracy_drop")
    assert config.fairness.min_ratio == 0.6 == _rule(config, "demographic_parity_ratio")
    assert config.fairness.max_difference == 0.1 == _rule(config, "demographic_parity")  # untouched
    assert _rule(config, "out_of_distribution") == _rule(MonitorConfig(), "out_of_distribution")


def test_an_out_of_range_threshold_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_ratio"):
        MonitorConfig().with_thresholds(min_ratio=1.5)


def test_a_monitor_process_without_a_log_is_a_config_error() -> None:
    from slipstream.errors import ConfigError

    with pytest.raises(ConfigError, match="--monitor-db"):
        ServeMonitors(MonitorServing())
    assert settings_from_options({}, {}).monitor == MonitorServing().rules_follow_checks()
