"""Fused attention on a real (tiny, randomly initialised) BERT exported by torch dynamo like MiniLM:
graph.optimize makes com.microsoft Attention, quantize.dynamic then makes QAttention, the ladder offers it."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from slipstream.artifact import Bundle
from slipstream.build.ladder import auto_candidates
from slipstream.build.recipe import parse_recipe
from slipstream.passes._attention import PROBE_MASK, fuse_attention
from slipstream.passes.recipe import optimize
from slipstream.runtime import Engine

LAYERS = 2
pytestmark = pytest.mark.slow  # one real torch dynamo export of a tiny BERT for the module


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """BertModel (2 layers, 4 heads, hidden 32) + mean pooling + L2 norm, as slipstream.demo.minilm exports it."""
    import torch
    import transformers

    import slipstream
    from slipstream.demo.minilm import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    model = SentenceEncoder(transformers.BertModel(config)).eval()
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 8, 3, 0, 0]])
    example = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecations inside torch and transformers, not ours
        return slipstream.convert(
            model, tmp_path_factory.mktemp("tiny-bert") / "bundle", example_inputs=example, dynamic_axes=["1=seq"],
            output_names=["sentence_embedding"], name="tiny-bert",
        )  # fmt: skip


def _feeds() -> dict[str, np.ndarray]:
    """Eight sequences of 12 tokens, right-padded to lengths 12 down to 2."""
    rng = np.random.default_rng(0)
    lengths = np.array([12, 11, 9, 7, 6, 4, 3, 2])
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, 64, size=(8, 12)) * mask, "attention_mask": mask}


def _ops(bundle: Bundle) -> Counter[str]:
    return Counter(n.op_type for n in bundle.load_model().graph.node)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def fused(tiny_bert: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return optimize(tiny_bert, ["graph.optimize"], tmp_path_factory.mktemp("fused") / "b")


def test_graph_optimize_fuses_every_attention_block_and_keeps_the_outputs(tiny_bert: Bundle, fused: Bundle) -> None:
    resolved = fused.manifest.resolved["graph.optimize"]
    assert isinstance(resolved, dict)
    assert resolved["fused_operators"]["Attention"] == LAYERS  # type: ignore[index]
    ops = _ops(fused)
    assert ops["Attention"] == LAYERS
    assert ops["Softmax"] == 0 and ops["Transpose"] == 0  # the decomposed attention is gone
    feeds = _feeds()
    want = Engine(tiny_bert).run(feeds)["sentence_embedding"]
    got = Engine(fused).run(feeds)["sentence_embedding"]
    np.testing.assert_allclose(got, want, atol=1e-5)  # padded rows included: the mask is honoured


def test_fused_int8_runs_qattention_within_the_gate(tiny_bert: Bundle, fused: Bundle, tmp_path: Path) -> None:
    int8 = optimize(fused, [("quantize.dynamic", {"per_channel": True})], tmp_path / "int8")
    ops = _ops(int8)
    assert ops["QAttention"] == LAYERS and ops["Attention"] == 0
    resolved = int8.manifest.resolved["quantize.dynamic"]
    assert isinstance(resolved, dict) and resolved["fused_attention"] == f"{LAYERS} QAttention"
    feeds = _feeds()
    want = Engine(tiny_bert).run(feeds)["sentence_embedding"]
    engine = Engine(int8)
    assert engine.resolved().precision == "int8"
    got = engine.run(feeds)["sentence_embedding"]
    assert float(_cosines(got, want).min()) > 0.99


def test_a_mask_that_is_not_a_padding_mask_is_left_unfused(tiny_bert: Bundle) -> None:
    """A causal term added to one layer's mask bias: the probe sees it and nothing is fused."""
    model = tiny_bert.load_model()
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    add = next(n for n in model.graph.node if softmax.input[0] in n.output)
    mask = add.input[1]
    seq = PROBE_MASK.shape[1]
    causal = np.triu(np.full((1, 1, seq, seq), -1e9, dtype=np.float32), k=1)
    model.graph.initializer.append(numpy_helper.from_array(causal, "causal"))
    model.graph.node.insert(
        list(model.graph.node).index(add), helper.make_node("Add", [mask, "causal"], ["causal_mask"])
    )
    add.input[1] = "causal_mask"
    out, count, why = fuse_attention(model)
    assert count == 0 and "not a padding mask" in why
    assert not any(n.op_type == "Attention" for n in out.graph.node)


def test_the_ladder_offers_fused_int8_for_transformers_only(tiny_bert: Bundle, mlp_onnx: Path, tmp_path: Path) -> None:
    def names(model: Path | str, source: Path | None = None) -> list[str]:
        spec = {"model": str(model), "data": {"eval": str(tmp_path / "e.npz")}, "budget": {"max_accuracy_drop": 0.01}}
        return [c.name for c in auto_candidates(parse_recipe(spec), str(tmp_path / "cal.npz"), source)]

    bert = names(tiny_bert.path)
    assert bert.index("int8-dynamic-fused") == bert.index("int8-dynamic") + 1
    assert "int8-dynamic-fused" not in names(mlp_onnx)
    # A torch entry point is judged by the baseline the build exported from it.
    assert "int8-dynamic-fused" in names("model.py:build", tiny_bert.model_path)
    assert "int8-dynamic-fused" not in names("model.py:build", mlp_onnx)
    fused = next(c for c in auto_candidates(parse_recipe({
        "model": str(tiny_bert.model_path), "data": {"eval": "e.npz"}, "budget": {"max_accuracy_drop": 0.01},
    }), "cal.npz") if c.name == "int8-dynamic-fused")  # fmt: skip
    assert fused.passes == ("graph.optimize", {"quantize.dynamic": {"per_channel": True}})
