"""Regenerate the checked-in stubs from ``grpc_predict_v2.proto``: ``python -m slipstream.serve.grpc.generate``.

The stubs are checked in (no protoc at install time) and a test regenerates them into a temporary
folder and compares, so they cannot drift from the .proto. Needs the dev extra's pinned grpcio-tools.

One change to protoc's output: the messages are built in a private descriptor pool, not protobuf's
process-wide default one. The protocol's package is ``inference``, as in Triton's own stubs
(``tritonclient.grpc.service_pb2``), and two files defining ``inference.ModelInferRequest`` in one pool
fail to import ("duplicate symbol"): with the default pool, a process could not hold both our server
and a Triton client. Only the service and method names travel on the wire, so nothing else changes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_predict_v2.proto"
STUBS = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# slipstream: a private pool, so that Triton's stubs (same package 'inference') can be imported beside these.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def generate(out: Path) -> list[Path]:
    """Write the stubs into ``out`` (a folder); returns their paths."""
    src = HERE.parents[2]  # .../src: the .proto's import path makes the stubs import each other absolutely
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{src}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(HERE / PROTO),
            ],
            check=True,
        )
        made = Path(tmp) / HERE.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in STUBS:
            text = (made / name).read_text(encoding="utf-8")
            if name.endswith("_pb2.py"):
                if text.count(_DEFAULT_POOL) != 1:
                    raise RuntimeError(f"protoc's {name} no longer has the line this script rewrites; update it.")
                text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL)
            (out / name).write_text(text, encoding="utf-8")
            written.append(out / name)
        shutil.rmtree(made, ignore_errors=True)
    return written


if __name__ == "__main__":
    for path in generate(HERE):
        print(path)
