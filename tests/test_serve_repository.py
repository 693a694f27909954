"""Versions, hot reload and refusal of a corrupted version, on a real server; overload (503/504) too."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from slipstream.artifact import Bundle, write_bundle
from slipstream.artifact.bundle import MANIFEST_FILE, MODEL_FILE
from slipstream.artifact.manifest import ParityRecord, Source
from slipstream.errors import IntegrityError
from slipstream.serve.guard import hash_key
from slipstream.serve.repository import ModelVersion, has_parity_record, load_version
from slipstream.serve.settings import BatchSettings, GuardSettings, ReloadSettings, ServeSettings
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
        assert _load_failures(url, "3") >= 1  # and the poller retries it with backoff while it stays broken

        shutil.rmtree(repo / "mlp" / "3")
        add_version(repo, "mlp", "3", tmp_path)  # a fixed version 3 replaces the refused one
        _wait_for(lambda: _infer(url, x)["model_version"] == "3")


def _load_failures(url: str, version: str) -> int:
    prefix = f'slipstream_model_load_failures_total{{model="mlp",version="{version}"}} '
    lines = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)]
    return int(float(lines[0].removeprefix(prefix))) if lines else 0


def test_a_version_copied_in_slowly_is_served_once_complete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "mlp", "1", tmp_path)
    finished = add_version(tmp_path / "elsewhere", "mlp", "2", tmp_path)  # what the slow copy will produce
    settings = ServeSettings(
        poll_interval_s=0.05,
        reload=ReloadSettings(retry_initial_s=0.05, retry_max_s=0.2),
        guard=GuardSettings(admin_key_hashes=frozenset({hash_key(ADMIN_KEY)})),
    )
    x = np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32)
    caplog.set_level(logging.INFO, logger="slipstream.serve")
    with ServerThread(repo, settings) as server:
        url = server.url
        assert _infer(url, x)["model_version"] == "1"
        target = repo / "mlp" / "2"
        target.mkdir()
        shutil.copy(finished / MANIFEST_FILE, target / MANIFEST_FILE)  # the manifest lands first ...
        model = (finished / MODEL_FILE).read_bytes()
        with (target / MODEL_FILE).open("wb") as half_written:
            half_written.write(model[: len(model) // 2])  # ... then half of model.onnx
            half_written.flush()
            _wait_for(lambda: _load_failures(url, "2") >= 3)  # refused, then retried on later scans
            state, reason = _index(url)["2"]
            assert state == "UNAVAILABLE" and f"has {len(model) // 2} bytes" in reason
            assert _infer(url, x)["model_version"] == "1"  # the good version serves meanwhile
            half_written.write(model[len(model) // 2 :])  # the copy completes; nothing else changes
        _wait_for(lambda: _infer(url, x)["model_version"] == "2")
        assert _index(url)["2"] == ("READY", "")
        failures = _load_failures(url, "2")
    refusals = [r for r in caplog.records if getattr(r, "event", None) == "load_failed" and r.version == "2"]
    # One line per attempt, each with its count: no flood at the poll rate.
    assert [r.attempt for r in refusals] == list(range(1, failures + 1))
    assert refusals[0].levelno == logging.ERROR and all(r.levelno == logging.WARNING for r in refusals[1:])
    ready = [r for r in caplog.records if getattr(r, "event", None) == "loaded" and r.version == "2"]
    assert f"after {failures} failed attempt(s)" in ready[0].getMessage()


def test_the_retry_backoff_grows_to_its_cap() -> None:
    reload = ReloadSettings(retry_initial_s=0.5, retry_max_s=4.0, retry_factor=2.0)
    assert [reload.backoff_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert reload.backoff_s(10_000) == 4.0


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


def test_gc_freeze_after_a_load_is_a_setting(tmp_path: Path) -> None:
    """gc.freeze() is process-wide: on by default (steadier p99), off for an application that embeds the app."""
    import gc

    from slipstream.serve import create_app

    add_version(tmp_path / "repo", "mlp", "1", tmp_path)

    def frozen_after_startup(settings: ServeSettings) -> int:
        app = create_app(tmp_path / "repo", settings)

        async def go() -> int:
            gc.unfreeze()
            await app.startup()
            try:
                return gc.get_freeze_count()
            finally:
                await app.shutdown()

        return asyncio.run(go())

    try:
        assert frozen_after_startup(ServeSettings(gc_freeze=False)) == 0
        assert frozen_after_startup(ServeSettings()) > 0
    finally:
        gc.freeze()  # leave the process as the other serve tests expect it
