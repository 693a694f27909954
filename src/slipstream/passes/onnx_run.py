"""How the runner applies one ONNX pass: a private copy in, fidelity measured, the output manifest.

Kept apart from the runner so it reads as what it is: the ONNX half of the mechanics (stdout and the root
logger guarded against chatty tools, sizes and fidelity recorded, the parent's specs carried over).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slipstream.artifact.manifest import MONITORING_OUTPUTS
from slipstream.artifact.specs import graph_io_specs
from slipstream.errors import PassError, SlipstreamError
from slipstream.passes.base import AnyPass, PassConfig, PassContext, PassOutput
from slipstream.passes.fidelity import FIDELITY_DATA_ROWS, GENERATED, measure_fidelity

if TYPE_CHECKING:
    from slipstream.artifact.bundle import Bundle
    from slipstream.artifact.manifest import Manifest

log = logging.getLogger(__name__)


def compute_onnx(
    p: AnyPass, bundle: Bundle, config: PassConfig, seed: int, data: tuple[dict[str, np.ndarray], str] | None
) -> PassOutput:
    """Apply ``p`` to a private copy of ``bundle``'s model; record sizes and fidelity against the original."""
    original = bundle.load_model()
    work = bundle.load_model()  # apply() gets its own copy; the input bundle is never written
    with (
        tempfile.TemporaryDirectory(prefix=f"slipstream-{p.name}-") as tmp,
        contextlib.redirect_stdout(io.StringIO()) as chatter,
        _root_logging_kept(),
    ):
        # Some onnxruntime tools print progress to stdout, which would corrupt --json output.
        try:
            arrays, source = data if data is not None else (None, None)
            ctx = PassContext(bundle=bundle, workdir=Path(tmp), seed=seed, data=arrays, data_source=source)
            result: PassOutput = p.apply(work, config, ctx)
            result.metrics.setdefault("size_bytes_in", original.ByteSize())
            result.metrics.setdefault("size_bytes_out", result.model.ByteSize())
            if "fidelity" not in result.metrics:
                feeds = {k: v[:FIDELITY_DATA_ROWS] for k, v in arrays.items()} if arrays is not None else None
                result.metrics["fidelity"] = measure_fidelity(
                    original, result.model, bundle.manifest.inputs, seed, feeds, source or GENERATED
                )
        except SlipstreamError:  # already clear (bad config or data, a named pass failure)
            raise
        except Exception as exc:  # third-party tools raise anything; name the pass and keep the cause
            raise PassError(
                f"Pass {p.step_name} failed on '{bundle.manifest.name}': {type(exc).__name__}: {exc}",
                pass_name=p.name,
                hint="Check the pass options against the model; `slipstream inspect` shows its operators.",
            ) from exc
    if chatter.getvalue().strip():
        log.debug("%s printed: %s", p.step_name, chatter.getvalue().strip())
    return result


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Leave the caller's root logger as it was. Third-party tools call ``logging.basicConfig`` or the module-level
    ``logging.warning`` (which installs a stderr handler on a bare root logger): quantize.dynamic did, and every
    library's messages then reached the terminal, between a CLI's tables and a server's log lines."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)


def output_manifest(parent: Manifest, result: PassOutput, key: str, *, cache_hit: bool, seed: int) -> Manifest:
    """The parent's manifest with this pass's resolved choices and metrics under its name."""
    inputs, outputs = graph_io_specs(result.model.graph)
    # A monitoring-only output (a classifier's embedding) stays out of what clients see, pass after pass.
    hidden = parent.resolved.get(MONITORING_OUTPUTS)
    outputs = tuple(s for s in outputs if not (isinstance(hidden, dict) and s.name in hidden))
    old = {s.name: s for s in (*parent.inputs, *parent.outputs)}
    # Keep the parent's specs (symbolic dim names, value ranges) where the tensor did not change type.
    inputs = tuple(old[s.name] if s.name in old and old[s.name].dtype == s.dtype else s for s in inputs)
    outputs = tuple(old[s.name] if s.name in old and old[s.name].dtype == s.dtype else s for s in outputs)
    slot = key
    n = 2
    while slot in parent.resolved or slot in parent.metrics:
        slot = f"{key}#{n}"
        n += 1
    resolved = {**result.resolved, "seed": seed, "cache": "hit" if cache_hit else "miss"}
    if result.warnings:
        resolved["warnings"] = list(result.warnings)
    return parent.model_copy(
        update={
            "inputs": inputs,
            "outputs": outputs,
            "resolved": {**parent.resolved, slot: resolved},
            "metrics": {**parent.metrics, slot: dict(result.metrics)},
        }
    )
