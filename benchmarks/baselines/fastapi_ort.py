"""The minimal FastAPI + onnxruntime server the serving benchmark compares against (no batching).

It speaks just enough of the Open Inference Protocol v2 for the benchmark's requests: a pydantic
request body, one onnxruntime session with one intra-op thread, one model call per request.

    python benchmarks/baselines/fastapi_ort.py MODEL.onnx --port 8001
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel

DTYPES = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "FP64": np.float64}
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.float64): "FP64"}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor]


def build_app(model_path: str, name: str) -> FastAPI:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    app = FastAPI()

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: InferRequest) -> Response:
        feeds = {t.name: np.asarray(t.data, dtype=DTYPES[t.datatype]).reshape(t.shape) for t in request.inputs}
        results = session.run(output_names, feeds)
        outputs = [
            {"name": n, "datatype": DATATYPES[r.dtype], "shape": list(r.shape), "data": r.reshape(-1)}
            for n, r in zip(output_names, results, strict=True)
        ]
        doc = {"model_name": name, "id": request.id, "outputs": outputs}
        return Response(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--name", default="model")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    app = build_app(args.model, args.name)
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, http="httptools", loop="uvloop"
    )


if __name__ == "__main__":
    main()
