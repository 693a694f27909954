"""Serving over the Open Inference Protocol v2: create_app, batching, repository, guard, metrics."""

from slipstream.serve.app import SlipstreamApp, create_app
from slipstream.serve.settings import BatchSettings, GuardSettings, ServeSettings

__all__ = ["BatchSettings", "GuardSettings", "ServeSettings", "SlipstreamApp", "create_app"]
