"""Versions, hot reload and refusal of a corrupted version, on a real server; overload (503/504) too."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from slipstream.artifact import Bundle, write_bundle
from slipstream.artifact.manifest import ParityRecord, Source
from slipstream.errors import IntegrityError
from slipstream.serve.guard import hash_key
from slipstream.serve.repository import ModelVersion, has_parity_record, load_version
from slipstream.serve.settings import BatchSettings, GuardSettings, ServeSettings
from tests.serve_support import ADMIN_KEY, Reference, ServerThread, add_version, corrupt_copy

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _infer(url: str, x: np.ndarray, version: str | None = None) -> dict[str, Any]:
    path = f"/v2/models/mlp/versions/{version}/infer" if version else "/v2/models/mlp/infer"
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    response = httpx.post(url + path, json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _index(url: str) -> dict[str, tuple[str, str]]:
    rows = httpx.post(f"{url}/v2/repository/index", headers=ADMIN).json()
    return {r["version"]: (r["state"], r["reason"]) for r in rows if r["name"] == "mlp"}


def _wait_for(check: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_hot_reload_takes_a_good_version_and_refuses_a_corrupted_one(tmp_path: Path) -> None:
    repo, ref = tmp_path / "repo", Reference()
    add_version(repo, "mlp", "1", tmp_path)
    settings = ServeSettings(
        poll_interval_s=0.1, guard=GuardSettings(admin_key_hashes=frozenset({hash_key(ADMIN_KEY)}))
    )
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    with ServerThread(repo, settings) as server:
        url = server.url
        assert _infer(url, x)["model_version"] == "1"

        add_version(repo, "mlp", "2", tmp_path)  # picked up by the poller: verified, warmed, then swapped in
        _wait_for(lambda: _infer(url, x)["model_version"] == "2")
        np.testing.assert_allclose(
            _infer(url, x)["outputs"][0]["data"],
            ref.run("mlp", "2", {"pixels": x})["probabilities"].reshape(-1),
            rtol=1e-6,
        )
        assert _index(url)["1"] == ("UNLOADED", "replaced by version 2")

        corrupt_copy(repo / "mlp" / "2", repo / "mlp" / "3")
        assert httpx.post(f"{url}/v2/repository/models/mlp/load", headers=ADMIN).status_code == 200
        state, reason = _index(url)["3"]
        assert state == "UNAVAILABLE" and "failed its integrity check" in reason and "model.onnx" in reason
        assert _index(url)["2"] == ("READY", "")
        assert _infer(url, x)["model_version"] == "2"  # the good version keeps serving
        unavailable = httpx.post(f"{url}/v2/models/mlp/versions/3/infer", json={"inputs": []})
        assert unavailable.status_code == 503 and "integrity" in unavailable.json()["error"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'slipstream_model_load_failures_total{model="mlp",version="3"} 1.0' in metrics

        shutil.rmtree(repo / "mlp" / "3")
        add_version(repo, "mlp", "3", tmp_path)  # a fixed version 3 replaces the refused one
        _wait_for(lambda: _infer(url, x)["model_version"] == "3")


def test_the_specific_policy_serves_only_the_named_versions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for version in ("1", "2", "3"):
        add_version(repo, "mlp", version, tmp_path)
    x = np.zeros((1, 8), dtype=np.float32)
    with ServerThread(repo, ServeSettings(version_policy="specific", versions=("1", "3"))) as server:
        assert _infer(server.url, x, "1")["model_version"] == "1"
        assert _infer(server.url, x)["model_version"] == "3"
        assert httpx.get(f"{server.url}/v2/models/mlp").json()["versions"] == ["1", "3"]
        assert httpx.get(f"{server.url}/v2/models/mlp/versions/2/ready").status_code == 404


def test_a_single_bundle_can_be_served_directly(tmp_path: Path) -> None:
    path = add_version(tmp_path / "repo", "mlp", "1", tmp_path)
    with ServerThread(path, ServeSettings()) as server:
        assert _infer(server.url, np.zeros((1, 8), np.float32))["model_name"] == "mlp"


def test_a_converted_bundle_without_a_parity_proof_is_refused(tmp_path: Path) -> None:
    good = Bundle.load(add_version(tmp_path / "repo", "mlp", "1", tmp_path))
    torch_manifest = good.manifest.model_copy(update={"source": Source(framework="torch")})
    assert not has_parity_record(torch_manifest)
    skipped = ParityRecord(status="skipped", reference="torch module", data="none", reason="--skip-parity")
    assert not has_parity_record(torch_manifest.model_copy(update={"parity": skipped}))
    assert has_parity_record(
        torch_manifest.model_copy(update={"parity": skipped.model_copy(update={"status": "passed"})})
    )
    bundle = write_bundle(tmp_path / "torch-bundle", onnx.load(str(good.model_path)), torch_manifest)
    with pytest.raises(IntegrityError, match="no passed parity proof"):
        load_version(ModelVersion("mlp", "1", bundle.path), ServeSettings())


def _slow_body() -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [64, 8], "data": x.reshape(-1).tolist()}]}


def test_overload_answers_503_with_retry_after_and_never_hangs(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "slow", "1", tmp_path)
    settings = ServeSettings(batching=BatchSettings(max_batch_size=1, max_queue_length=2, retry_after_s=2.0))
    body = _slow_body()

    async def burst(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v2/models/slow/infer", json=body) for _ in range(40)))

    with ServerThread(repo, settings) as server:
        responses = asyncio.run(burst(server.url))
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "2" and "queue is full" in busy.json()["error"]
        batcher = server.app.repository.get("slow", None).batcher
        assert batcher is not None and len(batcher.queue) == 0
        assert httpx.post(f"{server.url}/v2/models/slow/infer", json=body, timeout=30).status_code == 200
        assert 'slipstream_rejections_total{reason="unavailable"}' in httpx.get(f"{server.url}/metrics").text


def test_a_request_past_its_timeout_answers_504_and_the_server_stays_healthy(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "slow", "1", tmp_path)
    # far below one 64-row call, which runs in the worker thread (an inline call cannot be interrupted)
    settings = ServeSettings(batching=BatchSettings(timeout_ms=1, compute="thread"))
    with ServerThread(repo, settings) as server:
        response = httpx.post(f"{server.url}/v2/models/slow/infer", json=_slow_body(), timeout=30)
        assert response.status_code == 504 and "timeout" in response.json()["error"]
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        assert 'slipstream_rejections_total{reason="timeout"} 1.0' in httpx.get(f"{server.url}/metrics").text
