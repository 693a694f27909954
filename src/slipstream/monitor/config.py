"""The monitor's one config: what every monitor of a model version does, in one typed, frozen object.

A library user passes it to :class:`slipstream.monitor.Monitor`; the server embeds it as it is
(``ServeSettings.monitor.config``) and hands the same object, as JSON, to its monitor process. Kept apart from
the service so that the serve settings read it without the request-path machinery.
"""

from __future__ import annotations

from pydantic import Field

from slipstream.frozen import Frozen
from slipstream.monitor.alerts import AlertsConfig
from slipstream.monitor.content import ContentDriftConfig
from slipstream.monitor.drift import DriftConfig
from slipstream.monitor.fairness import FairnessConfig
from slipstream.monitor.quality import QualityConfig
from slipstream.monitor.threats import ThreatConfig


class MonitorConfig(Frozen):
    """Everything the monitor does, in one typed config."""

    sample_rate: float = Field(default=1.0, ge=0, le=1, description="Share of requests written to the log.")
    log_raw_inputs: bool = Field(default=False, description="Also store each row's raw input (npz bytes).")
    max_logged_output_values: int = Field(
        default=64, ge=0, description="Outputs with more values per row are logged as prediction+confidence only."
    )
    window_rows: int = Field(default=2000, ge=1, description="Rows in the rolling drift window.")
    evaluate_interval_s: float = Field(default=10.0, gt=0, description="Background evaluation period.")
    evaluate_flush_timeout_s: float = Field(
        default=2.0, ge=0, description="evaluate() waits at most this long for the log writer to catch up."
    )
    ingest_interval_s: float = Field(default=0.05, gt=0, description="How often the monitor thread ingests.")
    max_pending_requests: int = Field(
        default=100_000, ge=1, description="Requests waiting for ingestion at most (beyond: dropped, counted)."
    )
    snapshot_to_store: bool = Field(default=True, description="Write each evaluation's summary to the log.")
    top_features: int = Field(default=20, ge=1, description="Features listed per drift summary (by PSI).")
    seed: int | None = Field(default=None, description="Seed of the sampling RNG (None: random).")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Input and output drift tests.")
    content_drift: ContentDriftConfig = Field(
        default_factory=ContentDriftConfig, description="Output-shift and embedding tests (monitor.content)."
    )
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="Realized and estimated accuracy, and when a drop is one."
    )
    fairness: FairnessConfig = Field(
        default_factory=FairnessConfig, description="The bias report: its groups, gaps and their intervals."
    )
    threats: ThreatConfig = Field(
        default_factory=ThreatConfig, description="Out-of-distribution scores, the extraction and integrity watches."
    )
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="The alert rules and the webhook.")

    def with_thresholds(
        self,
        *,
        max_accuracy_drop: float | None = None,
        max_difference: float | None = None,
        min_ratio: float | None = None,
    ) -> MonitorConfig:
        """This config with a check's threshold and the alert rules that watch that check set together.

        ``quality.max_accuracy_drop`` decides the quality verdict and the rules ``accuracy_drop`` and
        ``estimated_accuracy_drop`` decide the alerts on the same number; likewise ``fairness.max_difference``
        (``demographic_parity``, ``equalized_odds``) and ``fairness.min_ratio`` (``demographic_parity_ratio``).
        Set one without the other and the report and the alert disagree, so a person's one threshold (a CLI
        flag) goes through here. None keeps the current value; rules under other names are left alone."""
        quality = self.quality if max_accuracy_drop is None else self.quality.model_copy(
            update={"max_accuracy_drop": max_accuracy_drop}
        )  # fmt: skip
        fairness = self.fairness.model_copy(
            update={k: v for k, v in (("max_difference", max_difference), ("min_ratio", min_ratio)) if v is not None}
        )
        by_rule = {
            "accuracy_drop": max_accuracy_drop,
            "estimated_accuracy_drop": max_accuracy_drop,
            "demographic_parity": max_difference,
            "equalized_odds": max_difference,
            "demographic_parity_ratio": min_ratio,
        }
        rules = tuple(
            rule if by_rule.get(rule.name) is None else rule.model_copy(update={"threshold": by_rule[rule.name]})
            for rule in self.alerts.rules
        )
        alerts = self.alerts.model_copy(update={"rules": rules})
        # Validated again: model_copy(update=...) skips validation, and a threshold may be out of range.
        return MonitorConfig.model_validate(
            {**dict(self), "quality": dict(quality), "fairness": dict(fairness), "alerts": alerts}
        )
