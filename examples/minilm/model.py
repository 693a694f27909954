"""Sentence embeddings with all-MiniLM-L6-v2 (offline): the entry points of examples/minilm/minilm.yaml.

  model.py:build           the sentence encoder as a torch module: forward(input_ids, attention_mask)
  model.py:example_inputs  two tokenized sentences, for the export
  model.py:eval_data       the demo sentences, tokenized and padded to SEQ_LEN tokens, in batches

The module lives in slipstream.demo.minilm, shared with the tests and the benchmarks.
Run it to see a few similarities:  .venv/bin/python examples/minilm/model.py
"""

from __future__ import annotations

import numpy as np
import torch

from slipstream.demo.minilm import SENTENCES, SEQ_LEN, build, eval_data, example_inputs, tokenize

__all__ = ["SENTENCES", "SEQ_LEN", "build", "eval_data", "example_inputs", "tokenize"]

if __name__ == "__main__":
    model = build()
    feeds = tokenize(SENTENCES[:4])
    with torch.no_grad():
        vectors = model(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))).numpy()
    print(f"{len(SENTENCES)} sentences; embedding size {vectors.shape[1]}")
    print("cosine similarities of the first four sentences:")
    print(np.round(vectors @ vectors.T, 3))
