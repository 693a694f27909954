"""Shared pieces for the serving tests: tiny real models, a repository on disk, a real uvicorn server."""

from __future__ import annotations

import copy
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from slipstream.importers import import_onnx
from slipstream.monitor.config import MonitorConfig
from slipstream.monitor.store import StoreConfig
from slipstream.serve.background import ServerThread as ServerThread  # re-exported for the serve tests
from slipstream.serve.background import free_port as free_port
from slipstream.serve.guard import hash_key
from slipstream.serve.settings import GuardSettings, MonitorServing, ServeSettings
from tests.onnx_models import build_mlp, build_token_scorer

API_KEY = "test-key-123-long-enough"  # keys need 16 characters or more
ADMIN_KEY = "admin-key-456-long-enough"


def monitored_settings(db: Path, config: MonitorConfig | None = None, **serving: Any) -> ServeSettings:
    """A server on a free port, with the test API key, monitoring into ``db`` with ``config`` (default: no
    timed evaluations); ``serving``: MonitorServing's process-level fields (restarts, log cap)."""
    return ServeSettings(
        port=0,
        access_log=False,
        guard=GuardSettings(api_key_hashes=frozenset({hash_key(API_KEY)})),
        monitor=MonitorServing(
            store=StoreConfig(path=db), config=config or MonitorConfig(evaluate_interval_s=3600), **serving
        ),
    )


def scorer(scale: float) -> onnx.ModelProto:
    model = build_token_scorer()
    for init in model.graph.initializer:
        if init.name == "scale":
            init.CopyFrom(numpy_helper.from_array(np.array([scale], dtype=np.float32), "scale"))
    return model


def echo_model() -> onnx.ModelProto:
    """A string and an fp16 input; outputs the text unchanged and the halves doubled (two outputs)."""
    two = numpy_helper.from_array(np.array([2.0], dtype=np.float16), "two")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["text_out"]), helper.make_node("Mul", ["half", "two"], ["half_out"])],
        "echo",
        [
            helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"]),
            helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["batch"]),
            helper.make_tensor_value_info("half_out", TensorProto.FLOAT16, ["batch", 2]),
        ],
        initializer=[two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def slow_mlp() -> onnx.ModelProto:
    """Wide enough that a 64-row request takes tens of milliseconds: makes queues fill for real."""
    return build_mlp((8, 1536, 1536, 1536, 4), seed=3)


MODELS: dict[tuple[str, str], onnx.ModelProto] = {}


def model_for(name: str, version: str) -> onnx.ModelProto:
    key = (name, version)
    if key not in MODELS:
        builders = {
            ("mlp", "1"): lambda: build_mlp((8, 16, 4), seed=1),
            ("mlp", "2"): lambda: build_mlp((8, 16, 4), seed=2),
            ("mlp", "3"): lambda: build_mlp((8, 16, 4), seed=4),
            ("scorer", "1"): lambda: scorer(0.5),
            ("scorer", "2"): lambda: scorer(2.0),
            ("echo", "1"): echo_model,
            ("slow", "1"): slow_mlp,
        }
        MODELS[key] = builders[key]()
    return MODELS[key]


def add_version(repo: Path, name: str, version: str, work: Path) -> Path:
    """Write model ``name`` version ``version`` as a bundle under ``repo/name/version`` (atomically)."""
    src = work / f"{name}-{version}.onnx"
    onnx.save_model(model_for(name, version), str(src))
    return import_onnx(src, repo / name / version, name=name, version=version).path


def corrupt_copy(good: Path, dest: Path) -> Path:
    """A copy of a bundle with one flipped byte in model.onnx, moved into place in one rename."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copytree(good, tmp)
    data = bytearray((tmp / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp / "model.onnx").write_bytes(bytes(data))
    tmp.rename(dest)
    return dest


class Reference:
    """Direct onnxruntime sessions on the source models: the answers the server must give."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], ort.InferenceSession] = {}

    def run(self, name: str, version: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = (name, version)
        if key not in self._sessions:
            self._sessions[key] = ort.InferenceSession(
                model_for(name, version).SerializeToString(), providers=["CPUExecutionProvider"]
            )
        session = self._sessions[key]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds), strict=True))


# -- fuzzing over the OpenAPI document ---------------------------------------------------------------------------
FUZZ_MODELS = ("mlp", "echo")  # served by fuzz_repository; "scorer" is the one the repository endpoints may unload


def fuzz_repository(work: Path) -> Path:
    """A repository for the fuzzer: the 8-feature MLP, the string/fp16 echo model, and a scorer to (un)load."""
    root = work / "repo"
    for name in (*FUZZ_MODELS, "scorer"):
        add_version(root, name, "1", work)
    return root


def fuzz_document(doc: dict[str, Any]) -> dict[str, Any]:
    """The served document with its names narrowed to ones this repository has (plus one that it has not),
    so that generated requests reach the codec and the models instead of stopping at a 404."""
    narrowed = copy.deepcopy(doc)
    for path, item in narrowed["paths"].items():
        for param in item.get("parameters", []):
            if param["name"] == "model_name":
                names = ["scorer", "ghost"] if path.startswith("/v2/repository") else [*FUZZ_MODELS, "ghost"]
                param["schema"] = {"type": "string", "enum": names}
            elif param["name"] == "model_version":
                param["schema"] = {"type": "string", "enum": ["1", "9"]}
    request_input = narrowed["components"]["schemas"]["RequestInput"]["properties"]
    request_input["name"] = {"type": "string", "enum": ["pixels", "text", "half", "nope"]}
    request_output = narrowed["components"]["schemas"]["RequestOutput"]["properties"]
    request_output["name"] = {"type": "string", "enum": ["probabilities", "text_out", "half_out", "nope"]}
    return narrowed


@dataclass
class FuzzReport:
    """What one fuzzing run sent and got back."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # each: operation, mode, status and the broken check
    operations: int = 0
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def fuzz_server(
    url: str,
    doc: dict[str, Any],
    *,
    examples: int,
    infer_examples: int,
    seed: int | None = 0,
) -> FuzzReport:
    """Property-based requests (schemathesis) for every operation in ``doc``, valid and invalid ones.

    Each response must not be a 5xx, and its status, content type, headers and body must be what the
    document says. Failures are collected (not raised, so hypothesis does not stop to shrink the first);
    ``seed`` 0 replays the same inputs every run (derandomized), another int one fixed draw, None fresh ones.
    """
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    report = FuzzReport()
    started = time.perf_counter()
    schema = schemathesis.openapi.from_dict(doc)
    for result in schema.get_all_operations():
        operation = result.ok()
        report.operations += 1
        key = ADMIN_KEY if operation.path.startswith("/v2/repository") else API_KEY
        count = infer_examples if operation.path.endswith("/infer") else examples
        takes_input = bool(list(operation.iter_parameters())) or bool(len(operation.body))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,):
            _fuzz_test(operation, mode, url, key, report, checks, examples=count, seed=seed)()
    report.seconds = time.perf_counter() - started
    return report


def _fuzz_test(
    operation: Any,
    mode: Any,
    url: str,
    key: str,
    report: FuzzReport,
    checks: list[Any],
    *,
    examples: int,
    seed: int | None,
) -> Callable[[], None]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed == 0,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: Any) -> None:
        response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        report.requests += 1
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except BaseException as exc:  # schemathesis raises a group of failures; keep them all
            report.failures.append(
                f"{operation.label} ({mode.value}) -> {response.status_code}: {str(exc).strip()[:600]}"
            )

    return one if seed in (None, 0) else fixed_seed(seed)(one)


def mlp_body(rows: int, seed: int) -> dict[str, Any]:
    """A JSON inference request for the 'mlp' of :func:`model_for`: ``rows`` rows of 8 features."""
    x = np.random.default_rng(seed).normal(size=(rows, 8)).astype(np.float32)
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [rows, 8], "data": x.ravel().tolist()}]}


class Load:
    """Closed-loop traffic to 'mlp' from a thread: requests of 1 and 3 rows; counts the rows answered 200 and
    every other answer."""

    def __init__(self, url: str) -> None:
        self.url, self.rows_ok, self.failed = url, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                rows = 1 + 2 * (i % 2)
                if client.post("/v2/models/mlp/infer", json=mlp_body(rows, i)).status_code == 200:
                    self.rows_ok += rows
                else:
                    self.failed += 1
                i += 1

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def wait_for(predicate: Callable[[], object], timeout_s: float = 30.0, poll_s: float = 0.01) -> None:
    """Return once ``predicate()`` is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(poll_s)
