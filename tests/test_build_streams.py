"""OpenVINO streams: the build measures one stream per core against one stream on an OpenVINO winner and
records the choice with its reason; `serve --streams` sets them by hand; onnxruntime bundles ignore it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slipstream.artifact import Bundle
from slipstream.build.recipe import parse_recipe
from slipstream.build.search import run_build
from slipstream.build.streams import decide_streams, time_streams
from slipstream.evaluate.sidebyside import side_by_side
from slipstream.passes import load_pass, lookup
from slipstream.runtime import Target, engine_choice, open_engine
from slipstream.runtime.openvino_engine import OpenVinoEngine
from slipstream.serve.server import settings_from_options
from tests.serve_support import ServerThread


@pytest.fixture(scope="module")
def ov_mlp(mlp_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    step = load_pass(lookup("engine.openvino"))
    out = tmp_path_factory.mktemp("ov-mlp") / "repo" / "mlp" / "1"
    return step.run(mlp_bundle, out, step.make_config({"precision": "f32"})).bundle


def test_streams_are_kept_only_for_throughput_on_a_stable_gain() -> None:
    faster = side_by_side("1 stream", "2 streams", [10.0] * 20, [8.0] * 20)  # 1.25x, steady
    same = side_by_side("1 stream", "2 streams", [10.0] * 20, [9.9] * 20)
    noisy = side_by_side("1 stream", "2 streams", [10.0] * 20, [5.0] * 14 + [50.0] * 6)  # p90 10x its p50
    chosen = decide_streams(faster, 2, objective="throughput", min_speedup=1.05)
    assert chosen.chosen and "1.25×" in chosen.reason
    latency = decide_streams(faster, 2, objective="latency", min_speedup=1.05)
    assert not latency.chosen and "objective is latency" in latency.reason and "--streams 2" in latency.reason
    small = decide_streams(same, 2, objective="throughput", min_speedup=1.05)
    assert not small.chosen and "below the 1.05×" in small.reason
    unstable = decide_streams(noisy, 2, objective="throughput", min_speedup=1.05)
    assert noisy.unstable and not unstable.chosen and "unstable" in unstable.reason


def test_the_timing_runs_the_same_batches_on_one_stream_and_on_two(ov_mlp: Bundle) -> None:
    opened: list[OpenVinoEngine] = []

    def open_at(n: int) -> OpenVinoEngine:
        engine = open_engine(ov_mlp, Target(intra_op_threads=2, inter_op_threads=n))
        assert isinstance(engine, OpenVinoEngine)
        opened.append(engine)
        return engine

    feeds = {"pixels": np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)}
    timing = time_streams(open_at, feeds, 2, min_time_s=0.05, max_time_s=0.5)
    assert [e.parallel_requests for e in opened] == [1, 2]
    assert timing.reference_timing.n == timing.subject_timing.n >= 5
    assert (timing.reference, timing.subject) == ("1 stream", "2 streams") and timing.ratio > 0


def test_a_build_with_an_openvino_winner_records_its_streams_and_why(ov_mlp: Bundle, tmp_path: Path) -> None:
    rows = np.random.default_rng(1).standard_normal((128, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", pixels=rows)
    recipe = parse_recipe(
        {
            "name": "ov",
            "model": str(ov_mlp.path),
            "data": {"eval": str(tmp_path / "eval.npz")},
            "metric": "cosine",
            "objective": "throughput",
            "budget": {"max_accuracy_drop": 0.01},
            "batch_size": 32,
            "bench_time_s": 0.2,
            "output": str(tmp_path / "out"),
            "candidates": [],
        }
    )
    result = run_build(recipe)
    assert engine_choice(result.winner.manifest).engine == "openvino"  # the baseline is the OpenVINO bundle
    streams = result.record.tuning["streams"]
    assert isinstance(streams, dict) and streams["streams"] == 2 and "stream" in str(streams["reason"])
    session = json.loads((result.winner.path / "manifest.json").read_text())["resolved"]["session"]
    assert (session.get("inter_op_threads") == 2) is streams["chosen"]
    served = open_engine(result.winner, Target())
    assert served.parallel_requests == (2 if streams["chosen"] else 1)  # what serve runs: the recorded choice


def test_serve_streams_set_openvino_streams_and_leave_onnxruntime_alone(
    ov_mlp: Bundle, mlp_bundle: Bundle, tmp_path: Path
) -> None:
    settings = settings_from_options({"port": 0, "access_log": False, "streams": 2, "intra_op_threads": 2}, {})
    assert settings.streams == 2
    with ServerThread(ov_mlp.path.parent.parent, settings) as server:
        entry = server.app.repository.get("mlp", None)
        assert isinstance(entry.engine, OpenVinoEngine) and entry.engine.parallel_requests == 2
        assert entry.batcher is not None and entry.batcher.parallel == 2
    plain = tmp_path / "repo" / "mlp"
    plain.mkdir(parents=True)
    (plain / "1").symlink_to(mlp_bundle.path, target_is_directory=True)
    with ServerThread(tmp_path / "repo", settings) as server:
        entry = server.app.repository.get("mlp", None)
        assert entry.engine.parallel_requests == 1 and entry.batcher is not None and entry.batcher.parallel == 1
