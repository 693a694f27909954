"""The standalone runner written beside an edge export: numpy and onnxruntime only, no slipstream."""

from __future__ import annotations

RUNNER_SCRIPT = '''#!/usr/bin/env python3
"""Run the exported .ort model with onnxruntime; needs only numpy and onnxruntime (written by slipstream export).

    python run.py                         one example batch (zeros), outputs summarized as JSON
    python run.py inputs.npz --out o.npz  your inputs (arrays named as edge.json's inputs), outputs to a file

Refuses to run on another CPU architecture than the export's, without its execution providers, or on a
model file whose sha256 differs from edge.json's.
"""

import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
DTYPES = {"bfloat16": None, "string": object}


def load(info):
    target = info["target"]
    machine = ALIASES.get(platform.machine().lower(), platform.machine().lower())
    if machine != target["architecture"]:
        sys.exit(
            f"run.py: refusing to run: the model was exported for {target['architecture']}, this machine is "
            f"{machine}. Export it again with --architecture {machine}."
        )
    missing = [p for p in target["providers"] if p not in ort.get_available_providers()]
    if missing:
        sys.exit(f"run.py: refusing to run: this onnxruntime lacks {', '.join(missing)}.")
    model = (HERE / info["file"]).read_bytes()
    if hashlib.sha256(model).hexdigest() != info["sha256"]:
        sys.exit(f"run.py: refusing to run: {info['file']} does not match the sha256 in edge.json (damaged?).")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    return ort.InferenceSession(model, options, providers=target["providers"])


def example(info):
    feeds = {}
    for spec in info["inputs"]:
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        dtype = DTYPES.get(spec["dtype"], spec["dtype"])
        low = spec["value_range"][0] if spec.get("value_range") else 0
        feeds[spec["name"]] = np.full(shape, "" if dtype is object else low, dtype=dtype)
    return feeds


def main(argv):
    info = json.loads((HERE / "edge.json").read_text())
    session = load(info)
    out = None
    if "--out" in argv:
        at = argv.index("--out")
        out, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    feeds = dict(np.load(argv[0])) if argv else example(info)
    names = [o["name"] for o in info["outputs"]]
    results = dict(zip(names, session.run(names, feeds)))
    if out:
        np.savez(out, **results)
    else:
        summary = {n: {"shape": list(r.shape), "first": r.reshape(-1)[:4].tolist()} for n, r in results.items()}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''
