"""What every engine shares, whatever runs the model: checked inputs, named outputs, and what it reports.

An engine (onnxruntime's :class:`~slipstream.runtime.engine.Engine`, OpenVINO's
:class:`~slipstream.runtime.openvino_engine.OpenVinoEngine`) implements ``_infer`` and ``resolved``; the
input checks, the output names a caller may ask for and the monitoring-only outputs live here, so every
engine answers a bad request with the same error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.manifest import MONITORING_OUTPUTS
from slipstream.artifact.tensor import TensorSpec, numpy_dtype
from slipstream.errors import InputError
from slipstream.runtime.targets import Target


class EngineInfo(BaseModel):
    """What an engine actually runs on: written back to reports and manifests."""

    model_config = ConfigDict(frozen=True)

    target: str
    engine: str = Field(default="onnxruntime", description="The runtime: onnxruntime or openvino.")
    precision: str = Field(
        default="fp32", description="The precision the engine computes in (fp32, fp16, bf16, int8), as in force."
    )
    providers: tuple[str, ...] = Field(description="Providers (onnxruntime) or devices (OpenVINO) actually started.")
    fallback: str | None = Field(description="Why the target's first provider is not in use, if it is not.")
    intra_op_threads: int
    streams: int = Field(default=1, description="Parallel inference streams (OpenVINO NUM_STREAMS; 1 on onnxruntime).")
    execution_mode: str
    graph_optimization: str
    int8_kernels: str = Field(default="", description="Whether int8 QDQ runs fused on this CPU, and why.")
    from_bundle: tuple[str, ...] = Field(
        default=(), description="Settings taken from the bundle's tuned resolved['session'] (not set by the caller)."
    )
    warnings: tuple[str, ...] = Field(
        default=(), description="What differs from the bundle's recorded choice on this machine (CPU features)."
    )


class EngineBase(ABC):
    """A model ready to run on one target: the checks and names shared by every engine."""

    bundle: Bundle
    target: Target
    requested_target: Target
    load_time_s: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    monitoring_outputs: tuple[str, ...]

    def _set_io(self, bundle: Bundle, in_graph: Iterable[str]) -> None:
        """The bundle's inputs and outputs, and the monitoring-only outputs the graph really has."""
        self.inputs = bundle.manifest.inputs
        self.outputs = bundle.manifest.outputs
        self._input_by_name = {s.name: s for s in self.inputs}
        self._output_names = [s.name for s in self.outputs]
        listed = bundle.manifest.resolved.get(MONITORING_OUTPUTS)
        present = set(in_graph)
        self.monitoring_outputs = tuple(
            n for n in (listed if isinstance(listed, dict) else {}) if n in present and n not in self._output_names
        )

    @property
    def parallel_requests(self) -> int:
        """How many calls of :meth:`run` are worth running at once (the server keeps that many batches in
        flight). 1 unless the engine runs concurrent calls on separate cores, as OpenVINO's streams do:
        onnxruntime's intra-op threads already use every core for one call."""
        return 1

    @abstractmethod
    def resolved(self) -> EngineInfo:
        """The settings actually in force, for manifests and reports."""

    @abstractmethod
    def _infer(self, arrays: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """Run the model on checked arrays; return ``names`` by name."""

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate names, dtypes and shapes; cast losslessly where numpy can. Raises InputError.

        The casts serve in-process callers (plain Python ints, float64 arrays). The server refuses a datatype
        other than the model's before this runs, as the Open Inference Protocol requires (serve/codec.py).
        """
        missing = [n for n in self._input_by_name if n not in feeds]
        extra = [n for n in feeds if n not in self._input_by_name]
        if missing or extra:
            expected = ", ".join(self._input_by_name)
            raise InputError(
                f"Expected inputs [{expected}]; got [{', '.join(feeds)}]"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
                + ".",
                input_name=(missing or extra)[0],
                hint="Send exactly the inputs listed by `slipstream inspect`.",
            )
        checked: dict[str, np.ndarray] = {}
        symbols: dict[str, int] = {}
        for name, spec in self._input_by_name.items():
            checked[name] = _check_one(spec, np.asarray(feeds[name]), symbols)
        return checked

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None, *, check: bool = True
    ) -> dict[str, np.ndarray]:
        """Run the model; returns the requested outputs (all by default, monitoring-only ones when named) by name."""
        names = list(outputs) if outputs is not None else self._output_names
        unknown = [n for n in names if n not in self._output_names and n not in self.monitoring_outputs]
        if unknown:
            raise InputError(
                f"Requested outputs {unknown} do not exist; the model has [{', '.join(self._output_names)}].",
                hint="Ask for outputs by the names `slipstream inspect` lists.",
            )
        arrays = self.check_inputs(feeds) if check else dict(feeds)
        return self._infer(arrays, names)


def _castable(have: np.dtype[Any], want: np.dtype[Any]) -> bool:
    """Same-kind casts (float64 → float32) and integers into floats; never floats into integers."""
    if have.kind == want.kind:
        return True
    return have.kind in "biu" and want.kind in "fiu" and np.can_cast(have, want, casting="same_kind")


def _check_one(spec: TensorSpec, array: np.ndarray, symbols: dict[str, int]) -> np.ndarray:
    if spec.dtype == "bfloat16":
        raise InputError(f"Input '{spec.name}' is bfloat16, which numpy cannot carry.", input_name=spec.name)
    want = numpy_dtype(spec.dtype)
    if array.dtype != want:
        if spec.dtype == "string" and array.dtype.kind in "US":
            array = array.astype(object)
        elif _castable(array.dtype, want):
            array = array.astype(want)
        else:
            raise InputError(
                f"Input '{spec.name}' must be {spec.dtype}; got {array.dtype}.",
                input_name=spec.name,
                hint=f"Convert the data with .astype('{spec.dtype}').",
            )
    if array.ndim != spec.rank:
        raise InputError(
            f"Input '{spec.name}' must have shape {spec.shape_text()} (rank {spec.rank}); "
            f"got {list(array.shape)} (rank {array.ndim}).",
            input_name=spec.name,
            hint="Reshape the data to the model's rank.",
        )
    for axis, (dim, size) in enumerate(zip(spec.shape, array.shape, strict=True)):
        if isinstance(dim, int) and dim != size:
            raise InputError(
                f"Input '{spec.name}' must have shape {spec.shape_text()}; got {list(array.shape)} "
                f"(axis {axis} must be {dim}).",
                input_name=spec.name,
                hint="Reshape the data, or re-export the model with a dynamic axis there.",
            )
        if isinstance(dim, str):
            seen = symbols.setdefault(dim, size)
            if seen != size:
                raise InputError(
                    f"Input '{spec.name}' axis {axis} is '{dim}', which another input set to {seen}; got {size}.",
                    input_name=spec.name,
                    hint=f"All inputs must agree on the size of '{dim}'.",
                )
    return array
