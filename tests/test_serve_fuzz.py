"""Property-based fuzzing of every endpoint over a real server: no 5xx, and every answer as documented.

schemathesis generates valid and invalid requests from the served OpenAPI document (narrowed to the
models this repository has, so requests reach the codec and the models); each response must not be a
5xx and must match the document's status codes, content types, headers and schemas. The inputs are
derandomized: the same ones every run, so a failure here reproduces. ``benchmarks/hostile_fuzz.py``
runs the same driver on fresh inputs for longer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slipstream.serve.guard import hash_key
from slipstream.serve.settings import GuardSettings, ServeSettings
from tests.serve_support import ADMIN_KEY, API_KEY, ServerThread, fuzz_document, fuzz_repository, fuzz_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    settings = ServeSettings(
        port=0,
        access_log=False,
        guard=GuardSettings(
            api_key_hashes=frozenset({hash_key(API_KEY)}), admin_key_hashes=frozenset({hash_key(ADMIN_KEY)})
        ),
    )
    with ServerThread(fuzz_repository(tmp_path_factory.mktemp("fuzz")), settings) as running:
        yield running


@pytest.mark.slow
def test_the_fuzzer_finds_no_5xx_and_no_answer_off_the_document(server: ServerThread) -> None:
    doc = httpx.get(f"{server.url}/v2/openapi.json").json()
    report = fuzz_server(server.url, fuzz_document(doc), examples=6, infer_examples=40, seed=0)
    assert report.operations == len([m for item in doc["paths"].values() for m in item if m != "parameters"])
    assert report.server_errors == 0, report.statuses
    assert report.failures == []
    # It reached the models, not only the 404 for an unknown name: some requests were answered, many refused.
    assert report.statuses[200] > 0 and report.statuses[400] > 0, report.statuses


def test_the_document_is_valid_openapi_and_served_as_shipped(server: ServerThread) -> None:
    from openapi_spec_validator import validate

    served = httpx.get(f"{server.url}/v2/openapi.json")
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"
    shipped = Path(__file__).parents[1] / "src" / "slipstream" / "serve" / "openapi.json"
    assert served.json() == json.loads(shipped.read_text(encoding="utf-8"))
    validate(served.json())
