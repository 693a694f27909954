"""Issue 19's zoo: every entry converts with parity, benches, goes through quantize.dynamic (or says why it
leaves the model as it is), and is served and answered over HTTP the way its own framework answers.

An entry that today's importers cannot convert yet is a strict xfail naming what is missing: it turns red the
day it starts passing, and then its mark must go.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest

from slipstream.evaluate import BenchSettings, bench
from slipstream.runtime.engine import Engine
from tests.zoo.base import NOTHING_TO_QUANTIZE
from tests.zoo.conftest import Zoo
from tests.zoo.harness import ask, check_answer, client_feeds, fidelity, integer_ops, oip_input, quantize_entry
from tests.zoo.models import ZOO

# Converting builds real exports and one test starts a real server: slow as a whole, fast per test after that.
pytestmark = pytest.mark.slow

# Entries whose support has not landed, and the exact error today: "name" marks all four tests of an entry
# (its conversion fails); "check:name" one of them (check: convert, bench, quantize, served).
PENDING: dict[str, str] = {}


def entries(check: str) -> list[object]:
    params: list[object] = []
    for e in ZOO:
        reason = PENDING.get(e.name) or PENDING.get(f"{check}:{e.name}")
        params.append(pytest.param(e.name, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else e.name)
    return params


def test_the_zoo_has_what_issue_19_asks_for() -> None:
    frameworks = {e.framework for e in ZOO}
    assert len(ZOO) >= 24
    assert {"torch", "transformers", "keras", "tflite", "sklearn", "lightgbm", "xgboost", "catboost"} <= frameworks
    names = {e.name for e in ZOO}
    assert {"torch-resnet", "torch-vit", "torch-lstm", "torch-gru", "gpt2-decoder", "bert-classifier"} <= names
    assert {"tflite-float", "tflite-int8", "df-logistic", "df-hist-gboost", "sk-isolation-forest"} <= names
    assert len(names) == len(ZOO)


@pytest.mark.parametrize("name", entries("convert"))
def test_converts_with_parity(zoo: Zoo, name: str) -> None:
    converted = zoo.get(name)
    manifest = converted.bundle.manifest
    assert manifest.name == name and manifest.parity is not None and manifest.parity.informative
    assert converted.parity_max_error <= converted.built.atol


@pytest.mark.parametrize("name", entries("bench"))
def test_benches(zoo: Zoo, name: str) -> None:
    converted = zoo.get(name)
    request = converted.built.request
    batch = len(next(iter(request.values())))
    settings = BenchSettings(
        batch_sizes=(batch,), warmup_runs=1, round_runs=3, max_rounds=1, min_time_s=0, max_time_s=0.2
    )
    report = bench(lambda: Engine(converted.bundle), settings, feeds={batch: request})
    (result,) = report.results
    assert result.batch == batch and result.runs >= 3 and 0 < result.p50_ms <= result.p99_ms


@pytest.mark.parametrize("name", entries("quantize"))
def test_quantize_dynamic_quantizes_or_says_why_not(zoo: Zoo, name: str, tmp_path: Path) -> None:
    converted = zoo.get(name)
    quantized, _ = quantize_entry(converted, tmp_path / "int8")
    ops = integer_ops(quantized)
    if converted.entry.quantize == NOTHING_TO_QUANTIZE:
        assert ops == {}
    else:
        assert ops, f"{name}: quantize.dynamic put no integer operator in the graph"
    measured = fidelity(quantized)
    if isinstance(measured, str):  # the pass generates its fidelity inputs, and cannot make up strings
        assert any(s.dtype == "string" for s in converted.bundle.manifest.inputs)
        assert "Cannot generate example data for input" in measured and "of type string" in measured
    else:
        assert set(measured) == {o.name for o in converted.bundle.manifest.outputs}


@pytest.mark.parametrize("name", entries("served"))
def test_served_over_http_as_the_framework_answers(zoo: Zoo, zoo_client: httpx.Client, name: str) -> None:
    converted = zoo.get(name)
    served = ask(zoo_client, converted)
    assert np.isfinite(check_answer(converted, served))


def test_an_int8_tflite_input_records_the_scale_and_zero_point_a_client_needs(zoo: Zoo) -> None:
    """The tflite-int8-io request was quantized with the interpreter's own scale and zero point; the bundle
    must carry the same two numbers, or a client of the served model could not build that request."""
    import tensorflow as tf

    converted = zoo.get("tflite-int8-io")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf.lite.Interpreter's move to ai_edge_litert
        (details,) = tf.lite.Interpreter(model_path=str(converted.built.source)).get_input_details()
    (spec,) = converted.bundle.manifest.inputs
    assert spec.dtype == "int8" and spec.quantization is not None
    assert (spec.quantization.scale, spec.quantization.zero_point) == pytest.approx(details["quantization"])


def test_every_pending_mark_names_a_zoo_entry_and_a_check() -> None:
    names = {e.name for e in ZOO}
    for key in PENDING:
        check, _, name = key.rpartition(":")
        assert name in names and check in ("", "convert", "bench", "quantize", "served"), key


@pytest.mark.parametrize("name", ["bert-classifier", "gpt2-decoder", "gpt2-directory"])
def test_a_token_id_outside_the_vocabulary_gets_a_400_naming_the_range(
    zoo: Zoo, zoo_client: httpx.Client, name: str
) -> None:
    converted = zoo.get(name)
    spec = next(s for s in converted.bundle.manifest.inputs if s.name == "input_ids")
    assert spec.value_range is not None
    low, high = (int(v) for v in spec.value_range)
    assert (low, high) == (0, 127)  # the tiny configs' vocab_size is 128
    feeds = client_feeds(converted)
    feeds["input_ids"] = feeds["input_ids"].copy()
    feeds["input_ids"][0, 0] = high + 1
    reply = zoo_client.post(f"/v2/models/{name}/infer", json={"inputs": [oip_input(k, v) for k, v in feeds.items()]})
    assert reply.status_code == 400 and str(high) in reply.json()["error"], reply.text


@pytest.mark.parametrize("name", ["bert-classifier", "gpt2-decoder", "gpt2-directory"])
def test_a_sequence_longer_than_the_position_table_gets_a_400_naming_the_limit(
    zoo: Zoo, zoo_client: httpx.Client, name: str
) -> None:
    converted = zoo.get(name)
    spec = next(s for s in converted.bundle.manifest.inputs if s.name == "input_ids")
    assert spec.max_shape is not None and spec.max_shape[1] == 64  # the tiny configs' 64 positions
    feeds = {k: np.concatenate([v] * 6, axis=1)[:, :65] for k, v in client_feeds(converted).items()}
    reply = zoo_client.post(f"/v2/models/{name}/infer", json={"inputs": [oip_input(k, v) for k, v in feeds.items()]})
    assert reply.status_code == 400 and "64" in reply.json()["error"], reply.text
