"""Issue 18, must-show: property-based fuzzing of every endpoint finds no 5xx and no answer off the document.

A real server (in this process's background thread, on 127.0.0.1 with an ephemeral port, API and admin keys
on) serves the fuzz repository of the tests (an 8-feature MLP, a string/fp16 echo model, a scorer the
repository endpoints may unload and load). schemathesis draws valid and invalid requests for every
operation of the served OpenAPI document (``GET /v2/openapi.json``, names narrowed to this repository's so
that requests reach the codec and the models) with fresh random inputs each run; each response must not be
a 5xx and must match the document's status codes, content types, headers and schemas.

    .venv/bin/python benchmarks/hostile_fuzz.py [--quick]

``section(quick)`` returns the markdown (benchmarks/hostile.py includes it). Loopback only; it stops by itself
(quick: under a minute; full: a few minutes on a loaded 2-core machine). The test suite runs the same driver
(tests/test_serve_fuzz.py) on a fixed, smaller draw.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.serve_support: the fuzz driver, repository and keys the tests use

from tests.serve_support import (  # noqa: E402
    ADMIN_KEY,
    API_KEY,
    ServerThread,
    fuzz_document,
    fuzz_repository,
    fuzz_server,
)

from slipstream.runtime.targets import cpu_model  # noqa: E402
from slipstream.serve.guard import hash_key  # noqa: E402
from slipstream.serve.settings import GuardSettings, ServeSettings  # noqa: E402


def section(quick: bool) -> list[str]:
    """The fuzzing run as markdown lines: requests sent, statuses, 5xx (must be 0), schema failures."""
    examples, infer_examples = (8, 120) if quick else (40, 600)
    settings = ServeSettings(
        port=0,
        access_log=False,
        guard=GuardSettings(
            api_key_hashes=frozenset({hash_key(API_KEY)}), admin_key_hashes=frozenset({hash_key(ADMIN_KEY)})
        ),
    )
    with (
        tempfile.TemporaryDirectory(prefix="slipstream-fuzz-") as work,
        ServerThread(fuzz_repository(Path(work)), settings) as server,
    ):
        doc = httpx.get(f"{server.url}/v2/openapi.json", timeout=30).json()
        report = fuzz_server(
            server.url, fuzz_document(doc), examples=examples, infer_examples=infer_examples, seed=None
        )
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(report.statuses.items()))
    lines = [
        "### Fuzzing every endpoint (schemathesis over the served OpenAPI document)",
        "",
        f"- {report.requests} requests over {report.operations} operations in {report.seconds:.0f} s "
        f"(valid and invalid requests; up to {examples} draws per operation and mode, {infer_examples} for infer; "
        "fresh random inputs)",
        f"- statuses: {statuses}",
        f"- **5xx: {report.server_errors}**; answers off the document (status, content type, headers or body "
        f"schema): {len(report.failures)}",
    ]
    lines += [f"  - {failure.splitlines()[0]}" for failure in report.failures[:10]]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer draws per operation (under a minute)")
    args = ap.parse_args()
    command = "python benchmarks/hostile_fuzz.py" + (" --quick" if args.quick else "")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs\nCommand: {command}", flush=True)
    lines = section(args.quick)
    print("\n".join(lines))
    if not any(line.startswith("- **5xx: 0**") and line.endswith("schema): 0") for line in lines):
        sys.exit(1)  # a 5xx or an answer off the document: the run failed


if __name__ == "__main__":
    main()
