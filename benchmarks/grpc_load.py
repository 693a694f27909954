"""A small closed-loop gRPC load client for ``inference.GRPCInferenceService/ModelInfer`` (wrk's gRPC twin).

``c`` workers on asyncio (grpc.aio), each sending one request and waiting for its answer before the next,
over a few channels (separate TCP connections, as wrk opens ``c``). The request is serialized once, with
its tensors in ``raw_input_contents`` (binary, as Triton's clients send them), and replies are counted
without being parsed, so the client spends its CPU on the transport only: on a shared 2-core machine the
client's CPU is taken from the server, and a heavier client would understate the server.

    python benchmarks/grpc_load.py --target 127.0.0.1:8001 --model tiny --input pixels:FP32:1x64 -c 8 -d 5

Prints one JSON line: rps, total, p50/p99 (ms), errors (non-OK statuses, with the first one's text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # run from a checkout, too

from slipstream.serve.grpc import grpc_predict_v2_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "FP16": np.float16}


def request_bytes(model: str, inputs: list[str], seed: int = 0) -> bytes:
    """A serialized ModelInferRequest with every input raw; ``inputs`` are NAME:DATATYPE:AxBxC."""
    rng = np.random.default_rng(seed)
    message = pb.ModelInferRequest(model_name=model)
    for spec in inputs:
        name, datatype, dims = spec.split(":")
        shape = [int(d) for d in dims.split("x")]
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        array = rng.standard_normal(shape).astype(DTYPES[datatype])
        message.raw_input_contents.append(array.tobytes())
    return bytes(message.SerializeToString())


async def run(
    target: str, payload: bytes, concurrency: int, seconds: float, channels: int, metadata: tuple[tuple[str, str], ...]
) -> dict[str, object]:
    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
    ]
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, min(channels, concurrency)))]
    calls = [ch.unary_unary(METHOD) for ch in opened]  # no serializers: bytes out, bytes back
    for call in calls:  # connect and warm up each channel before the clock starts
        await call(payload, metadata=metadata)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def worker(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
        clock = time.perf_counter
        while (start := clock()) < deadline:
            try:
                await call(payload, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
            latencies.append(clock() - start)

    begun = time.perf_counter()
    await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - begun
    for ch in opened:
        await ch.close()
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "rps": len(latencies) / elapsed,
        "total": len(latencies),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT of the gRPC server.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", action="append", required=True, help="NAME:DATATYPE:AxB (repeatable).")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="Seconds.")
    parser.add_argument("--channels", type=int, default=4, help="TCP connections the workers share.")
    parser.add_argument("--key", default=None, help="API key (sent as 'authorization: Bearer KEY').")
    args = parser.parse_args()
    payload = request_bytes(args.model, args.input)
    metadata = (("authorization", f"Bearer {args.key}"),) if args.key else ()
    job = run(args.target, payload, args.concurrency, args.duration, args.channels, metadata)
    try:
        import uvloop
    except ImportError:  # plain asyncio works too, a little slower
        result = asyncio.run(job)
    else:
        result = uvloop.run(job)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
