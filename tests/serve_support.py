"""Shared pieces for the serving tests: tiny real models, a repository on disk, a real uvicorn server."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from slipstream.importers import import_onnx
from slipstream.serve.background import ServerThread as ServerThread  # re-exported for the serve tests
from slipstream.serve.background import free_port as free_port
from tests.onnx_models import build_mlp, build_token_scorer

API_KEY = "test-key-123"
ADMIN_KEY = "admin-key-456"


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
