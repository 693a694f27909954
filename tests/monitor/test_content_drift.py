"""Content drift end to end: the profile keeps reference samples of the model's probabilities and embedding,
and the monitor tests its window against them (output shift, embedding MMD), with real onnxruntime sessions."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slipstream.artifact import Bundle
from slipstream.importers import import_onnx
from slipstream.monitor import Monitor, MonitorConfig, Profile, load_profile, write_profiled_bundle
from slipstream.monitor.content import EMBEDDING_OUTPUT, ContentReference, EncodedArray
from slipstream.monitor.profile import ProfileConfig, build_profile, profile_from_bundle
from slipstream.monitor.snapshot import MonitorSnapshot
from slipstream.runtime.engine import Engine
from tests.monitor.conftest import Digits
from tests.onnx_models import digits_mlp_graph


def _serve(monitor: Monitor, engine: Engine, x: np.ndarray, name: str = "pixels", prefix: str = "r") -> None:
    """One request per row through the real session, observed as a server does."""
    for i in range(len(x)):
        row = {name: x[i : i + 1]}
        monitor.observe(f"{prefix}{i}", row, engine.run(row), latency_s=0.001)


def _monitor(profile: Profile, window_rows: int = 300) -> Monitor:
    return Monitor(model="m", version="1", profile=profile, store=None, config=MonitorConfig(window_rows=window_rows))


def _firing(snap: MonitorSnapshot) -> set[str]:
    return {a.rule for a in snap.alerts if a.state == "firing"}


# -- the profile ----------------------------------------------------------------------------------


def test_profile_keeps_the_probabilities_and_round_trips_through_a_bundle(
    digits_profile: Profile, digits_engine: Engine, digits: Digits, digits_bundle: Path, tmp_path: Path
) -> None:
    content = digits_profile.content
    assert content is not None and content.rows == len(digits.x_ref)  # 600 rows < the 1,000-row cap: all kept
    probs = content.probabilities
    assert probs is not None and probs.output == "probabilities" and probs.source == "probabilities"
    sample = probs.values.decode()
    expected = np.asarray(digits_engine.run({"pixels": digits.x_ref})["probabilities"])
    np.testing.assert_array_equal(sample, expected)  # float32: stored exactly
    # A logistic regression has no penultimate layer exposed: the embedding test is off, and says why.
    assert content.embedding is None and any("slipstream.embedding" in n for n in content.notes)

    out = write_profiled_bundle(digits_bundle, tmp_path / "profiled", digits_profile)
    Bundle.load(out)  # hash-verified, profile.json included
    loaded = load_profile(out)
    assert loaded == digits_profile


def test_sample_is_capped_seeded_and_logits_become_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2500, 4)).astype(np.float32)
    x = rng.normal(0, 1, (2500, 3)).astype(np.float32)
    cfg = ProfileConfig(task="classification", content_sample_rows=1000)
    a = build_profile({"x": x}, {"logits": logits}, config=cfg)
    b = build_profile({"x": x}, {"logits": logits}, config=cfg)
    assert a.content is not None and b.content is not None and a.content.probabilities is not None
    assert a.content.rows == 1000 and a.content.probabilities.source == "softmax_of_logits"
    p = a.content.probabilities.values.decode()
    assert p.shape == (1000, 4) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert a.content == b.content
    none = build_profile({"x": x}, {"logits": logits}, config=cfg.model_copy(update={"content_sample_rows": 0}))
    assert none.content is None


def test_an_old_profile_without_samples_loads_and_the_tests_say_why_they_are_off(
    digits_profile: Profile, digits_engine: Engine, digits: Digits
) -> None:
    raw = json.loads(digits_profile.to_json_bytes())
    del raw["content"]
    raw["schema_version"] = 1
    old = Profile.from_json_bytes(json.dumps(raw).encode())
    assert old.content is None
    monitor = _monitor(old)
    _serve(monitor, digits_engine, digits.x_live[:100])
    snap = monitor.evaluate()
    assert snap.drift is not None and snap.drift.judged
    assert snap.drift.output_shift is None and snap.drift.embedding_shift is None
    assert any("rebuild" in n for n in snap.drift.content_notes)
    assert snap.metrics["drift.output_shift"] is None and snap.metrics["drift.embedding_shift"] is None
    monitor.close()


def test_a_damaged_sample_is_refused_with_the_sizes() -> None:
    good = EncodedArray.encode(np.ones((3, 2), dtype=np.float32), "float32")
    bad = good.model_copy(update={"shape": (4, 2)})
    from slipstream.errors import SchemaError

    with pytest.raises(SchemaError, match=r"shape \[4, 2\].*holds 24 bytes; expected 32"):
        bad.decode()


# -- the monitor: output shift on a classifier ----------------------------------------------------


def _flip(x: np.ndarray) -> np.ndarray:
    """Digits mirrored left-right: the same pixel values, so per-pixel means barely move for symmetric digits."""
    return np.ascontiguousarray(x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64))


def test_monitor_flags_output_shift_on_a_shifted_window_and_not_on_an_in_distribution_one(
    digits_profile: Profile, digits_engine: Engine, digits: Digits
) -> None:
    clean = _monitor(digits_profile)
    _serve(clean, digits_engine, digits.x_live[:300])
    snap = clean.evaluate()
    assert snap.drift is not None
    r = snap.drift.output_shift
    assert r is not None and r.judged and not r.drifted and r.rows == 300
    assert r.p_value >= 0.01 and r.alpha == 0.01
    assert snap.metrics["drift.output_shift"] == 0.0 and snap.metrics["drift.output_shift.p_value"] == r.p_value
    assert "output_shift" not in _firing(snap)
    clean.close()

    # Class-prior shift: only digits 0-4 arrive; the inputs are ordinary digits, the predicted mix is not.
    low = digits.x_live[digits.y_live < 5][:300]
    shifted = _monitor(digits_profile)
    _serve(shifted, digits_engine, low)
    snap = shifted.evaluate()
    assert snap.drift is not None and snap.drift.output_shift is not None
    assert snap.drift.output_shift.drifted and snap.drift.output_shift.p_value < 1e-6
    assert snap.metrics["drift.output_shift"] == 1.0 and "output_shift" in _firing(snap)
    shifted.close()

    flipped = _monitor(digits_profile)
    _serve(flipped, digits_engine, _flip(digits.x_live[:300]))
    snap = flipped.evaluate()
    assert snap.drift is not None and snap.drift.output_shift is not None and snap.drift.output_shift.drifted
    flipped.close()


def test_a_small_window_is_not_judged(digits_profile: Profile, digits_engine: Engine, digits: Digits) -> None:
    monitor = _monitor(digits_profile)
    _serve(monitor, digits_engine, digits.x_live[:5])
    snap = monitor.evaluate()
    assert snap.drift is not None and snap.drift.output_shift is not None
    assert not snap.drift.output_shift.judged and not snap.drift.output_shift.drifted
    assert snap.metrics["drift.output_shift"] is None
    monitor.close()


# -- the monitor: MMD on an embedding model -------------------------------------------------------


def _bag_of_tokens_encoder(vocab: int = 40, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """A text encoder in miniature: token ids → embedding table (Gather) → mean over the sequence → tanh.

    Its output is a float vector, neither probabilities nor logits: the profile treats it as an embedding."""
    table = np.random.default_rng(seed).normal(0, 1, (vocab, width)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"], axis=0),
        helper.make_node("ReduceMean", ["tokens", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Tanh", ["pooled"], ["sentence_vector"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bag_of_tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 8])],
        [helper.make_tensor_value_info("sentence_vector", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _sentences(rng: np.random.Generator, rows: int, topic: str) -> np.ndarray:
    """Token ids over the whole vocabulary either way (their marginal barely moves); topic 'b' favours a
    different half of it, as another subject would."""
    if topic == "a":
        return rng.integers(0, 40, (rows, 8)).astype(np.int64)
    p = np.where(np.arange(40) % 2 == 0, 1.6, 0.4)
    return rng.choice(40, size=(rows, 8), p=p / p.sum()).astype(np.int64)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Profile]:
    root = tmp_path_factory.mktemp("encoder")
    onnx.save_model(_bag_of_tokens_encoder(), str(root / "encoder.onnx"))
    bundle = import_onnx(root / "encoder.onnx", root / "bundle").path
    ref = _sentences(np.random.default_rng(1), 800, "a")
    return Engine(Bundle.load(bundle)), profile_from_bundle(bundle, {"input_ids": ref})


def test_the_profile_of_an_embedding_model_keeps_its_output_as_the_embedding(
    encoder: tuple[Engine, Profile],
) -> None:
    _, profile = encoder
    assert profile.content is not None and profile.content.probabilities is None
    emb = profile.content.embedding
    assert emb is not None and emb.output == "sentence_vector" and emb.source == "embedding_output"
    assert emb.values.dtype == "float16" and emb.values.shape == (800, 16)


def test_monitor_flags_an_embedding_shift_and_not_the_same_topic(encoder: tuple[Engine, Profile]) -> None:
    engine, profile = encoder
    rng = np.random.default_rng(2)
    same = _monitor(profile)
    _serve(same, engine, _sentences(rng, 300, "a"), name="input_ids")
    snap = same.evaluate()
    assert snap.drift is not None and snap.drift.output_shift is None
    r = snap.drift.embedding_shift
    assert r is not None and r.test == "mmd" and r.judged and not r.drifted
    assert snap.metrics["drift.embedding_shift"] == 0.0 and "embedding_drift" not in _firing(snap)
    same.close()

    other = _monitor(profile)
    _serve(other, engine, _sentences(rng, 300, "b"), name="input_ids")
    snap = other.evaluate()
    assert snap.drift is not None and snap.drift.embedding_shift is not None
    assert snap.drift.embedding_shift.drifted and snap.metrics["drift.embedding_shift"] == 1.0
    assert "embedding_drift" in _firing(snap)
    other.close()


def test_a_penultimate_output_is_picked_as_the_embedding_of_a_classifier() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 50).astype(np.float32)
    hidden = rng.normal(0, 1, (50, 12)).astype(np.float32)
    x = rng.normal(0, 1, (50, 4)).astype(np.float32)
    profile = build_profile({"x": x}, {"probabilities": probs, EMBEDDING_OUTPUT: hidden})
    content = profile.content
    assert isinstance(content, ContentReference) and content.probabilities is not None
    assert content.embedding is not None and content.embedding.source == "penultimate"
    assert profile.prediction is not None and profile.prediction.output == "probabilities"


# -- a classifier's penultimate activations as a monitoring-only output ---------------------------


def _digits_mlp(digits: Digits, hidden: int = 64) -> onnx.ModelProto:
    """A real two-layer classifier in well under a second: random ReLU features of the pixels (fc0), and a
    softmax regression on them trained by numpy gradient descent (fc1). Gemm → Relu → Gemm → Softmax."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 1 / 8, (64, hidden)).astype(np.float32) / 16.0  # the model takes raw pixels (0..16)
    b0 = rng.normal(0, 0.1, hidden).astype(np.float32)
    h = np.maximum(digits.x_train @ w0 + b0, 0).astype(np.float64)
    onehot, w1, b1 = np.eye(10)[digits.y_train], np.zeros((hidden, 10)), np.zeros(10)
    for _ in range(300):
        z = h @ w1 + b1
        p = np.exp(z - z.max(axis=1, keepdims=True))
        grad = (p / p.sum(axis=1, keepdims=True) - onehot) / len(h)
        w1 -= 0.5 * (h.T @ grad + 1e-3 * w1)
        b1 -= 0.5 * grad.sum(axis=0)
    return digits_mlp_graph(w0, b0, w1, b1, ir_version=9)


@dataclass(frozen=True)
class Mlp:
    model: onnx.ModelProto
    bare: Path
    exposed: Path
    profiled: Path  # exposed + its profile, in a serving repository (repo/digits/1)


@pytest.fixture(scope="module")
def mlp(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Mlp:
    from slipstream.monitor.penultimate import with_embedding_output

    model = _digits_mlp(digits)
    root = tmp_path_factory.mktemp("mlp")
    onnx.save_model(model, str(root / "mlp.onnx"))
    bare = import_onnx(root / "mlp.onnx", root / "bare", name="digits", version="1").path
    exposed = with_embedding_output(bare, root / "exposed")
    assert exposed is not None
    profile = profile_from_bundle(exposed, {"pixels": digits.x_ref}, digits.y_ref)
    profiled = write_profiled_bundle(exposed, root / "repo" / "digits" / "1", profile)
    return Mlp(model, bare, exposed, profiled)


def test_the_head_input_becomes_a_monitoring_only_output(mlp: Mlp, digits: Digits) -> None:
    from slipstream.artifact.manifest import MONITORING_OUTPUTS
    from slipstream.monitor.penultimate import EMBEDDING_STEP, with_embedding_output

    bare, exposed, model, x_test = mlp.bare, mlp.exposed, mlp.model, digits.x_ref
    b = Bundle.load(exposed)  # hash-verified
    assert [s.name for s in b.manifest.outputs] == ["probabilities"]  # what clients see is unchanged
    assert b.manifest.resolved[MONITORING_OUTPUTS] == {EMBEDDING_OUTPUT: "input 'h_relu' of fc1 (64 values per row)"}
    assert b.manifest.lineage[-1].step == EMBEDDING_STEP
    engine = Engine(b)
    assert engine.monitoring_outputs == (EMBEDDING_OUTPUT,)
    assert list(engine.run({"pixels": x_test[:3]})) == ["probabilities"]  # not fetched unless asked for
    both = engine.run({"pixels": x_test[:3]}, ["probabilities", EMBEDDING_OUTPUT])
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(
        both[EMBEDDING_OUTPUT], np.maximum(x_test[:3] @ w["fc0.weight"] + w["fc0.bias"], 0), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(
        both["probabilities"], Engine(Bundle.load(bare)).run({"pixels": x_test[:3]})["probabilities"]
    )
    assert Engine(Bundle.load(bare)).monitoring_outputs == ()
    assert with_embedding_output(exposed, exposed.parent / "again") is None  # already there: nothing written


def test_a_model_without_a_classifier_head_gets_no_embedding_output(tmp_path: Path) -> None:
    from slipstream.monitor.penultimate import find_head_input, with_embedding_output

    model = _bag_of_tokens_encoder()
    assert find_head_input(model) is None
    onnx.save_model(model, str(tmp_path / "enc.onnx"))
    bundle = import_onnx(tmp_path / "enc.onnx", tmp_path / "bundle").path
    assert with_embedding_output(bundle, tmp_path / "out") is None and not (tmp_path / "out").exists()


def test_the_profile_of_an_exposed_classifier_samples_the_penultimate_layer(mlp: Mlp, digits: Digits) -> None:
    profile = load_profile(mlp.profiled)
    assert profile is not None
    assert profile.content is not None and profile.content.probabilities is not None
    emb = profile.content.embedding
    assert emb is not None and emb.source == "penultimate" and emb.values.shape == (len(digits.x_ref), 64)
    # Neither a prediction nor a per-value drift feature: only the MMD test reads it.
    assert [t.name for t in profile.outputs] == ["probabilities"]
    assert profile.prediction is not None and profile.prediction.output == "probabilities"


def test_the_embedding_test_runs_in_process_on_the_penultimate_layer(mlp: Mlp, digits: Digits) -> None:
    profile = load_profile(mlp.profiled)
    assert profile is not None
    engine = Engine(Bundle.load(mlp.profiled))
    fetch = ["probabilities", *engine.monitoring_outputs]
    for x, drifted in ((digits.x_live[:300], False), (_flip(digits.x_live[:300]), True)):
        monitor = _monitor(profile)
        for i in range(len(x)):
            monitor.observe(f"r{i}", {"pixels": x[i : i + 1]}, engine.run({"pixels": x[i : i + 1]}, fetch), latency_s=0)
        snap = monitor.evaluate()
        assert snap.drift is not None and snap.drift.embedding_shift is not None
        assert snap.drift.embedding_shift.judged and snap.drift.embedding_shift.drifted is drifted
        assert snap.drift.drifted_outputs == [] or drifted  # the embedding is never a per-value drift feature
        monitor.close()


# -- a served model ---------------------------------------------------------------------------------


def test_a_served_classifier_reports_both_tests_and_never_shows_the_embedding(
    mlp: Mlp, digits: Digits, tmp_path: Path
) -> None:
    """Through the real server and its monitor process."""
    import httpx

    from slipstream.monitor.config import MonitorConfig
    from slipstream.monitor.store import StoreConfig
    from slipstream.serve.guard import hash_key
    from slipstream.serve.settings import GuardSettings, MonitorServing, ServeSettings
    from tests.serve_support import API_KEY, ServerThread

    settings = ServeSettings(
        port=0,
        access_log=False,
        guard=GuardSettings(api_key_hashes=frozenset({hash_key(API_KEY)})),
        monitor=MonitorServing(
            store=StoreConfig(path=tmp_path / "monitor.db"),
            config=MonitorConfig(evaluate_interval_s=3600, window_rows=200),
        ),
    )

    def infer(client: httpx.Client, row: np.ndarray, rid: str, outputs: list[str] | None = None) -> httpx.Response:
        body: dict[str, object] = {
            "id": rid,
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}],
        }
        if outputs is not None:
            body["outputs"] = [{"name": n} for n in outputs]
        return client.post("/v2/models/digits/infer", json=body)

    def send(client: httpx.Client, rows: np.ndarray, prefix: str) -> None:
        for i, row in enumerate(rows):
            r = infer(client, row, f"{prefix}{i}")
            assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["probabilities"]

    def evaluate(client: httpx.Client) -> dict[str, Any]:
        r = client.get("/v2/models/digits/monitoring", params={"evaluate": "true"})
        assert r.status_code == 200
        doc: dict[str, Any] = r.json()
        return doc

    repo = mlp.profiled.parent.parent
    with (
        ServerThread(repo, settings) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client,
    ):
        meta = client.get("/v2/models/digits").json()
        assert [o["name"] for o in meta["outputs"]] == ["probabilities"]
        asked = infer(client, digits.x_live[0], "asks-for-it", [EMBEDDING_OUTPUT])
        assert asked.status_code == 400 and EMBEDDING_OUTPUT in asked.text

        send(client, digits.x_live[:200], "clean-")
        drift = evaluate(client)["drift"]
        out, emb = drift["output_shift"], drift["embedding_shift"]
        assert out["test"] == "output_ks" and out["judged"] and not out["drifted"] and out["rows"] == 200
        assert emb["test"] == "mmd" and emb["judged"] and not emb["drifted"] and emb["rows"] == 200

        send(client, _flip(digits.x_live[:200]), "flipped-")
        shifted = evaluate(client)
        assert shifted["drift"]["output_shift"]["drifted"] and shifted["drift"]["embedding_shift"]["drifted"]
        firing = {a["rule"] for a in shifted["alerts"] if a["state"] == "firing"}
        assert {"output_shift", "embedding_drift"} <= firing
        text = client.get("/metrics").text
        assert 'slipstream_monitor_value{metric="drift.embedding_shift",model="digits",version="1"} 1.0' in text
        shown = _dashboard_drift_text(f"{server.url}/dashboard#key={API_KEY}")
        assert "output shift: ks(" in shown and "embedding shift: mmd(" in shown and shown.count("drifted") >= 2
    # The prediction log keeps what clients saw, not the embedding.
    from slipstream.monitor.logfile import read_records

    records = read_records(tmp_path / "monitor.db")
    assert len(records) == 400 and all(list(r.outputs) == ["probabilities"] for r in records)


def _dashboard_drift_text(url: str) -> str:
    """The dashboard's drift section as headless Chromium renders it (after two polls)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM_ARGS, chromium_path

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#loaded[data-polls='2']")
            return str(page.inner_text("#drift"))
        finally:
            browser.close()


# -- shown to a person ------------------------------------------------------------------------------


def test_the_report_shows_both_tests_with_method_p_value_and_verdict(
    digits_profile: Profile, digits_engine: Engine, digits: Digits, tmp_path: Path
) -> None:
    from slipstream.monitor.report import render_html, summarize
    from slipstream.monitor.store import SQLiteStore, StoreConfig

    store = SQLiteStore(StoreConfig(path=tmp_path / "m.db"))
    monitor = Monitor(model="digits", version="1", profile=digits_profile, store=store)
    _serve(monitor, digits_engine, _flip(digits.x_live[:200]))
    store.flush()
    snap = monitor.evaluate()
    monitor.close()
    assert snap.drift is not None and snap.drift.output_shift is not None
    html = render_html(summarize(tmp_path / "m.db"))
    row = re.search(r"<tr><td>Output shift</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", html)
    assert row is not None and row.groups() == (
        snap.drift.output_shift.method,
        f"{snap.drift.output_shift.p_value:.3g}",
        "drifted",
    )
    assert "<tr><td>Embedding shift</td><td>off</td>" in html and "slipstream.embedding" in html


def test_a_pass_on_an_exposed_bundle_keeps_the_embedding_hidden(mlp: Mlp, digits: Digits, tmp_path: Path) -> None:
    """An optimization after the build's package step must not turn the monitor's output into a client one."""
    from slipstream.artifact.manifest import MONITORING_OUTPUTS
    from slipstream.passes.recipe import optimize

    out = optimize(Bundle.load(mlp.exposed), ["graph.optimize"], tmp_path / "optimized")
    assert [s.name for s in out.manifest.outputs] == ["probabilities"]
    assert EMBEDDING_OUTPUT in out.manifest.resolved[MONITORING_OUTPUTS]  # type: ignore[operator]
    engine = Engine(out)
    assert engine.monitoring_outputs == (EMBEDDING_OUTPUT,)
    assert list(engine.run({"pixels": digits.x_ref[:2]})) == ["probabilities"]
