"""Monitoring from inside the server: reference profile, prediction log, drift, quality, bias, threats, alerts.

The server builds one :class:`Monitor` per model version and calls ``screen`` (optional, before inference),
``observe`` (after), ``feedback`` / ``feedback_many`` (labels) and ``snapshot`` / ``metric_values`` (JSON and
/metrics). scipy (extra ``monitor``) is imported lazily, only when drift statistics are first computed.

The names load on first use (PEP 562), so that the serve settings can embed the monitor's configs without
importing the statistics a server without monitoring never runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slipstream.monitor.alerts import AlertManager, AlertRule, AlertsConfig, AlertState
    from slipstream.monitor.config import MonitorConfig
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
    from slipstream.monitor.request_path import Screening
    from slipstream.monitor.service import Monitor
    from slipstream.monitor.snapshot import MonitorSnapshot
    from slipstream.monitor.store import SQLiteStore, Store, StoreConfig
    from slipstream.monitor.threats import ExtractionWatch, IntegrityWatch, OODScorer, SecurityCounters, ThreatConfig

_WHERE = {
    "AlertManager": "slipstream.monitor.alerts",
    "AlertRule": "slipstream.monitor.alerts",
    "AlertState": "slipstream.monitor.alerts",
    "AlertsConfig": "slipstream.monitor.alerts",
    "DriftConfig": "slipstream.monitor.drift",
    "DriftDetector": "slipstream.monitor.drift",
    "DriftReport": "slipstream.monitor.drift",
    "ExtractionWatch": "slipstream.monitor.threats",
    "FairnessConfig": "slipstream.monitor.fairness",
    "FairnessReport": "slipstream.monitor.fairness",
    "Feedback": "slipstream.monitor.records",
    "IntegrityWatch": "slipstream.monitor.threats",
    "Monitor": "slipstream.monitor.service",
    "MonitorConfig": "slipstream.monitor.config",
    "MonitorSnapshot": "slipstream.monitor.snapshot",
    "OODScorer": "slipstream.monitor.threats",
    "PredictionBatch": "slipstream.monitor.records",
    "PredictionRecord": "slipstream.monitor.records",
    "Profile": "slipstream.monitor.profile",
    "ProfileConfig": "slipstream.monitor.profile",
    "QualityConfig": "slipstream.monitor.quality",
    "QualityMonitor": "slipstream.monitor.quality",
    "QualityReport": "slipstream.monitor.quality",
    "SQLiteStore": "slipstream.monitor.store",
    "Screening": "slipstream.monitor.request_path",
    "SecurityCounters": "slipstream.monitor.threats",
    "Store": "slipstream.monitor.store",
    "StoreConfig": "slipstream.monitor.store",
    "ThreatConfig": "slipstream.monitor.threats",
    "build_profile": "slipstream.monitor.profile",
    "fairness_report": "slipstream.monitor.fairness",
    "load_profile": "slipstream.monitor.profile",
    "profile_from_bundle": "slipstream.monitor.profile",
    "write_profiled_bundle": "slipstream.monitor.profile",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'slipstream.monitor' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
