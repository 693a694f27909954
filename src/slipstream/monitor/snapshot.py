"""What one evaluation of a :class:`~slipstream.monitor.service.Monitor` concludes: the typed summary that the
server's JSON endpoints return, the prediction log stores, and the report, dashboard and Prometheus read."""

from __future__ import annotations

from pydantic import Field

from slipstream.frozen import Frozen
from slipstream.monitor.alerts import AlertState
from slipstream.monitor.drift import MultivariateDrift
from slipstream.monitor.fairness import FairnessReport
from slipstream.monitor.quality import QualityReport
from slipstream.monitor.shift import ShiftResult
from slipstream.monitor.threats import IntegrityStatus, KeyActivity


class FeatureDrift(Frozen):
    feature: str
    psi: float
    jensen_shannon: float
    wasserstein: float
    p_value: float | None
    drifted: bool


class DriftSummary(Frozen):
    rows: int
    judged: bool
    method: str
    drifted_features: list[str]
    drifted_outputs: list[str]
    top: list[FeatureDrift] = Field(description="The input features with the largest PSI.")
    multivariate: MultivariateDrift | None
    output_shift: ShiftResult | None = Field(
        default=None, description="Black-box shift test on the class probabilities (None: off, see content_notes)."
    )
    embedding_shift: ShiftResult | None = Field(
        default=None, description="MMD test on the embedding (None: off, see content_notes)."
    )
    content_notes: list[str] = Field(default_factory=list, description="Why a content test is off.")


class SecuritySummary(Frozen):
    counters: dict[str, dict[str, int] | int]
    ood_share: float | None = Field(description="Share of window rows above the OOD threshold.")
    suspicious_keys: list[KeyActivity]
    integrity: IntegrityStatus | None
    probing_keys: list[KeyActivity] = Field(
        default_factory=list, description="Keys whose requests sit near the decision boundary (monitor.probing)."
    )
    notes: list[str] = Field(default_factory=list, description="Why a security signal is off, e.g. boundary probing.")


class MonitorSnapshot(Frozen):
    model: str
    version: str
    at: float
    requests: int = Field(description="Requests observed.")
    rows: int = Field(description="Rows observed (a request may hold several).")
    sampled: int = Field(description="Rows offered to the prediction log.")
    observe_errors: int = Field(description="Requests that could not be ingested or screened (counted, never raised).")
    ingest_dropped: int = Field(description="Requests dropped because the pending buffer was full.")
    latency_ms: dict[str, float] = Field(description="p50 / p90 / p99 over the latency window.")
    drift: DriftSummary | None
    quality: QualityReport | None
    fairness: FairnessReport | None
    security: SecuritySummary
    store: dict[str, int]
    alerts: list[AlertState]
    metrics: dict[str, float | None] = Field(description="The flat values the alert rules read.")
