"""Send the held-out rows to a running `slipstream serve`, one request per row, each with its group;
then send the true labels as feedback and print the server's monitoring summary (fairness by group).

    .venv/bin/python examples/tabular/client.py [--url http://127.0.0.1:8000] [--key-file KEY] \
        [--data build-output/tabular] [--model breast-cancer]

The feedback and monitoring endpoints exist when the server runs with --monitor-db.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key-file", type=Path, default=None, help="A file whose first line is an API key.")
    parser.add_argument("--data", type=Path, default=Path("build-output/tabular"))
    parser.add_argument("--model", default="breast-cancer")
    args = parser.parse_args()
    headers = {}
    if args.key_file is not None:
        headers["Authorization"] = "Bearer " + args.key_file.read_text().splitlines()[0].strip()
    data = np.load(args.data / "eval.npz")
    x, y, groups = data["input"], data["labels"], np.load(args.data / "groups.npy")
    feedback, correct = [], 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=10.0) as client:
        for row, label, group in zip(x, y, groups, strict=True):
            body = {
                "inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": row.tolist()}],
                "parameters": {"group": str(group)},  # the synthetic group attribute, per request
            }
            reply = client.post(f"/v2/models/{args.model}/infer", json=body)
            reply.raise_for_status()
            doc = reply.json()
            outputs = {o["name"]: o["data"] for o in doc["outputs"]}
            correct += int(outputs["label"][0] == label)
            feedback.append({"id": doc.get("id") or reply.headers["x-request-id"], "label": int(label)})
        print(f"{len(y)} requests, accuracy {correct / len(y):.4f}")
        reply = client.post(f"/v2/models/{args.model}/feedback", json={"labels": feedback})
        if reply.status_code == 404:
            print("no feedback endpoint: start the server with --monitor-db to get the fairness report")
            return
        reply.raise_for_status()
        summary = client.get(f"/v2/models/{args.model}/monitoring").json()
        print(json.dumps(summary.get("fairness", summary), indent=2))


if __name__ == "__main__":
    main()
