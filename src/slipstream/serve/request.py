"""The typed, protocol-neutral inference request and response.

A front end (HTTP JSON, HTTP binary tensors, gRPC) decodes its wire format into one
:class:`InferenceRequest` exactly once; :class:`slipstream.serve.core.InferenceCore` checks and runs it
and answers an :class:`InferenceResponse`, which the front end encodes back. Nothing here knows a
protocol, so both front ends share one pipeline and give the same answers and the same error texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """One output a request asks for, by name."""

    name: str
    binary: bool | None  # None: follow the request's binary_output


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """A decoded infer request: named arrays plus what to send back and how."""

    id: str | None
    inputs: dict[str, np.ndarray]  # name -> array, in the request's order
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    parameters: dict[str, Any] | None = None  # request-level parameters (e.g. the monitoring group)
    binary_output: bool = False  # HTTP binary extension only; gRPC ignores it


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """What the model answered, for the version the route resolved (never re-derived by a front end)."""

    model: str
    version: str
    id: str | None
    outputs: dict[str, np.ndarray]  # only the wanted outputs, in the wanted order
    wanted: tuple[RequestedOutput, ...]


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """One input or output as the protocol describes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic axis
    parameters: dict[str, float | int]  # value range, axis limits, quantization: only what the graph told us


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What GET /v2/models/{name} (and gRPC ModelMetadata) answers."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
