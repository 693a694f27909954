"""What a replica needs, read from what the build recorded in the bundle, or measured here when it recorded none.

"Use what you resolve": the build's tuned threads (``resolved["session"]``) size the CPUs of a replica, and
its latency measurements (``metrics["build"]``) size batching. Memory is the one figure builds do not record,
so it is measured at export time: the resident memory an onnxruntime session of the bundle adds once it has
run a warm-up batch, on top of a serving process's own baseline.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

from slipstream.artifact.bundle import Bundle
from slipstream.artifact.manifest import Manifest
from slipstream.artifact.specs import is_batchable, placeholder_feeds

# Resident memory of an idle `slipstream serve` process with no model loaded (Python, onnxruntime, FastAPI,
# uvicorn, prometheus-client, the monitor's worker): about 150 MiB measured on this project's x86_64 machines.
SERVER_BASELINE_MB = 160
# Room above the measured figure for request buffers, batching and allocator slack.
HEADROOM = 1.5


def tuned_threads(bundle: Bundle) -> int | None:
    """The intra-op threads the build tuned for this bundle (``resolved["session"]``), if it tuned any."""
    session = bundle.manifest.resolved.get("session")
    if isinstance(session, Mapping):
        threads = session.get("intra_op_threads")
        if isinstance(threads, int) and threads >= 1:
            return threads
    return None


def build_measurements(bundle: Bundle) -> Mapping[str, object]:
    """The build's measurements of the winner (``metrics["build"]``), or an empty mapping for a plain import."""
    build = bundle.manifest.metrics.get("build")
    return build if isinstance(build, Mapping) else {}


def build_target(bundle: Bundle) -> str | None:
    """The target profile the build optimized for (cpu, tensorrt, openvino...), when the bundle was built."""
    target = build_measurements(bundle).get("target")
    return target if isinstance(target, str) else None


@dataclass(frozen=True)
class Footprint:
    """Memory a replica needs for one bundle, in MiB, and where the figure came from."""

    session_mb: float
    request_mb: int
    limit_mb: int
    source: str


def measure_footprint(bundle: Bundle) -> Footprint:
    """Load the bundle on its recorded engine, run a warm-up batch, and take the growth of this process's memory.

    The figure is a lower bound of what the session holds (memory freed back to the allocator earlier may be
    reused), so the request adds the serving baseline and headroom; the limit is twice the request.
    """
    from slipstream.runtime import Target, open_engine

    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    engine = open_engine(bundle, Target(intra_op_threads=1))  # onnxruntime or OpenVINO, as it will serve
    engine.run(placeholder_feeds(bundle.manifest.inputs))
    session_mb = max(process.memory_info().rss - before, 0) / 2**20
    del engine
    gc.collect()
    request = _round_up((SERVER_BASELINE_MB + session_mb) * HEADROOM)
    return Footprint(session_mb=session_mb, request_mb=request, limit_mb=2 * request, source="measured at export")


def _round_up(mb: float, step: int = 64) -> int:
    return int(math.ceil(mb / step) * step)


def cpus_for(bundle: Bundle, override: float | None) -> float:
    """CPUs per replica: the caller's override, else the tuned threads, else 1."""
    if override is not None:
        return override
    return float(tuned_threads(bundle) or 1)


def batchable(manifest: Manifest) -> bool:
    """Batching needs one shared symbolic first axis on every input and output (the server's rule)."""
    return is_batchable(manifest.inputs, manifest.outputs)
