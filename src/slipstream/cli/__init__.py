"""The `slipstream` command: thin wrappers over the Python API."""

from slipstream.cli.app import app, main

__all__ = ["app", "main"]
