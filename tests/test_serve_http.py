"""The Open Inference Protocol v2 over a real uvicorn server on loopback: every endpoint, JSON and binary."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from slipstream.serve.guard import hash_key
from slipstream.serve.settings import BatchSettings, GuardSettings, ServeSettings
from tests.serve_support import ADMIN_KEY, API_KEY, Reference, ServerThread, add_version

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("serve-http")
    root = work / "repo"
    for name, version in [("mlp", "1"), ("mlp", "2"), ("scorer", "1"), ("scorer", "2"), ("echo", "1")]:
        add_version(root, name, version, work)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    settings = ServeSettings(
        port=0,
        version_policy="all",
        guard=GuardSettings(
            api_key_hashes=frozenset({hash_key(API_KEY)}), admin_key_hashes=frozenset({hash_key(ADMIN_KEY)})
        ),
        batching=BatchSettings(max_queue_length=4096),
    )
    with ServerThread(repo, settings) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference()


def _tensor(name: str, datatype: str, array: np.ndarray, *, nested: bool = False) -> dict[str, Any]:
    data = array.tolist() if nested else array.reshape(-1).tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def _binary_body(head: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(head).encode()
    return text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text)), **AUTH}


def _split_binary(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:length]), response.content[length:]


def _pack_strings(items: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in items)


# -- health and metadata ------------------------------------------------------------------------
def test_health_live_and_ready_answer_without_a_key(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        live = anonymous.get("/v2/health/live")
        ready = anonymous.get("/v2/health/ready")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert (ready.status_code, ready.json()) == (200, {"ready": True})


def test_server_metadata_lists_the_extensions(client: httpx.Client) -> None:
    doc = client.get("/v2").json()
    assert doc["name"] == "slipstream"
    assert set(doc["extensions"]) == {"binary_tensor_data", "model_repository"}


def test_model_metadata_with_and_without_version(client: httpx.Client) -> None:
    doc = client.get("/v2/models/scorer").json()
    assert doc["name"] == "scorer" and doc["versions"] == ["1", "2"] and doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "FP32", "shape": [-1, -1]},
    ]
    assert doc["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
    versioned = client.get("/v2/models/mlp/versions/1").json()
    assert versioned["versions"] == ["1"] and versioned["inputs"][0]["shape"] == [-1, 8]


def test_model_ready_with_and_without_version(client: httpx.Client) -> None:
    assert client.get("/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    assert client.get("/v2/models/mlp/versions/2/ready").status_code == 200


def test_unknown_model_version_and_endpoint_are_404_and_wrong_method_405(client: httpx.Client) -> None:
    for path in ("/v2/models/nope", "/v2/models/mlp/versions/9", "/v2/models/mlp/versions/9/ready", "/v3"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert set(response.json()) == {"error"}
    assert "mlp" in client.get("/v2/models/nope").json()["error"]
    assert client.get("/v2/models/mlp/infer").status_code == 405


# -- infer, JSON ----------------------------------------------------------------------------------
def test_infer_json_flat_and_nested_match_onnxruntime_and_echo_the_id(client: httpx.Client, ref: Reference) -> None:
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = ref.run("mlp", "2", {"pixels": x})["probabilities"]
    for nested in (False, True):
        body = {"id": f"req-{nested}", "inputs": [_tensor("pixels", "FP32", x, nested=nested)]}
        doc = client.post("/v2/models/mlp/infer", json=body).json()
        assert doc["id"] == f"req-{nested}" and doc["model_name"] == "mlp" and doc["model_version"] == "2"
        (out,) = doc["outputs"]
        assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [3, 4]
        np.testing.assert_allclose(np.array(out["data"]).reshape(3, 4), want, rtol=1e-6)


def test_infer_without_id_sends_none_back(client: httpx.Client) -> None:
    x = np.ones((1, 8), dtype=np.float32)
    doc = client.post("/v2/models/mlp/infer", json={"inputs": [_tensor("pixels", "FP32", x)]}).json()
    assert "id" not in doc


def test_infer_each_version_answers_with_its_own_weights(client: httpx.Client, ref: Reference) -> None:
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    mask = np.array([[1, 1, 0]], dtype=np.float32)
    body = {"inputs": [_tensor("input_ids", "INT64", ids), _tensor("attention_mask", "FP32", mask)]}
    for version in ("1", "2"):
        doc = client.post(f"/v2/models/scorer/versions/{version}/infer", json=body).json()
        want = ref.run("scorer", version, {"input_ids": ids, "attention_mask": mask})["score"]
        assert doc["model_version"] == version
        np.testing.assert_allclose(doc["outputs"][0]["data"], want)
    assert client.post("/v2/models/scorer/versions/1/infer", json=body).json()["outputs"][0]["data"] == [1.5]


def test_requested_outputs_are_honoured_in_order(client: httpx.Client) -> None:
    half = np.array([[1.5, -2.0]], dtype=np.float16)
    head = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["héllo"]},
            {"name": "half", "datatype": "FP16", "shape": [1, 2], "parameters": {"binary_data_size": 4}},
        ],
        "outputs": [{"name": "text_out"}],
    }
    body, headers = _binary_body(head, [half.tobytes()])
    response = httpx.post(f"{client.base_url}/v2/models/echo/infer", content=body, headers=headers)
    doc = response.json()
    assert [o["name"] for o in doc["outputs"]] == ["text_out"]
    assert doc["outputs"][0] == {"name": "text_out", "datatype": "BYTES", "shape": [1], "data": ["héllo"]}


# -- infer, binary ------------------------------------------------------------------------------------
def test_binary_fp32_in_and_out(client: httpx.Client, ref: Reference) -> None:
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    head = {
        "id": "bin",
        "inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [2, 8], "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    body, headers = _binary_body(head, [x.tobytes()])
    response = client.post("/v2/models/mlp/versions/1/infer", content=body, headers=headers)
    doc, blob = _split_binary(response)
    (out,) = doc["outputs"]
    assert doc["id"] == "bin" and out["parameters"] == {"binary_data_size": 32} and "data" not in out
    np.testing.assert_array_equal(
        np.frombuffer(blob, "<f4").reshape(2, 4), ref.run("mlp", "1", {"pixels": x})["probabilities"]
    )


def test_binary_bytes_and_fp16_both_ways_with_binary_data_output(client: httpx.Client) -> None:
    texts = ["a", "", "ünïcode ✓"]
    half = np.array([[1, 2], [3.5, -4], [0.25, 30000]], dtype=np.float16)
    packed = _pack_strings(texts)
    head = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(packed)}},
            {"name": "half", "datatype": "FP16", "shape": [3, 2], "parameters": {"binary_data_size": half.nbytes}},
        ],
    }
    body, headers = _binary_body(head, [packed, half.tobytes()])
    doc, blob = _split_binary(client.post("/v2/models/echo/infer", content=body, headers=headers))
    text_out, half_out = doc["outputs"]
    assert (text_out["datatype"], half_out["datatype"]) == ("BYTES", "FP16")
    size = text_out["parameters"]["binary_data_size"]
    assert blob[:size] == packed
    np.testing.assert_array_equal(np.frombuffer(blob[size:], "<f2").reshape(3, 2), half * np.float16(2))


def test_an_output_can_opt_out_of_binary_data_output(client: httpx.Client) -> None:
    x = np.zeros((1, 8), dtype=np.float32)
    body = {
        "parameters": {"binary_data_output": True},
        "inputs": [_tensor("pixels", "FP32", x)],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
    }
    response = client.post("/v2/models/mlp/infer", json=body)
    assert "inference-header-content-length" not in response.headers
    assert len(response.json()["outputs"][0]["data"]) == 4


def test_fp16_in_json_is_refused_as_the_protocol_says(client: httpx.Client) -> None:
    body = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]},
            {"name": "half", "datatype": "FP16", "shape": [1, 2], "data": [1, 2]},
        ]
    }
    response = client.post("/v2/models/echo/infer", json=body)
    assert response.status_code == 400 and "binary" in response.json()["error"]


# -- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"inputs": []}', "non-empty list"),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 7], "data": [1,2,3,4,5,6,7]}]}',
            "axis 1 must be 8",
        ),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [1,2]}]}', "holds 2"),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [1,2,3,4,5,6,7,"x"]}]}',
            "regular array",
        ),
        (b'{"inputs": [{"name": "img", "datatype": "FP32", "shape": [1, 8], "data": [1,2,3,4,5,6,7,8]}]}', "unknown"),
        (b'{"inputs": [{"name": "pixels", "datatype": "FP99", "shape": [1], "data": [1]}]}', "datatype"),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [1,2,3,4,5,6,7,8]}],'
            b' "outputs": [{"name": "logits"}]}',
            "do not exist",
        ),
    ],
)
def test_bad_requests_are_400_with_a_precise_message_and_no_trace(
    client: httpx.Client, body: bytes, fragment: str
) -> None:
    response = client.post("/v2/models/mlp/infer", content=body)
    assert response.status_code == 400
    doc = response.json()
    assert set(doc) == {"error"} and fragment in doc["error"]
    assert "Traceback" not in doc["error"] and 'File "' not in doc["error"]


def _pixels(shape: list[int], data: list[Any], datatype: str = "FP32", **extra: Any) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "pixels", "datatype": datatype, "shape": shape, "data": data}], **extra}
    ).encode()


def _deep_binary() -> tuple[bytes, dict[str, str]]:
    shape = [1] * 1000 + [64]
    head = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": 256}}]}
    return _binary_body(head, [b"\0" * 256])


def test_hostile_tensors_are_400_with_the_reason_and_the_server_keeps_serving(
    client: httpx.Client, ref: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18: each of these was a 500 with a traceback, a silent cast, or an amplified reply."""
    eight = [0.5] * 8
    bodies: list[tuple[bytes, dict[str, str], str]] = [
        (_pixels([1] * 1000 + [64], [0] * 64), {}, "1001 dimensions; at most 64"),
        (*_deep_binary(), "1001 dimensions; at most 64"),
        (_pixels([2**20, 2**20], eight), {}, "1099511627776 values; the request body has only"),
        (_pixels([0, 2**62, 2**62], []), {}, "past 2**56"),
        (_pixels([-1, 8], eight), {}, "got -1 in [-1, 8]"),
        (_pixels([1, 8], [1] * 8, "INT32"), {}, "Input 'pixels' must be sent as FP32; got INT32"),
        (_pixels([1, 8], [1] * 8, "INT64"), {}, "Input 'pixels' must be sent as FP32; got INT64"),
        (_pixels([1, 8], [2**64 - 1] * 8, "UINT64"), {}, "Input 'pixels' must be sent as FP32; got UINT64"),
        (_pixels([1, 8], [True] * 8, "BOOL"), {}, "Input 'pixels' must be sent as FP32; got BOOL"),
        (_pixels([1, 8], eight, "FP64"), {}, "Input 'pixels' must be sent as FP32; got FP64"),
        (
            _pixels([1, 8], eight, outputs=[{"name": "probabilities"}] * 10_000),
            {},
            "Output 'probabilities' is requested more than once",
        ),
        (_pixels([1, 8], eight, id="x" * 1_000_000), {}, "'id' is 1000000 characters; this server accepts at most 256"),
    ]
    with caplog.at_level(logging.ERROR, logger="slipstream"):
        for body, headers, fragment in bodies:
            response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
            assert response.status_code == 400, (fragment, response.text[:300])
            error = response.json()["error"]
            assert fragment in error and "Hint:" in error and "Traceback" not in error
            assert len(response.content) < 1000  # nothing hostile is echoed back at length
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    response = client.post("/v2/models/mlp/infer", json={"id": "x" * 256, "inputs": [_tensor("pixels", "FP32", x)]})
    assert response.status_code == 200 and response.json()["id"] == "x" * 256
    want = ref.run("mlp", "2", {"pixels": x})["probabilities"]
    got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nan_and_inf_in_binary_inputs_are_400(client: httpx.Client) -> None:
    x = np.zeros((2, 8), dtype=np.float32)
    x[1, 3], x[0, 0] = np.nan, np.inf
    head = {
        "inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [2, 8], "parameters": {"binary_data_size": x.nbytes}}
        ]
    }
    body, headers = _binary_body(head, [x.tobytes()])
    response = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith("Input 'pixels' holds 2 NaN or Inf value(s)")


def test_missing_or_wrong_api_key_is_401(server: ServerThread) -> None:
    body = {"inputs": [_tensor("pixels", "FP32", np.zeros((1, 8), np.float32))]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        response = httpx.post(f"{server.url}/v2/models/mlp/infer", json=body, headers=headers)
        assert response.status_code == 401 and "API key" in response.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/mlp", headers={"X-API-Key": API_KEY}).status_code == 200


# -- repository extension -------------------------------------------------------------------------------
def test_repository_index_needs_the_admin_key(server: ServerThread) -> None:
    assert httpx.post(f"{server.url}/v2/repository/index", headers=AUTH).status_code == 401
    rows = httpx.post(f"{server.url}/v2/repository/index", headers=ADMIN, json={}).json()
    assert {(r["name"], r["version"], r["state"]) for r in rows} == {
        ("echo", "1", "READY"),
        ("mlp", "1", "READY"),
        ("mlp", "2", "READY"),
        ("scorer", "1", "READY"),
        ("scorer", "2", "READY"),
    }


def test_unload_then_load_a_model(server: ServerThread, client: httpx.Client) -> None:
    url = server.url
    assert httpx.post(f"{url}/v2/repository/models/echo/unload", headers=ADMIN).status_code == 200
    assert client.get("/v2/models/echo/ready").status_code == 503
    ready_rows = httpx.post(f"{url}/v2/repository/index", headers=ADMIN, json={"ready": True}).json()
    assert "echo" not in {r["name"] for r in ready_rows}
    assert httpx.post(f"{url}/v2/repository/models/echo/load", headers=ADMIN).status_code == 200
    assert client.get("/v2/models/echo/ready").json() == {"name": "echo", "ready": True}
    assert httpx.post(f"{url}/v2/repository/models/ghost/load", headers=ADMIN).status_code == 404


# -- metrics ----------------------------------------------------------------------------------------------
def test_metrics_expose_requests_latency_batches_and_process(client: httpx.Client) -> None:
    client.post("/v2/models/mlp/infer", json={"inputs": [_tensor("pixels", "FP32", np.zeros((1, 8), np.float32))]})
    assert httpx.get(f"{client.base_url}/metrics").status_code == 401  # as guarded as the API
    scrape = client.get("/metrics")
    assert scrape.headers.get_list("content-type") == ["text/plain; version=0.0.4; charset=utf-8"]
    text = scrape.text
    for name in (
        'slipstream_requests_total{model="mlp",status="200",version="2"}',
        "slipstream_queue_seconds_bucket",
        "slipstream_compute_seconds_bucket",
        "slipstream_request_seconds_bucket",
        "slipstream_batch_size_bucket",
        "slipstream_in_flight_requests",
        "slipstream_rejections_total",
        'slipstream_model_load_seconds{model="scorer",version="2"}',
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):
        assert name in text, name


# -- many callers at once -------------------------------------------------------------------------------------
def test_1000_concurrent_mixed_requests_each_get_their_own_answer(server: ServerThread, ref: Reference) -> None:
    rng = np.random.default_rng(7)
    cases: list[tuple[str, str, dict[str, np.ndarray], bool]] = []
    for i in range(1000):
        kind = i % 4
        if kind < 2:
            version = str(1 + (i // 4) % 2)
            feeds = {"pixels": rng.standard_normal((1 + i % 3, 8)).astype(np.float32)}
            cases.append(("mlp", version, feeds, i % 8 == 1))
        else:
            seq = 2 + i % 5  # different lengths on the non-batch axis must never share a batch
            ids = rng.integers(0, 50, (1 + i % 2, seq)).astype(np.int64)
            mask = (rng.random((1 + i % 2, seq)) > 0.3).astype(np.float32)
            cases.append(("scorer", str(1 + (i // 4) % 2), {"input_ids": ids, "attention_mask": mask}, False))

    async def one(client: httpx.AsyncClient, idx: int) -> tuple[int, int, dict[str, Any] | bytes]:
        name, version, feeds, binary = cases[idx]
        dt = {"float32": "FP32", "int64": "INT64"}
        if binary:
            arr = feeds["pixels"]
            head = {
                "id": str(idx),
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": list(arr.shape),
                        "parameters": {"binary_data_size": arr.nbytes},
                    }
                ],
            }
            body, headers = _binary_body(head, [arr.tobytes()])
            r = await client.post(f"/v2/models/{name}/versions/{version}/infer", content=body, headers=headers)
        else:
            doc = {"id": str(idx), "inputs": [_tensor(k, dt[str(v.dtype)], v) for k, v in feeds.items()]}
            r = await client.post(f"/v2/models/{name}/versions/{version}/infer", json=doc)
        return idx, r.status_code, r.json()

    async def all_of_them() -> list[tuple[int, int, Any]]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, limits=limits, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(1000)))

    results = asyncio.run(all_of_them())
    assert [status for _, status, _ in results] == [200] * 1000
    for idx, _, doc in results:
        name, version, feeds, _ = cases[idx]
        assert doc["id"] == str(idx) and doc["model_version"] == version
        want = next(iter(ref.run(name, version, feeds).values()))
        got = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(doc["outputs"][0]["shape"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- the OpenAPI description ------------------------------------------------------------------------------------
SERVED = {  # every (method, path) the router in slipstream.serve.app answers
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2"),
    ("GET", "/v2/openapi.json"),
    ("GET", "/v2/monitoring"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{model_name}/load"),
    ("POST", "/v2/repository/models/{model_name}/unload"),
    ("GET", "/metrics"),
    ("GET", "/dashboard"),
    *(
        (method, prefix + tail)
        for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}")
        for method, tail in (
            ("GET", ""),
            ("GET", "/ready"),
            ("POST", "/infer"),
            ("POST", "/feedback"),
            ("GET", "/monitoring"),
        )
    ),
}


def test_every_route_is_in_the_openapi_document_and_answers_as_it_says(client: httpx.Client) -> None:
    served = client.get("/v2/openapi.json")
    assert served.status_code == 200 and httpx.get(f"{client.base_url}/v2/openapi.json").status_code == 200  # no key
    doc = served.json()
    documented = {
        (method.upper(), path) for path, item in doc["paths"].items() for method in item if method != "parameters"
    }
    assert documented == SERVED
    body = {"inputs": [_tensor("pixels", "FP32", np.zeros((1, 8), np.float32))]}
    for method, template in sorted(SERVED, key=lambda route: route[1].endswith("/load")):  # unload before load
        repository = template.startswith("/v2/repository")
        path = template.replace("{model_name}", "scorer" if repository else "mlp").replace("{model_version}", "2")
        headers = ADMIN if repository else AUTH
        answer = client.request(method, path, headers=headers, json=body if method == "POST" else None)
        operation = doc["paths"][template][method.lower()]
        assert str(answer.status_code) in operation["responses"], (method, path, answer.status_code, answer.text)
        wrong = client.request("GET" if method == "POST" else "POST", path, headers=headers)
        assert wrong.status_code == 405, (path, wrong.status_code)  # routed: only the method is wrong
    for unknown in ("/v2/models", "/v2/models/mlp/explain", "/v2/metrics", "/openapi.json", "/v2/health"):
        assert client.get(unknown).status_code == 404, unknown
    assert client.get("/v2/models/scorer/ready").json() == {"name": "scorer", "ready": True}  # loaded back


def test_a_binary_reply_is_not_labelled_json(client: httpx.Client) -> None:
    head = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "parameters": {"binary_data_size": 32}}]}
    head["parameters"] = {"binary_data_output": True}
    content, headers = _binary_body(head, [np.zeros((1, 8), np.float32).tobytes()])
    answer = client.post("/v2/models/mlp/infer", content=content, headers=headers)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    assert _split_binary(answer)[0]["outputs"][0]["parameters"]["binary_data_size"] == 16


def test_a_request_with_three_problems_hears_of_all_three_in_one_400(client: httpx.Client) -> None:
    """Names, datatype and values wrong at once: one reply lists all three (one check, collecting)."""
    mask = np.array([[1.0, 1.0, np.nan, 1.0]], np.float32)  # JSON has no NaN: the mask goes as binary data
    head = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT32", "shape": [1, 4], "data": [1, 2, 3, 4]},
            {"name": "attention_mask", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}},
            {"name": "token_types", "datatype": "INT64", "shape": [1, 4], "data": [0, 0, 0, 0]},
        ]
    }
    content, headers = _binary_body(head, [mask.tobytes()])
    response = client.post("/v2/models/scorer/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith("The request has 3 problems: (1) Expected inputs [input_ids, attention_mask]")
    assert "unknown ['token_types']" in error
    assert "(2) Input 'input_ids' must be sent as INT64; got INT32" in error
    assert "(3) Input 'attention_mask' holds 1 NaN or Inf value(s)" in error
    assert "Hint:" in error
