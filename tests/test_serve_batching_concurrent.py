"""Several batches in flight at once, on an engine that runs them in parallel: OpenVINO on two streams.

The model is real and slow enough (three 768-wide layers) that batches overlap; a second input, ``code``,
makes the model call fail for a whole batch when any of its rows says BAD (a length-3 range broadcast against
a length-4 constant fails in OpenVINO and onnxruntime alike), so one caller's bad values fail a real call.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slipstream.artifact import Bundle
from slipstream.artifact.bundle import write_bundle
from slipstream.errors import EngineError, ServerBusyError
from slipstream.importers import import_onnx
from slipstream.passes import load_pass, lookup
from slipstream.runtime import Engine, Target, open_engine
from slipstream.runtime.openvino_engine import OpenVinoEngine
from slipstream.serve.batching import Batcher
from slipstream.serve.settings import BatchSettings, ServeSettings
from tests.serve_support import ServerThread

WIDTH, FEATURES = 768, 16
BAD = 77_777  # a code that fails its batch's model call (generated data never sends it)
Feeds = dict[str, np.ndarray]


def checked_mlp() -> onnx.ModelProto:
    """x [batch, 16] → three ReLU layers of 768 → y [batch, 4] (+4), and the batch's check on ``code``."""
    rng = np.random.default_rng(5)
    sizes = (FEATURES, WIDTH, WIDTH, WIDTH, 4)
    inits, nodes, h = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]))
        h = f"m{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    inits += [
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(2, dtype=np.int64), "two"),
        numpy_helper.from_array(np.array(BAD, dtype=np.int64), "bad"),
        numpy_helper.from_array(np.ones(4, dtype=np.float32), "four"),
    ]
    nodes += [
        helper.make_node("ReduceMax", ["code"], ["top"], keepdims=0),
        helper.make_node("Equal", ["top", "bad"], ["is_bad"]),
        helper.make_node("Cast", ["is_bad"], ["bad01"], to=TensorProto.INT64),
        helper.make_node("Mul", ["bad01", "two"], ["extra"]),
        helper.make_node("Add", ["extra", "one"], ["length"]),  # 1, or 3 when some row's code is BAD
        helper.make_node("Range", ["zero", "length", "one"], ["span"]),
        helper.make_node("Cast", ["span"], ["spanf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["spanf", "four"], ["checked"]),  # length 3 against 4: the call fails
        helper.make_node("ReduceSum", ["checked"], ["total"], keepdims=1),
        helper.make_node("Add", [h, "total"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "checked_mlp",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES]),
            helper.make_tensor_value_info("code", TensorProto.INT64, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def two_stream_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The model as an OpenVINO f32 bundle whose session asks for two streams on the two threads."""
    work = tmp_path_factory.mktemp("two-streams")
    onnx.save_model(checked_mlp(), str(work / "checked.onnx"))
    base = import_onnx(work / "checked.onnx", work / "base", name="checked")
    step = load_pass(lookup("engine.openvino"))
    ov = step.run(base, work / "openvino", step.make_config({"precision": "f32"})).bundle
    session = {"intra_op_threads": 2, "inter_op_threads": 2}
    manifest = ov.manifest.model_copy(update={"resolved": {**ov.manifest.resolved, "session": session}})
    return write_bundle(work / "repo" / "checked" / "1", ov.load_model(), manifest)


def rows(seed: int, n: int, code: int = 1) -> Feeds:
    x = np.random.default_rng(seed).standard_normal((n, FEATURES)).astype(np.float32)
    return {"x": x, "code": np.full((n, 1), code, dtype=np.int64)}


class Probe:
    """The engine's own run, counting how many calls are inside it at once (measured, not the batcher's word)."""

    def __init__(self, run: Callable[[Feeds], Feeds]) -> None:
        self._run, self._lock = run, threading.Lock()
        self.inside = self.peak = self.calls = 0

    def __call__(self, feeds: Feeds) -> Feeds:
        with self._lock:
            self.inside += 1
            self.calls += 1
            self.peak = max(self.peak, self.inside)
        try:
            return self._run(feeds)
        finally:
            with self._lock:
                self.inside -= 1


def test_after_a_failed_call_the_openvino_engine_still_answers_good_calls(two_stream_bundle: Bundle) -> None:
    """OpenVINO 2026.4 leaves a compiled model failing every later call after one fails: the engine recompiles."""
    engine = open_engine(two_stream_bundle, Target(intra_op_threads=2))
    good = rows(1, 3)
    want = engine.run(good)["y"]
    with pytest.raises(EngineError, match="OpenVINO failed"):
        engine.run(rows(2, 2, code=BAD))
    np.testing.assert_allclose(engine.run(good)["y"], want, rtol=1e-6)
    assert engine.recompiles == 2  # after the failure, and after the same call failed on the fresh one


def test_two_streams_keep_two_batches_in_flight_with_each_callers_own_rows(two_stream_bundle: Bundle) -> None:
    engine = open_engine(two_stream_bundle, Target(intra_op_threads=2))
    assert isinstance(engine, OpenVinoEngine) and engine.parallel_requests == 2
    assert Engine(two_stream_bundle, Target(intra_op_threads=1)).parallel_requests == 1  # onnxruntime: one at a time
    probe = Probe(lambda feeds: engine.run(feeds, check=False))
    requests = [rows(i, 1 + i % 4, code=BAD if i in (7, 23) else 1) for i in range(40)]

    async def main() -> tuple[list[object], Batcher]:
        batcher = Batcher(probe, BatchSettings(max_batch_size=8), batchable=True, parallel=engine.parallel_requests)
        batcher.start()

        async def call(feeds: Feeds) -> object:
            try:
                with batcher.slot() as slot:
                    await asyncio.sleep(0)  # all 40 arrive before any joins: several full batches at once
                    return (await slot.infer(feeds, len(feeds["x"]), "k"))[0]["y"]
            except EngineError as exc:
                return exc

        try:
            return await asyncio.gather(*(call(f) for f in requests)), batcher
        finally:
            await batcher.stop()

    answers, batcher = asyncio.run(main())
    assert batcher.peak_in_flight == probe.peak == 2  # two batches really ran at once, never three
    assert batcher.in_flight == 0
    for i, (feeds, got) in enumerate(zip(requests, answers, strict=True)):
        if i in (7, 23):  # the bad callers alone get the model's error
            assert isinstance(got, EngineError) and "OpenVINO failed" in str(got)
            continue
        assert isinstance(got, np.ndarray), f"caller {i}: {got!r}"
        want = engine.run(feeds)["y"]  # the same rows run alone, one call at a time
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Each failed batch (8 rows each, so two of them) was re-run caller by caller.
    assert probe.calls > -(-sum(len(f["x"]) for f in requests) // 8)


def test_stopping_answers_the_callers_of_batches_still_running(two_stream_bundle: Bundle) -> None:
    engine = open_engine(two_stream_bundle, Target(intra_op_threads=2))
    started = threading.Event()

    def slow(feeds: Feeds) -> Feeds:
        started.set()
        out = engine.run(feeds, check=False)
        threading.Event().wait(0.3)  # a call that is still running when the server stops
        return out

    async def main() -> list[object]:
        batcher = Batcher(slow, BatchSettings(max_batch_size=1), batchable=True, parallel=2)
        batcher.start()

        async def call(seed: int) -> object:
            try:
                with batcher.slot() as slot:
                    return (await slot.infer(rows(seed, 1), 1, "k"))[0]
            except ServerBusyError as exc:
                return exc

        calls = [asyncio.ensure_future(call(s)) for s in range(2)]
        while not started.is_set() or batcher.in_flight < 2:
            await asyncio.sleep(0.005)
        await batcher.stop()
        return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert all(isinstance(a, ServerBusyError) and "shutting down" in str(a) for a in answers)


def _body(feeds: Feeds) -> dict[str, object]:
    types = {"x": "FP32", "code": "INT64"}
    return {
        "inputs": [
            {"name": n, "datatype": types[n], "shape": list(a.shape), "data": a.ravel().tolist()}
            for n, a in feeds.items()
        ]
    }


def test_a_server_on_two_streams_answers_concurrent_callers_as_sequential_calls(
    two_stream_bundle: Bundle, tmp_path: Path
) -> None:
    reference = open_engine(two_stream_bundle, Target(intra_op_threads=1))
    requests = [rows(100 + i, 1 + i % 3, code=BAD if i % 16 == 5 else 1) for i in range(64)]
    settings = ServeSettings(intra_op_threads=2, batching=BatchSettings(max_batch_size=8, compute="thread"))
    with ServerThread(two_stream_bundle.path.parent.parent, settings) as server:
        entry = server.app.repository.get("checked", None)
        batcher = entry.batcher
        assert batcher is not None and batcher.parallel == 2 and isinstance(entry.engine, OpenVinoEngine)
        with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda f: client.post("/v2/models/checked/infer", json=_body(f)), requests))
        assert 1 <= batcher.peak_in_flight <= 2
        assert entry.engine.recompiles >= 1  # the bad calls really failed OpenVINO, and it was healed each time
    for i, (feeds, answer) in enumerate(zip(requests, answers, strict=True)):
        if i % 16 == 5:
            assert answer.status_code == 500 and "Internal error" in answer.json()["error"], answer.text
            continue
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"][0]
        got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        np.testing.assert_allclose(got, reference.run(feeds)["y"], rtol=1e-5, atol=1e-5)
