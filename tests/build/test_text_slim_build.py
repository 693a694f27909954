"""Slimming a transformers text encoder through the real build: a tiny BERT from an entry point, with a label-free
metric (cosine). The slim candidates prune heads and feed-forward neurons, distill from the unpruned model on
unlabeled text, export with a dynamic sequence axis and go through the same fidelity gate as any candidate; a
second build answers them from the pass cache without training. Step counts are tiny: this proves the path, not
the quality (benchmarks/slim_transformers.py and a MiniLM build measure that)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slipstream.artifact import Bundle
from slipstream.build.recipe import Recipe, parse_recipe
from slipstream.build.search import BuildEvent, BuildResult, run_build
from slipstream.build.text_slim import find_tokenizer, not_a_text_encoder
from slipstream.build.torch_source import (
    is_bundle_dir,
    is_model_dir,
    skip_reason,
    source_ladder,
    text_ladder,
    torch_context,
    torch_refusal,
)
from slipstream.data.datasets import load_dataset
from slipstream.errors import ConfigError
from slipstream.runtime import Engine
from tests.build.conftest import HEADS, HIDDEN, LAYERS, TextEncoderSource

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = {"amounts": [0.5], "distill_steps": 4, "texts": 32, "score_texts": 16, "seq_len": 16, "batch_size": 8}


def _recipe(src: TextEncoderSource, out: Path, **extra: Any) -> Recipe:
    return parse_recipe(
        {
            "name": "tiny-bert",
            "model": f"{src.entry}:build",
            "dynamic_axes": ["1=seq"],
            "data": {"eval": str(src.eval_npz)},
            "metric": "cosine",
            "budget": {"max_accuracy_drop": 0.05},
            "batch_size": 16,
            "bench_time_s": 0.1,
            "output": str(out),
            "robustness": {"enabled": False},  # not applicable to token inputs anyway
            **extra,
        }
    )


Builds = tuple[BuildResult, BuildResult, list[str], list[str]]


@pytest.fixture(scope="module")
def slim_builds(text_encoder_source: TextEncoderSource, torch_one_thread: None) -> Builds:
    auto = _recipe(text_encoder_source, text_encoder_source.work / "out", slim=TINY)
    recipe = auto.model_copy(update={"candidates": text_ladder(auto)})  # the auto ladder's slim part only
    said: tuple[list[str], list[str]] = ([], [])

    def hear(into: list[str]) -> Any:
        return lambda event: into.append(event.candidate or "") if isinstance(event, BuildEvent) else None

    first = run_build(recipe, progress=hear(said[0]))
    second = run_build(recipe, progress=hear(said[1]))
    return first, second, said[0], said[1]


def test_slim_candidates_are_pruned_distilled_exported_and_gated(slim_builds: Builds) -> None:
    first, _, said, _ = slim_builds
    record = first.record
    assert [c.name for c in record.candidates] == ["slim-50", "slim-50-int8"]
    decided = {r.name: r.reason for r in record.selection.rejections} if record.selection else {}
    for cand in record.candidates:
        assert cand.status == "ok", cand.error
        assert cand.lineage[:3] == ("prune.structured@1", "train.distill@1", "import.torch@1")
        assert cand.metrics is not None and 0.5 < cand.metrics.quality <= 1.0 + 1e-6  # the cosine to the baseline
        assert record.selection is not None and (record.selection.winner == cand.name or decided[cand.name])
        slimmed, distilled = cand.training
        heads = LAYERS * HEADS
        assert slimmed.metrics["heads_before"] == heads and slimmed.metrics["heads_after"] == heads // 2
        assert f"attention heads {heads} → {heads // 2}" in slimmed.summary
        assert "feed-forward neurons" in slimmed.summary
        assert distilled.metrics["steps"] == 4 and distilled.summary.startswith("distilled 4 steps")
        assert "installed packages" in distilled.summary
    assert record.candidates[1].lineage[-1] == "quantize.dynamic@1"
    assert record.candidates[1].metrics.size_bytes < record.candidates[0].metrics.size_bytes / 2  # type: ignore[union-attr]
    assert "distilled 4 steps" in (first.output / "report.html").read_text()
    assert any(s.startswith("slim-50: training: train.distill, 4 steps") for s in said), said


def test_the_slimmed_bundles_load_and_take_any_sequence_length(
    slim_builds: Builds, text_encoder_source: TextEncoderSource
) -> None:
    first, *_ = slim_builds
    bundle = Bundle.load(first.record.candidate("slim-50-int8").bundle or "")
    assert [s.shape for s in bundle.manifest.inputs] == [("batch", "seq")] * 3
    with np.load(text_encoder_source.eval_npz) as data:
        feeds = {k: data[k][:3, :9] for k in data.files}  # 9 tokens: not the length the model was traced at
    out = Engine(bundle).run(feeds)["last_hidden_state"]
    assert out.shape == (3, 9, HIDDEN) and np.isfinite(out).all()
    Bundle.load(first.output / "winner")


def test_a_second_build_answers_the_slim_candidates_from_the_cache(slim_builds: Builds) -> None:
    first, second, said_first, said_second = slim_builds
    hits = {c.name: c.cache_hits for c in second.record.candidates}
    assert hits == {"slim-50": 3, "slim-50-int8": 4}  # every step, the torch passes included: nothing trained
    assert [c.training for c in second.record.candidates] == [c.training for c in first.record.candidates]
    assert any("training:" in s for s in said_first) and not any("training:" in s for s in said_second)
    assert "slim-50: answered by the pass cache: nothing to train" in said_second


def test_the_auto_ladder_adds_slim_candidates_for_a_text_encoder(
    slim_builds: Builds, text_encoder_source: TextEncoderSource
) -> None:
    first, *_ = slim_builds
    baseline = Bundle.load(first.output / "baseline")
    recipe = _recipe(text_encoder_source, first.output)
    data = load_dataset(recipe.data.eval, baseline.manifest.inputs)
    ctx = torch_context(recipe, baseline, data)
    assert ctx is not None and ctx.text is not None and ctx.text.tokenizer == str(text_encoder_source.model_dir)
    ladder = source_ladder(ctx, recipe, "calibration.npz", label_free=True)
    assert [c.name for c in ladder] == ["slim-25", "slim-25-int8", "slim-50", "slim-50-int8"]
    distill = ladder[0].passes[1]
    assert isinstance(distill, dict) and distill["train.distill"]["steps"] == 100  # modest by default
    assert source_ladder(ctx, recipe, "c.npz", label_free=False) == ()  # labels: no distillation ladder
    off = recipe.model_copy(update={"slim": recipe.slim.model_copy(update={"enabled": False})})
    assert source_ladder(ctx, off, "c.npz", label_free=True) == ()


def test_a_text_encoder_without_a_tokenizer_skips_its_slim_candidates_saying_why(
    slim_builds: Builds, text_encoder_source: TextEncoderSource
) -> None:
    first, *_ = slim_builds
    baseline = Bundle.load(first.output / "baseline")
    recipe = _recipe(text_encoder_source, first.output).model_copy(
        update={"model": f"{text_encoder_source.entry}:untokenized"}
    )
    data = load_dataset(recipe.data.eval, baseline.manifest.inputs)
    ctx = torch_context(recipe, baseline, data)
    assert ctx is not None and ctx.text is not None and ctx.text.tokenizer is None
    why = skip_reason(text_ladder(recipe)[0], ctx)
    assert why is not None and "no tokenizer found" in why and "slim.tokenizer" in why
    given = recipe.model_copy(update={"slim": recipe.slim.model_copy(update={"tokenizer": "/no/such/folder"})})
    ctx = torch_context(given, baseline, data)
    assert ctx is not None and ctx.text is not None and "could not be loaded" in (ctx.text.no_tokenizer or "")


def test_a_bundle_as_the_model_and_a_non_text_multi_input_source_are_refused_clearly(
    slim_builds: Builds, text_encoder_source: TextEncoderSource
) -> None:
    first, *_ = slim_builds
    baseline = Bundle.load(first.output / "baseline")
    slim = text_ladder(_recipe(text_encoder_source, first.output))[0]
    data = load_dataset(str(text_encoder_source.eval_npz), baseline.manifest.inputs)
    as_bundle = _recipe(text_encoder_source, first.output).model_copy(update={"model": str(baseline.path)})
    assert torch_context(as_bundle, baseline, data) is None
    error = torch_refusal(slim, as_bundle, baseline)
    assert "is a bundle (ONNX)" in error.message and str(text_encoder_source.entry) in error.message
    assert error.hint is not None and "FILE.py:FACTORY" in error.hint
    not_bert = as_bundle.model_copy(update={"model": f"{text_encoder_source.entry}:not_bert"})
    assert torch_context(not_bert, baseline, data) is None
    error = torch_refusal(slim, not_bert, baseline)
    assert "no BERT-family encoder layer" in error.message and error.hint is not None
    assert "inputs ['x', 'y']" in not_a_text_encoder(("x", "y"), has_layers=None).message


def test_a_transformers_model_folder_is_a_source_not_a_bundle(
    slim_builds: Builds, text_encoder_source: TextEncoderSource
) -> None:
    first, *_ = slim_builds
    baseline = Bundle.load(first.output / "baseline")
    folder = str(text_encoder_source.model_dir)
    assert is_model_dir(folder) and not is_bundle_dir(folder) and is_bundle_dir(str(baseline.path))
    recipe = _recipe(text_encoder_source, first.output).model_copy(update={"model": folder})
    ctx = torch_context(recipe, baseline, load_dataset(recipe.data.eval, baseline.manifest.inputs))
    assert ctx is not None and ctx.text is not None and ctx.text.tokenizer == folder
    assert type(ctx.model.module).__name__ == "BertModel"


def test_a_tokenizer_of_another_model_and_a_misspelt_slim_field_are_refused(
    text_encoder_source: TextEncoderSource,
) -> None:
    from transformers import BertConfig, BertModel

    small = BertModel(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16))  # fmt: skip
    path, why = find_tokenizer(small, str(text_encoder_source.model_dir))
    assert path is None and why is not None and "the model embeds only 100" in why and "slim.tokenizer" in why
    with pytest.raises(ConfigError, match=r"unknown field 'slim.distil_steps' \(did you mean 'distill_steps'\?\)"):
        _recipe(text_encoder_source, text_encoder_source.work / "never", slim={"distil_steps": 3})
