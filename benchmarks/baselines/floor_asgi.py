"""The serving benchmark's protocol floor: a bare ASGI app with orjson and onnxruntime inline, no checks.

It speaks the same JSON infer request and response as slipstream (Open Inference Protocol v2, JSON tensors)
and nothing else: no routing beyond the infer path, no auth, no input checks, no batching, no metrics, no
access log; one onnxruntime session at one intra-op thread, called on the event loop. Under the same
uvicorn (httptools, uvloop) it is the least a Python server can spend per request, so slipstream's req/s
over this floor's says what its checks, metrics and batching cost.

    python benchmarks/baselines/floor_asgi.py MODEL.onnx --name tiny --port 8002
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn

DTYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "FP64": np.float64}
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64"}
JSON = [(b"content-type", b"application/json")]

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def build_app(model_path: str, name: str) -> ASGIApp:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]

    async def app(
        scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            await send({"type": "http.response.start", "status": 404, "headers": JSON})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        message = await receive()
        body = message.get("body", b"")
        while message.get("more_body", False):
            message = await receive()
            body += message.get("body", b"")
        doc = orjson.loads(body)
        feeds = {
            t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"]) for t in doc["inputs"]
        }
        results = session.run(output_names, feeds)
        outputs = [
            {"name": n, "datatype": DATATYPES[r.dtype], "shape": list(r.shape), "data": r.reshape(-1)}
            for n, r in zip(output_names, results, strict=True)
        ]
        reply: dict[str, Any] = {"model_name": name, "model_version": "1"}
        if doc.get("id") is not None:
            reply["id"] = doc["id"]
        reply["outputs"] = outputs
        payload = orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = [*JSON, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--name", default="model")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.model, args.name),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        lifespan="off",
    )


if __name__ == "__main__":
    main()
