"""`slipstream serve` runs a bundle whose recorded engine is OpenVINO: the same HTTP protocol, batching,
API-key guard and monitoring as onnxruntime bundles, with OpenVINO's answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from slipstream.artifact import Bundle
from slipstream.passes import load_pass, lookup
from slipstream.runtime import Engine, Target
from slipstream.runtime.openvino_engine import OpenVinoEngine
from tests.serve_support import API_KEY, ServerThread, monitored_settings

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _infer(client: httpx.Client, row: np.ndarray) -> httpx.Response:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": row.tolist()}]}
    return client.post("/v2/models/mlp/infer", json=body)


def test_an_openvino_bundle_is_served_batched_guarded_and_monitored(mlp_bundle: Bundle, tmp_path: Path) -> None:
    step = load_pass(lookup("engine.openvino"))
    step.run(mlp_bundle, tmp_path / "repo" / "mlp" / "1", step.make_config({"precision": "f32"}))
    rows = np.random.default_rng(3).standard_normal((48, 8)).astype(np.float32)
    want = Engine(mlp_bundle, Target(intra_op_threads=1)).run({"pixels": rows})["probabilities"]
    with ServerThread(tmp_path / "repo", monitored_settings(tmp_path / "monitor.db")) as server:
        entry = server.app.repository.get("mlp", None)
        assert isinstance(entry.engine, OpenVinoEngine) and entry.batcher is not None
        with httpx.Client(base_url=server.url, timeout=30) as anonymous:
            assert _infer(anonymous, rows[0]).status_code == 401  # the guard stands in front of OpenVINO too
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: _infer(client, r), rows))
            assert [a.status_code for a in answers] == [200] * len(rows)
            got = np.array([a.json()["outputs"][0]["data"] for a in answers], dtype=np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
            bad = client.post(
                "/v2/models/mlp/infer",
                json={"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 7], "data": [0.0] * 7}]},
            )
            assert bad.status_code == 400 and "8" in bad.json()["error"]
            doc = client.get("/v2/models/mlp/monitoring").json()  # the monitor saw OpenVINO's traffic
            assert doc["requests"] == len(rows) and doc["security"]["counters"]["rejected"]["invalid_request"] == 1
