"""The checks every zoo entry goes through, shared by the tests and benchmarks/zoo.py: convert (timed) with
parity, quantize.dynamic with its expected reason, and one request over HTTP checked against the framework."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from slipstream.artifact import Bundle
from slipstream.passes import PassWarning
from tests.zoo.base import QUANTIZES, Built, Entry


@dataclass(frozen=True)
class Converted:
    entry: Entry
    built: Built
    bundle: Bundle
    convert_s: float

    @property
    def parity_max_error(self) -> float:
        """The largest |onnx - framework| over every parity case and output the importer compared."""
        parity = self.bundle.manifest.parity
        if parity is None or parity.status != "passed":
            raise AssertionError(f"{self.entry.name}: no parity proof in the manifest ({parity})")
        return max(o.max_abs_error for case in parity.cases for o in case.outputs)


def convert_entry(entry: Entry, work: Path) -> Converted:
    """Build the entry's model under ``work`` and convert it to ``work/bundles/<name>/1`` (a serving repository)."""
    from slipstream.importers import convert

    scratch = work / "sources" / entry.name
    scratch.mkdir(parents=True, exist_ok=True)
    built = entry.build(scratch)
    started = time.perf_counter()
    bundle = convert(built.source, work / "bundles" / entry.name / "1", name=entry.name, **built.convert_kwargs)
    return Converted(entry, built, bundle, time.perf_counter() - started)


def quantize_entry(converted: Converted, output: Path) -> tuple[Bundle, list[str]]:
    """Run quantize.dynamic; return the new bundle and the warnings the pass gave, each checked against the
    entry's expected reason (none for a plain quantization)."""
    import slipstream

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PassWarning)
        bundle = slipstream.optimize(converted.bundle, ["quantize.dynamic"], output, cache=False)
    said = [str(w.message) for w in caught if issubclass(w.category, PassWarning)]
    expected = converted.entry.quantize
    if expected == QUANTIZES:
        if said:
            raise AssertionError(f"{converted.entry.name}: quantize.dynamic warned {said}")
    elif not any(expected in s for s in said):
        raise AssertionError(f"{converted.entry.name}: expected quantize.dynamic to say {expected!r}; it said {said}")
    return bundle, said


def integer_ops(bundle: Bundle) -> dict[str, int]:
    metrics = bundle.manifest.metrics.get("quantize.dynamic")
    ops = metrics.get("integer_ops") if isinstance(metrics, dict) else None
    return {str(k): int(v) for k, v in ops.items()} if isinstance(ops, dict) else {}


def fidelity(bundle: Bundle) -> dict[str, dict[str, float]] | str:
    """quantize.dynamic's own fidelity measurement per output (max_abs_diff and cosine against fp32), or the
    reason it gave for measuring none (it cannot generate string inputs)."""
    metrics = bundle.manifest.metrics.get("quantize.dynamic")
    found = metrics.get("fidelity") if isinstance(metrics, dict) else None
    if isinstance(found, dict) and isinstance(found.get("skipped"), str):
        return str(found["skipped"])
    outputs = found.get("outputs") if isinstance(found, dict) else None
    if not isinstance(outputs, dict):
        raise AssertionError(f"{bundle.manifest.name}: no fidelity recorded by quantize.dynamic ({found})")
    return {str(k): {str(m): float(v) for m, v in d.items()} for k, d in outputs.items()}


def oip_input(name: str, array: np.ndarray) -> dict[str, Any]:
    from slipstream.serve.codec import datatype_of_array

    kind = datatype_of_array(array)
    data = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)] if kind == "BYTES" else None
    return {"name": name, "datatype": kind, "shape": list(array.shape), "data": data or array.reshape(-1).tolist()}


def client_feeds(converted: Converted, rows: int | None = None) -> dict[str, np.ndarray]:
    """The entry's request as a client sends it after reading the model's metadata: numbers as the dtype the
    bundle declares (a DataFrame's float64 column as FP32, say; the server never casts), and, with ``rows``,
    repeated along the batch axis to that many rows."""
    declared = {s.name: s.dtype for s in converted.bundle.manifest.inputs}
    feeds = {}
    for name, value in converted.built.request.items():
        array = np.asarray(value)
        if array.dtype.kind in "biuf" and declared.get(name, "string") != "string":
            array = array.astype(declared[name])
        if rows is not None:
            array = np.concatenate([array] * -(-rows // len(array)))[:rows]
        feeds[name] = array
    return feeds


def ask(client: httpx.Client, converted: Converted) -> dict[str, np.ndarray]:
    """POST the entry's request to /v2/models/<name>/infer and return the outputs by name."""
    body = {"inputs": [oip_input(k, v) for k, v in client_feeds(converted).items()]}
    reply = client.post(f"/v2/models/{converted.entry.name}/infer", json=body)
    if reply.status_code != 200:
        raise AssertionError(f"{converted.entry.name}: HTTP {reply.status_code}: {reply.text[:500]}")
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in reply.json()["outputs"]}


def check_answer(converted: Converted, served: dict[str, np.ndarray]) -> float:
    """Compare the served outputs with the framework's own; return the largest float difference."""
    built = converted.built
    names = built.outputs or tuple(o.name for o in converted.bundle.manifest.outputs)
    want = built.expected(built.request)
    if set(served) != set(names) or len(want) != len(names):
        raise AssertionError(f"{converted.entry.name}: served {sorted(served)}, expected outputs {list(names)}")
    worst = 0.0
    for name, expected in zip(names, want, strict=True):
        got, expected = served[name], np.asarray(expected)
        if got.size != expected.size:
            raise AssertionError(f"{converted.entry.name}/{name}: served shape {got.shape}, framework {expected.shape}")
        got = got.reshape(expected.shape)
        if expected.dtype.kind in "fc" or built.quantized_io:
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - expected), initial=0.0)))
        elif not np.array_equal(got.astype(expected.dtype), expected):
            raise AssertionError(f"{converted.entry.name}/{name}: served {got.tolist()}, framework {expected.tolist()}")
    if worst > built.atol:
        raise AssertionError(
            f"{converted.entry.name}: served answer is {worst:.3g} off the framework's (> {built.atol})"
        )
    return worst
