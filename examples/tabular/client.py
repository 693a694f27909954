"""Send the held-out rows to a running `slipstream serve`, one request per row, each with its group; then
send the true labels as feedback and print what the server's monitor concluded (quality, fairness with
intervals, drift, alerts).

    .venv/bin/python examples/tabular/client.py [--url http://127.0.0.1:8000] [--key-file KEY] \
        [--data build-output/tabular] [--model breast-cancer]

The feedback and monitoring endpoints exist when the server runs with --monitor-db. The summary is asked
for with `?evaluate=true`: the monitor evaluates now, over the rows and labels this client just sent
(without it, the server returns its latest periodic evaluation, which may predate them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(doc: dict[str, Any]) -> None:
    """The monitor's evaluated summary, in words."""
    print(f"monitor: {doc.get('requests')} requests observed")
    quality = doc.get("quality")
    if quality:
        realized, reference = quality.get("realized") or {}, quality.get("reference") or {}
        print(
            f"quality ({quality['window']}): accuracy {_num(realized.get('accuracy'))} on {quality['labeled']} "
            f"labeled rows, {_num(reference.get('accuracy'))} at build time; estimated before labels "
            f"{_num(quality.get('estimated_accuracy'))}; {quality['reason']}"
        )
    else:
        print("quality: none (the bundle has no profile, or no prediction to judge)")
    fairness = doc.get("fairness")
    if fairness:
        confidence = fairness.get("confidence", 0.99)
        label = fairness["positive_label"]
        print(f"fairness (selected = predicted {label:g}; {confidence:.0%} simultaneous intervals):")
        for g in fairness["groups"]:
            print(
                f"  group {g['group']}: {g['rows']} rows, selection rate {_num(g['selection_rate'])}, "
                f"accuracy {_num(g.get('accuracy'))}, TPR {_num(g.get('tpr'))}, FPR {_num(g.get('fpr'))}"
            )
        for gap in fairness.get("gaps") or []:
            print(f"  {gap['metric']}: {gap['reason']}")
    else:
        print("fairness: none (no request carried a group)")
    drift = doc.get("drift")
    if drift and drift.get("judged"):
        drifted = drift.get("drifted_features") or []
        found = f"drifted: {', '.join(drifted)}" if drifted else "no input feature drifted"
        print(f"drift ({drift['rows']} rows, {drift['method']}): {found}")
    else:
        print(f"drift: not judged ({(drift or {}).get('rows', 0)} rows in the window)")
    firing = [a for a in doc.get("alerts") or [] if a.get("state") == "firing"]
    print(f"alerts firing: {len(firing)}" + ("" if firing else " (none)"))
    for alert in firing:
        print(f"  {alert['rule']}: {alert['reason']}")


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
    with httpx.Client(base_url=args.url, headers=headers, timeout=30.0) as client:
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
            print("no feedback endpoint: start the server with --monitor-db to get the monitoring summary")
            return
        reply.raise_for_status()
        print(f"{len(feedback)} labels sent back")
        summary = client.get(f"/v2/models/{args.model}/monitoring", params={"evaluate": "true"})
        summary.raise_for_status()
        print_summary(summary.json())


if __name__ == "__main__":
    main()
