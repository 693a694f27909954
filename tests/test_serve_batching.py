"""The batching state machine, case by case with a fake clock; then the asyncio driver on a real engine."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from slipstream.artifact import Bundle
from slipstream.errors import RequestTimeoutError, ServerBusyError
from slipstream.runtime import Engine, Target
from slipstream.serve.batching import Batcher, BatchQueue, Pending, join_rows, split_rows
from slipstream.serve.settings import BatchSettings, ServeSettings
from tests.serve_support import ServerThread, add_version

SETTINGS = BatchSettings(max_batch_size=8, max_queue_delay_ms=5, max_queue_length=4, timeout_ms=100)


def item(t: float, rows: int = 1, key: str = "a", timeout: float = 0.1) -> Pending:
    return Pending({"x": np.full((rows, 2), t, dtype=np.float32)}, rows, key, t, t + timeout)


def test_a_lone_request_is_flushed_at_once() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    q.submit(first := item(0.0))
    decision = q.poll(0.0)
    assert decision.batch == [first] and decision.wake_at is None and len(q) == 0


def test_it_waits_while_requests_are_still_arriving_then_flushes_at_the_delay() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    q.joining = 1  # one caller routed to the model is still reading its body
    q.submit(first := item(0.0))
    waiting = q.poll(0.001)
    assert waiting.batch == [] and waiting.wake_at == pytest.approx(0.005)
    assert q.poll(0.005).batch == [first]


def test_it_flushes_as_soon_as_every_arriving_request_has_joined() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    q.joining = 1
    q.submit(a := item(0.0))
    assert q.poll(0.001).batch == []
    q.joining = 0
    q.submit(b := item(0.002))
    assert q.poll(0.002).batch == [a, b]


def test_a_full_batch_flushes_even_while_others_arrive() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    q.joining = 5
    q.submit(a := item(0.0, rows=5))
    q.submit(b := item(0.0, rows=3))
    q.submit(c := item(0.0, rows=2))
    assert q.poll(0.0).batch == [a, b]  # 8 rows; c would make 10
    assert list(q.items) == [c]


def test_an_oversized_request_runs_alone() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    q.joining = 3
    q.submit(big := item(0.0, rows=20))
    q.submit(item(0.0))
    assert q.poll(0.0).batch == [big]


def test_different_shapes_are_never_mixed_and_keep_their_order() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    a1, b1, a2, b2 = item(0.0, key="a"), item(0.0, key="b"), item(0.0, key="a"), item(0.0, key="b")
    for it in (a1, b1, a2, b2):
        q.submit(it)
    assert q.poll(0.0).batch == [a1, a2]
    assert q.poll(0.0).batch == [b1, b2]
    assert q.poll(0.0).batch == []


def test_a_full_queue_is_a_503_with_retry_after_and_does_not_grow() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    for _ in range(4):
        q.submit(item(0.0))
    with pytest.raises(ServerBusyError) as info:
        q.submit(item(0.0))
    assert info.value.status_code == 503 and info.value.retry_after_s == SETTINGS.retry_after_s
    assert len(q) == 4


def test_requests_past_their_timeout_leave_the_queue_as_expired() -> None:
    q = BatchQueue(SETTINGS, batchable=True)
    q.joining = 1
    q.submit(old := item(0.0, timeout=0.003))
    q.submit(young := item(0.002, timeout=0.1))
    first = q.poll(0.001)
    assert first.batch == [] and first.wake_at == pytest.approx(0.003)  # the deadline comes before the delay
    second = q.poll(0.0031)
    assert second.expired == [old] and second.batch == [] and list(q.items) == [young]


def test_an_unbatchable_model_runs_one_request_per_call() -> None:
    q = BatchQueue(SETTINGS, batchable=False)
    q.submit(a := item(0.0))
    q.submit(item(0.0))
    assert q.poll(0.0).batch == [a]


def test_each_request_gets_exactly_its_rows_back() -> None:
    batch = [item(1.0, rows=2), item(2.0, rows=1), item(3.0, rows=3)]
    joined = join_rows(batch)
    assert joined["x"].shape == (6, 2)
    parts = split_rows({"y": joined["x"] * 10}, batch)
    for it, part in zip(batch, parts, strict=True):
        np.testing.assert_array_equal(part["y"], it.feeds["x"] * 10)


def test_the_driver_batches_concurrent_callers_on_a_real_engine(mlp_bundle: Bundle) -> None:
    engine = Engine(mlp_bundle, Target(intra_op_threads=1))
    batches: list[int] = []

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = Batcher(
            lambda feeds: engine.run(feeds, check=False),
            BatchSettings(max_batch_size=64),
            batchable=True,
            on_batch=lambda rows, _s: batches.append(rows),
        )
        batcher.start()
        xs = [np.full((1 + i % 3, 8), i, dtype=np.float32) for i in range(40)]

        async def call(x: np.ndarray) -> dict[str, np.ndarray]:
            with batcher.slot() as slot:
                await asyncio.sleep(0)  # all 40 arrive before any joins
                out, _queued = await slot.infer({"pixels": x}, x.shape[0], "k")
            return out

        try:
            results = await asyncio.gather(*(call(x) for x in xs))
        finally:
            await batcher.stop()
        for x, out in zip(xs, results, strict=True):
            np.testing.assert_allclose(out["probabilities"], engine.run({"pixels": x})["probabilities"], rtol=1e-6)
        return results

    asyncio.run(main())
    assert sum(batches) == sum(1 + i % 3 for i in range(40))
    assert max(batches) > 1  # callers really shared model calls


def test_the_driver_answers_a_timed_out_request_with_504() -> None:
    async def main() -> None:
        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": feeds["x"]}

        batcher = Batcher(run, BatchSettings(max_queue_delay_ms=10_000, timeout_ms=20), batchable=True)
        batcher.start()
        try:
            with batcher.slot(), batcher.slot() as slot:  # the first caller never joins: the second
                with pytest.raises(RequestTimeoutError) as info:  # would wait for it...
                    await slot.infer({"x": np.zeros((1, 1))}, 1, "k")
                assert info.value.status_code == 504  # ...but its timeout answers first
                await asyncio.sleep(0.01)
                assert len(batcher.queue) == 0  # and it does not stay in memory
            assert batcher.queue.joining == 0  # leaving without joining is counted too
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_a_model_call_that_overruns_the_timeout_answers_504_and_the_batcher_recovers() -> None:
    calls: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(feeds["x"]))
        if len(calls) == 1:
            time.sleep(0.3)  # a stuck session
        return {"y": feeds["x"] + 1}

    async def main() -> None:
        batcher = Batcher(run, BatchSettings(timeout_ms=50), batchable=True, inline="never")
        batcher.start()
        try:
            started = time.monotonic()
            with pytest.raises(RequestTimeoutError), batcher.slot() as slot:
                await slot.infer({"x": np.zeros((1, 1))}, 1, "k")
            assert time.monotonic() - started < 0.25  # answered at the timeout, not when the call returned
            await asyncio.sleep(0.35)
            with batcher.slot() as slot:
                out, _ = await slot.infer({"x": np.ones((1, 1))}, 1, "k")
            np.testing.assert_array_equal(out["y"], [[2.0]])
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_a_client_that_sends_half_a_body_holds_no_batch(tmp_path: Path) -> None:
    """A request joins the batcher only once its body is read and decoded (issue 18: one slow client made
    every batch wait the full queue delay). The delay here is a minute: were the half-sent request counted
    as arriving, the other callers' batches would wait for it."""
    add_version(tmp_path / "repo", "mlp", "1", tmp_path)
    settings = ServeSettings(
        port=0, access_log=False, batching=BatchSettings(max_queue_delay_ms=60_000, timeout_ms=120_000)
    )
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}]})
    with (
        ServerThread(tmp_path / "repo", settings) as server,
        socket.create_connection((server.settings.host, server.settings.port)) as slow,
    ):
        head = (
            f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        slow.sendall(head.encode() + body.encode()[: len(body) // 2])
        deadline = time.monotonic() + 10
        while server.app.metrics.in_flight < 1 and time.monotonic() < deadline:  # its handler is reading
            time.sleep(0.01)
        batcher = server.app.repository.get("mlp", None).batcher
        assert server.app.metrics.in_flight == 1 and batcher is not None
        assert batcher.queue.joining == 0
        with httpx.Client(base_url=server.url, timeout=20) as client:
            answers = [client.post("/v2/models/mlp/infer", content=body) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert batcher.queue.joining == 0 and server.app.metrics.in_flight == 1  # the slow one still reads
        slow.sendall(body.encode()[len(body) // 2 :])
        slow.settimeout(20)
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")


def test_one_callers_bad_values_do_not_fail_the_callers_it_was_batched_with() -> None:
    """A Gather on a 5-row table: an id of 7 makes onnxruntime fail the whole model call. The batcher then
    runs each caller alone, so only the caller who sent 7 gets the error."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 1, 2])],
        [numpy_helper.from_array(np.arange(10, dtype=np.float32).reshape(5, 2), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    calls: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(feeds["ids"]))
        return {"rows": session.run(None, feeds)[0]}

    async def main() -> list[object]:
        batcher = Batcher(run, BatchSettings(max_batch_size=8), batchable=True, inline="never")
        batcher.start()
        ids = [np.array([[1]]), np.array([[7]]), np.array([[4]])]

        async def call(x: np.ndarray) -> object:
            try:
                with batcher.slot() as slot:
                    await asyncio.sleep(0)  # all three arrive before any joins: one batch
                    return (await slot.infer({"ids": x}, 1, "k"))[0]["rows"]
            except Exception as exc:  # the test looks at which caller got an error
                return exc

        try:
            return await asyncio.gather(*(call(x) for x in ids))
        finally:
            await batcher.stop()

    first, bad, last = asyncio.run(main())
    assert calls[0] == 3  # they really shared one model call first
    np.testing.assert_array_equal(first, [[[2.0, 3.0]]])
    np.testing.assert_array_equal(last, [[[8.0, 9.0]]])
    assert isinstance(bad, Exception) and "indices" in str(bad).lower()
