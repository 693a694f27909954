"""Safe defaults, driven through the ASGI app with httpx (and a fake clock for the token bucket)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from slipstream.artifact import Bundle, write_bundle
from slipstream.errors import ConfigError, UnauthorizedError
from slipstream.serve import GuardSettings, ServeSettings, create_app
from slipstream.serve.app import SlipstreamApp
from slipstream.serve.guard import Guard, hash_key, read_keys
from slipstream.serve.server import settings_from_options
from tests.serve_support import ADMIN_KEY, API_KEY, add_version, corrupt_copy

K1, K2 = "first-caller-key-0001", "second-caller-key-002"

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
    keys = frozenset({hash_key(K1), hash_key(K2)})
    app = create_app(
        repo, ServeSettings(guard=GuardSettings(api_key_hashes=keys, rate_per_s=1.0, burst=1)), clock=clock
    )
    k1 = {"json": X, "headers": {"X-API-Key": K1}}
    k2 = {"json": X, "headers": {"X-API-Key": K2}}
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
    Guard(GuardSettings(api_key_hashes=frozenset({hash_key(API_KEY)})), host="10.1.2.3")
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        Guard(GuardSettings(), host=host)


def test_keys_from_file_and_environment_are_stored_salted(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_bytes(b"# team keys\r\nalpha-key-0123456789\r\n\nbeta key 0123456789\n")  # CRLF ends no key
    hashes = read_keys(
        key_file, {"SLIPSTREAM_API_KEYS": "gamma-key-0123456789,delta-key-0123456789"}, "SLIPSTREAM_API_KEYS"
    )
    guard = Guard(GuardSettings(api_key_hashes=hashes), host="127.0.0.1")
    for key in ("alpha-key-0123456789", "beta key 0123456789", "gamma-key-0123456789", "delta-key-0123456789"):
        assert guard.authenticate([(b"x-api-key", key.encode())], "c") in {h.rsplit("$", 1)[1] for h in hashes}
    for near in ("alpha-key-0123456789\r", "betakey0123456789", "gamma-key-012345678"):  # taken exactly
        with pytest.raises(UnauthorizedError):
            guard.authenticate([(b"x-api-key", near.encode())], "c")
    # Salted: the same key hashes differently each time, and never to its plain sha256.
    assert hash_key(API_KEY) != hash_key(API_KEY)
    assert hashlib.sha256(API_KEY.encode()).hexdigest() not in hash_key(API_KEY)
    settings = settings_from_options(
        {"api_key_file": key_file, "host": "0.0.0.0"}, {"SLIPSTREAM_ADMIN_KEYS": "root-key-0123456789"}
    )
    dumped = settings.model_dump_json()
    assert "alpha-key" not in dumped and "root-key" not in dumped
    assert len(settings.guard.admin_key_hashes) == 1
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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("short-key\n", "has 9 characters; keys need at least 16"),
        (" padded-key-0123456789\n", "whitespace around it"),
        ("tabbed-key-0123456789\t\n", "whitespace around it"),
    ],
)
def test_a_weak_or_padded_key_is_refused_at_startup_saying_what_to_do(tmp_path: Path, text: str, expected: str) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# ok\nfine-key-0123456789\n" + text, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected) as refused:
        settings_from_options({"api_key_file": key_file}, {})
    assert "Line 3" in refused.value.message and refused.value.hint
    with pytest.raises(ConfigError, match="Key 2 of"):
        read_keys(None, {"SLIPSTREAM_API_KEYS": "fine-key-0123456789, spaced-key-0123456789"}, "SLIPSTREAM_API_KEYS")
    with pytest.raises(ConfigError, match="at least 16"):
        hash_key("tiny")
    with pytest.raises(ConfigError, match="salted"):  # a plain sha256 digest from an older release
        Guard(GuardSettings(api_key_hashes=frozenset({hashlib.sha256(API_KEY.encode()).hexdigest()})), host="::1")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("Authorization", f"Bearer {API_KEY}"), ("X-API-Key", API_KEY)], 200),  # agreeing: fine
        ([("Authorization", f"Bearer {API_KEY}"), ("X-API-Key", K1)], 400),
        ([("Authorization", f"Bearer {K1}"), ("X-API-Key", API_KEY)], 400),
        ([("X-API-Key", API_KEY), ("X-API-Key", API_KEY)], 400),
        ([("Authorization", f"Bearer {API_KEY}"), ("Authorization", f"Bearer {API_KEY}")], 400),
        ([("X-API-Key", f" {API_KEY}x")], 401),
    ],
)
def test_conflicting_auth_headers_are_a_400_that_says_so(
    repo: Path, headers: list[tuple[str, str]], status: int
) -> None:
    keys = frozenset({hash_key(API_KEY), hash_key(K1)})
    app = create_app(repo, ServeSettings(guard=GuardSettings(api_key_hashes=keys)))
    got = call(app, "GET", "/v2/models/mlp", headers=httpx.Headers(headers))
    assert got.status_code == status
    if status == 400:
        assert "send one key" in got.json()["error"].lower() or "different keys" in got.json()["error"]


def test_metrics_and_dashboard_need_the_key_unless_metrics_are_opened(repo: Path) -> None:
    keys = frozenset({hash_key(API_KEY)})
    app = create_app(repo, ServeSettings(guard=GuardSettings(api_key_hashes=keys)))
    anonymous = calls(app, [("GET", "/metrics", {}), ("GET", "/dashboard", {})])
    assert [r.status_code for r in anonymous] == [401, 401]
    assert b"slipstream_" not in anonymous[0].content
    assert b"/v2/monitoring" not in anonymous[1].content and b"API key" in anonymous[1].content  # no data, a form
    auth = {"headers": {"Authorization": f"Bearer {API_KEY}"}}
    keyed = calls(app, [("GET", "/metrics", dict(auth)), ("GET", "/dashboard", dict(auth))])
    assert [r.status_code for r in keyed] == [200, 200]
    assert b"slipstream_" in keyed[0].content and b"/v2/monitoring" in keyed[1].content
    assert settings_from_options({"metrics_open": True}, {}).guard.metrics_open  # serve --open-metrics
    scrape = create_app(repo, ServeSettings(guard=GuardSettings(api_key_hashes=keys, metrics_open=True)))
    opened = calls(scrape, [("GET", "/metrics", {}), ("GET", "/dashboard", {})])
    assert [r.status_code for r in opened] == [200, 401]
    open_server = create_app(repo)  # no keys: nothing to guard
    assert [r.status_code for r in calls(open_server, [("GET", "/metrics", {}), ("GET", "/dashboard", {})])] == [
        200,
        200,
    ]


def test_the_admin_key_is_separate_and_exact(repo: Path) -> None:
    app = create_app(repo, ServeSettings(guard=GuardSettings(admin_key_hashes=frozenset({hash_key(ADMIN_KEY)}))))
    got = calls(
        app,
        [
            ("POST", "/v2/repository/index", {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}),
            ("POST", "/v2/repository/index", {"headers": {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"}}),
        ],
    )
    assert [r.status_code for r in got] == [200, 401]


def test_a_failed_version_is_a_503_without_paths_or_digests_and_the_log_has_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path / "repo", "mlp", "1", tmp_path)
    corrupt_copy(tmp_path / "repo" / "mlp" / "1", tmp_path / "repo" / "mlp" / "2")
    app = create_app(tmp_path / "repo", ServeSettings(version_policy="all"))
    with caplog.at_level(logging.WARNING, logger="slipstream.serve"):
        got = call(app, "POST", "/v2/models/mlp/versions/2/infer", json=X, headers={"X-Request-ID": "req-77"})
    text = got.json()["error"]
    assert got.status_code == 503 and "integrity check" in text and "req-77" in text
    assert str(tmp_path) not in text and "model.onnx" not in text and not re.search(r"[0-9a-f]{8}", text)
    logged = [r.getMessage() for r in caplog.records if getattr(r, "request_id", None) == "req-77"]
    assert logged and str(tmp_path) in logged[0] and "model.onnx" in logged[0]


def one_row_only(path: Path) -> Path:
    """A model with a real bug: it reshapes its input to a fixed [1, 8], so onnxruntime fails on two rows."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["pixels", "fixed"], ["out"], name="fixed_reshape")],
        "one-row",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "fixed")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path))
    return path


def test_an_unexpected_failure_is_a_500_that_names_only_the_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from slipstream.importers import import_onnx

    import_onnx(one_row_only(tmp_path / "one.onnx"), tmp_path / "repo" / "one" / "1", name="one")
    app = create_app(tmp_path / "repo")
    two_rows = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 8], "data": [0.5] * 16}]}
    with caplog.at_level(logging.ERROR, logger="slipstream.serve"):
        got = call(app, "POST", "/v2/models/one/infer", json=two_rows, headers={"X-Request-ID": "req-9"})
    assert got.status_code == 500 and "req-9" in got.json()["error"]
    assert "fixed_reshape" not in got.text and str(tmp_path) not in got.text  # onnxruntime's words stay in the log
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == "req-9"]
    assert logged and any("fixed_reshape" in (r.getMessage() + str(r.exc_info or "")) for r in logged)
