"""Safe defaults, driven through the ASGI app with httpx (and a fake clock for the token bucket)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from slipstream.artifact import Bundle, write_bundle
from slipstream.errors import ConfigError
from slipstream.serve import GuardSettings, ServeSettings, create_app
from slipstream.serve.app import SlipstreamApp
from slipstream.serve.guard import Guard, hash_key, read_keys
from slipstream.serve.server import settings_from_options
from tests.serve_support import API_KEY, add_version

X = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("serve-guard")
    add_version(work / "repo", "mlp", "1", work)
    return work / "repo"


def call(app: SlipstreamApp, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        await app.startup()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                return await client.request(method, path, **kwargs)
        finally:
            await app.shutdown()

    return asyncio.run(go())


def calls(
    app: SlipstreamApp, requests: list[tuple[str, str, dict[str, Any]]], clock: FakeClock | None = None
) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        await app.startup()
        out = []
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                for method, path, kwargs in requests:
                    if clock is not None:
                        clock.now += kwargs.pop("advance_s", 0.0)
                    out.append(await client.request(method, path, **kwargs))
        finally:
            await app.shutdown()
        return out

    return asyncio.run(go())


def test_the_token_bucket_answers_429_with_retry_after_then_refills(repo: Path) -> None:
    clock = FakeClock()
    settings = ServeSettings(guard=GuardSettings(rate_per_s=1.0, burst=2))
    app = create_app(repo, settings, clock=clock)
    post = ("POST", "/v2/models/mlp/infer", {"json": X})
    later = ("POST", "/v2/models/mlp/infer", {"json": X, "advance_s": 1.0})
    statuses = calls(app, [post, post, post, later, post], clock)
    assert [r.status_code for r in statuses] == [200, 200, 429, 200, 429]
    assert statuses[2].headers["retry-after"] == "1" and "Rate limit" in statuses[2].json()["error"]


def test_buckets_are_per_key(repo: Path) -> None:
    clock = FakeClock()
    keys = frozenset({hash_key("k1"), hash_key("k2")})
    app = create_app(
        repo, ServeSettings(guard=GuardSettings(api_key_hashes=keys, rate_per_s=1.0, burst=1)), clock=clock
    )
    k1 = {"json": X, "headers": {"X-API-Key": "k1"}}
    k2 = {"json": X, "headers": {"X-API-Key": "k2"}}
    got = calls(
        app,
        [
            ("POST", "/v2/models/mlp/infer", dict(k1)),
            ("POST", "/v2/models/mlp/infer", dict(k1)),
            ("POST", "/v2/models/mlp/infer", dict(k2)),
        ],
        clock,
    )
    assert [r.status_code for r in got] == [200, 429, 200]


def test_a_body_over_the_limit_is_413_declared_or_streamed(repo: Path) -> None:
    app = create_app(repo, ServeSettings(guard=GuardSettings(max_body_bytes=64)))
    declared = call(app, "POST", "/v2/models/mlp/infer", json=X)
    assert declared.status_code == 413 and "at most 64" in declared.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
        yield json.dumps(X).encode()[:50]
        yield json.dumps(X).encode()[50:]

    app2 = create_app(repo, ServeSettings(guard=GuardSettings(max_body_bytes=64)))
    streamed = call(app2, "POST", "/v2/models/mlp/infer", content=chunks())
    assert streamed.status_code == 413


def test_nan_is_allowed_when_the_policy_says_so(repo: Path) -> None:
    x = np.full((1, 8), np.nan, dtype=np.float32)
    head = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "parameters": {"binary_data_size": 32}}]}
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))}
    app = create_app(repo, ServeSettings(guard=GuardSettings(non_finite="allow")))
    assert call(app, "POST", "/v2/models/mlp/infer", content=head + x.tobytes(), headers=headers).status_code == 200
    strict = create_app(repo, ServeSettings())
    assert call(strict, "POST", "/v2/models/mlp/infer", content=head + x.tobytes(), headers=headers).status_code == 400


def test_values_outside_the_manifest_range_are_400(repo: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(repo / "mlp" / "1")
    spec = bundle.manifest.inputs[0].model_copy(update={"value_range": (0.0, 1.0)})
    manifest = bundle.manifest.model_copy(update={"inputs": (spec,)})
    write_bundle(tmp_path / "ranged", onnx.load(str(bundle.model_path)), manifest)
    app = create_app(tmp_path / "ranged")
    bad = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 7 + [3.0]}]}
    response = call(app, "POST", "/v2/models/mlp/infer", json=bad)
    assert response.status_code == 400
    assert response.json()["error"].startswith("Input 'pixels' must lie in [0, 1]; got values in [0.5, 3]")
    assert call(create_app(tmp_path / "ranged"), "POST", "/v2/models/mlp/infer", json=X).status_code == 200


def test_cors_is_off_unless_configured(repo: Path) -> None:
    preflight = {"headers": {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}}
    off = call(create_app(repo), "GET", "/v2/health/live", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in off.headers
    on_app = create_app(repo, ServeSettings(guard=GuardSettings(cors_origins=("https://app.example",))))
    on = call(on_app, "OPTIONS", "/v2/models/mlp/infer", **preflight)
    assert on.status_code == 200 and on.headers["access-control-allow-origin"] == "https://app.example"


def test_keys_are_required_off_loopback_unless_anonymous_is_explicit(repo: Path) -> None:
    with pytest.raises(ConfigError, match="without API keys"):
        create_app(repo, ServeSettings(host="0.0.0.0"))
    Guard(GuardSettings(allow_anonymous=True), host="0.0.0.0")
    Guard(GuardSettings(api_key_hashes=frozenset({hash_key("k")})), host="10.1.2.3")
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        Guard(GuardSettings(), host=host)


def test_keys_from_file_and_environment_are_stored_hashed(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nalpha-key\n\nbeta-key\n", encoding="utf-8")
    hashes = read_keys(key_file, {"SLIPSTREAM_API_KEYS": "gamma-key, delta-key"}, "SLIPSTREAM_API_KEYS")
    assert hashes == {hash_key(k) for k in ("alpha-key", "beta-key", "gamma-key", "delta-key")}
    settings = settings_from_options(
        {"api_key_file": key_file, "host": "0.0.0.0"}, {"SLIPSTREAM_ADMIN_KEYS": "root-key"}
    )
    dumped = settings.model_dump_json()
    assert "alpha-key" not in dumped and "root-key" not in dumped
    assert settings.guard.admin_key_hashes == {hash_key("root-key")}
    with pytest.raises(ConfigError, match="version_policy"):
        settings_from_options({"version_policy": "newest"}, {})


def test_access_log_lines_are_json_with_a_request_id(repo: Path) -> None:
    sink = io.BytesIO()
    app = create_app(repo, access_sink=sink)
    response = call(app, "POST", "/v2/models/mlp/infer", json=X, headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert lines[-1]["request_id"] == "trace-42" and lines[-1]["status"] == 200 and lines[-1]["model"] == "mlp"
    assert lines[-1]["path"] == "/v2/models/mlp/infer" and lines[-1]["duration_ms"] >= 0
    quiet = io.BytesIO()
    call(create_app(repo, ServeSettings(access_log=False), access_sink=quiet), "GET", "/v2/health/live")
    assert quiet.getvalue() == b""


def test_readiness_is_false_until_the_models_are_loaded(repo: Path) -> None:
    app = create_app(repo)

    async def go() -> tuple[int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            before = (await client.get("/v2/health/ready")).status_code
            await app.startup()
            after = (await client.get("/v2/health/ready")).status_code
            await app.shutdown()
            return before, after

    assert asyncio.run(go()) == (503, 200)


def test_an_api_key_sent_as_bearer_is_accepted(repo: Path) -> None:
    app = create_app(repo, ServeSettings(guard=GuardSettings(api_key_hashes=frozenset({hash_key(API_KEY)}))))
    assert call(app, "GET", "/v2/models/mlp", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
