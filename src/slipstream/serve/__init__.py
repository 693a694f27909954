"""Serving over the Open Inference Protocol v2: create_app, batching, repository, guard, metrics, monitoring."""

from slipstream.serve.app import SlipstreamApp, create_app
from slipstream.serve.settings import BatchSettings, GuardSettings, MonitorServing, ServeSettings

__all__ = ["BatchSettings", "GuardSettings", "MonitorServing", "ServeSettings", "SlipstreamApp", "create_app"]
