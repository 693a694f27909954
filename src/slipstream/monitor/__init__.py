"""Monitoring from inside the server: reference profile, prediction log, drift, quality, bias, threats, alerts.

The server builds one :class:`Monitor` per model version and calls ``screen`` (optional, before inference),
``observe`` (after), ``feedback`` / ``feedback_many`` (labels) and ``snapshot`` / ``metric_values`` (JSON and
/metrics). scipy (extra ``monitor``) is imported lazily, only when drift statistics are first computed.
"""

from slipstream.monitor.alerts import AlertManager, AlertRule, AlertsConfig, AlertState
from slipstream.monitor.drift import DriftConfig, DriftDetector, DriftReport
from slipstream.monitor.fairness import FairnessConfig, FairnessReport, fairness_report
from slipstream.monitor.profile import (
    Profile,
    ProfileConfig,
    build_profile,
    load_profile,
    profile_from_bundle,
    write_profiled_bundle,
)
from slipstream.monitor.quality import QualityConfig, QualityMonitor, QualityReport
from slipstream.monitor.records import Feedback, PredictionBatch, PredictionRecord
from slipstream.monitor.service import Monitor, MonitorConfig, Screening
from slipstream.monitor.snapshot import MonitorSnapshot
from slipstream.monitor.store import SQLiteStore, Store, StoreConfig
from slipstream.monitor.threats import ExtractionWatch, IntegrityWatch, OODScorer, SecurityCounters, ThreatConfig

__all__ = [
    "AlertManager",
    "AlertRule",
    "AlertState",
    "AlertsConfig",
    "DriftConfig",
    "DriftDetector",
    "DriftReport",
    "ExtractionWatch",
    "FairnessConfig",
    "FairnessReport",
    "Feedback",
    "IntegrityWatch",
    "Monitor",
    "MonitorConfig",
    "MonitorSnapshot",
    "OODScorer",
    "PredictionBatch",
    "PredictionRecord",
    "Profile",
    "ProfileConfig",
    "QualityConfig",
    "QualityMonitor",
    "QualityReport",
    "SQLiteStore",
    "Screening",
    "SecurityCounters",
    "Store",
    "StoreConfig",
    "ThreatConfig",
    "build_profile",
    "fairness_report",
    "load_profile",
    "profile_from_bundle",
    "write_profiled_bundle",
]
