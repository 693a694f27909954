"""Compatibility check: drive a slipstream server with the unmodified tritonclient HTTP client.

Not part of the test suite (tritonclient pulls gevent and aiohttp, which slipstream does not need);
run it from a throwaway virtual environment against a repository holding the test models
(``mlp`` versions 1 and 2 and ``echo`` version 1 from tests/serve_support.py):

    python -m venv /tmp/tc && /tmp/tc/bin/pip install 'tritonclient[http]==2.73.0' numpy
    SLIPSTREAM_ADMIN_KEYS=adm slipstream serve REPO --port 8311 --version-policy all &
    /tmp/tc/bin/python benchmarks/compat_tritonclient.py 127.0.0.1:8311
"""

import sys

import numpy as np
import tritonclient.http as httpclient  # type: ignore[import-not-found]

url = sys.argv[1]
c = httpclient.InferenceServerClient(url=url)
print("live", c.is_server_live(), "ready", c.is_server_ready(), "model ready", c.is_model_ready("mlp"))
print("server metadata", c.get_server_metadata())
print("model metadata", c.get_model_metadata("mlp", "2"))
x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
for binary in (False, True):
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    r = c.infer("mlp", [inp], outputs=[out], request_id="tc-1", model_version="1")
    y = r.as_numpy("probabilities")
    print("binary" if binary else "json", y.shape, y.dtype, r.get_response()["id"], float(y.sum()))
texts = np.array([b"hello", "wörld".encode()], dtype=np.object_)
half = np.array([[1, 2], [3, 4]], dtype=np.float16)
i1 = httpclient.InferInput("text", [2], "BYTES")
i1.set_data_from_numpy(texts, binary_data=True)
i2 = httpclient.InferInput("half", [2, 2], "FP16")
i2.set_data_from_numpy(half, binary_data=True)
wanted = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("text_out", "half_out")]
r = c.infer("echo", [i1, i2], outputs=wanted)
print("bytes", r.as_numpy("text_out"), "fp16", r.as_numpy("half_out").tolist())
print("index", c.get_model_repository_index(headers={"Authorization": "Bearer adm"}))
