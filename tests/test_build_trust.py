"""Issue 17: a candidate that crashes onnxruntime is a recorded failure; every ratio shown is side by side."""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
import torch
from torch import nn

from slipstream.artifact import Bundle
from slipstream.build.recipe import Budget, parse_recipe
from slipstream.build.record import CandidateMetrics, CandidateResult, RunRecord
from slipstream.build.report import headline, headline_mismatches
from slipstream.build.search import BuildResult, run_build
from slipstream.build.select import runner_up, select
from slipstream.evaluate.sidebyside import interleave, side_by_side
from slipstream.evaluate.torch_eager import torch_side_by_side
from slipstream.runtime import Engine, Target


class TinyViT(nn.Module):
    """Patches, a class token and a pre-norm transformer layer: fp16 of it segfaults onnxruntime 1.32 at
    graph optimization 'all' (and loads at 'extended')."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.enc(h)[:, 0])  # type: ignore[no-any-return]


def _vit_onnx(path: Path) -> Path:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():  # torch's exporter warns about its own internals
        warnings.simplefilter("ignore")
        _export(batch, path)
    return path


def _export(batch: object, path: Path) -> None:
    torch.onnx.export(
        TinyViT().eval(),
        (torch.randn(4, 1, 8, 8),),
        str(path),
        dynamo=True,
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        external_data=False,
    )


def _victim_pid(candidate: str, root: Path) -> int | None:
    """The pid of the running child that makes ``candidate``, if one has started."""
    for task_file in list(Path(root).glob("**/task-*.json")):
        try:
            task = json.loads(task_file.read_text())
            status = json.loads(task_file.with_name(task_file.name.replace("task-", "status-")).read_text())
        except (OSError, ValueError):
            continue
        pid = status.get("pid")
        if str(task.get("dest") or "").endswith(f"/{candidate}") and pid and psutil.pid_exists(pid):
            return int(pid)
    return None


@contextmanager
def oom_killer(candidate: str, root: Path) -> Iterator[list[int]]:
    """Kill -9 the child process that makes and measures ``candidate``, as the kernel's OOM killer would.

    A real signal from outside, delivered to the real child: the build must record it and go on."""
    killed: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        # The build writes each child's task next to the status file the child fills in, its pid first. The
        # build makes and removes folders while this walks them, and a child may end between a look and the
        # kill: either is a miss to retry, never an end of the watch.
        while not stop.is_set() and not killed:
            try:
                pid = _victim_pid(candidate, root)
                if pid is not None:
                    psutil.Process(pid).kill()
                    killed.append(pid)
            except (OSError, psutil.Error):
                pass
            stop.wait(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def crash_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildResult, Path]:
    work = tmp_path_factory.mktemp("crash")
    model = _vit_onnx(work / "vit.onnx")
    np.savez(work / "eval.npz", x=np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32))
    recipe = parse_recipe(
        {
            "name": "vit",
            "model": str(model),
            "data": {"eval": str(work / "eval.npz")},
            "metric": "cosine",
            "budget": {"max_accuracy_drop": 0.05},
            "batch_size": 8,
            "bench_time_s": 0.1,
            "output": str(work / "out"),
            "candidates": [
                {"name": "fp16", "passes": ["precision.fp16"]},
                {"name": "victim", "passes": ["quantize.dynamic"]},
                {"name": "optimized", "passes": ["graph.optimize"]},
                {"name": "optimized-again", "passes": [{"graph.optimize": {}}]},
            ],
        }
    )
    with oom_killer("victim", work) as killed:
        result = run_build(recipe)
    assert killed, "the watcher never saw the victim's child process"
    return result, work


def test_a_killed_candidate_is_recorded_and_the_build_finishes(crash_build: tuple[BuildResult, Path]) -> None:
    result, work = crash_build
    record = json.loads((work / "out" / "run.json").read_text())
    victim = next(c for c in record["candidates"] if c["name"] == "victim")
    assert victim["status"] == "failed" and victim["signal"] == "SIGKILL"
    assert "SIGKILL" in victim["error"]
    page = (work / "out" / "report.html").read_text()
    assert "victim crashed its child process (SIGKILL)" in page
    assert Bundle.load(work / "out" / "winner").manifest.resolved["session"] == result.record.tuning["chosen"]


def test_an_onnxruntime_segfault_is_recorded_and_measured_at_a_safer_level(
    crash_build: tuple[BuildResult, Path],
) -> None:
    """fp16 of the ViT segfaults onnxruntime at graph optimization 'all': the child dies, the build records the
    crash and measures the same model at 'extended', the level the candidate keeps as its resolved choice."""
    _, work = crash_build
    record = json.loads((work / "out" / "run.json").read_text())
    fp16 = next(c for c in record["candidates"] if c["name"] == "fp16")
    assert fp16["status"] == "ok" and fp16["graph_optimization"] == "extended"
    assert any("SIGSEGV" in w and "'all'" in w for w in fp16["warnings"])
    page = (work / "out" / "report.html").read_text()
    assert "fp16: onnxruntime crashed (SIGSEGV)" in page


def test_byte_identical_candidates_are_measured_once(crash_build: tuple[BuildResult, Path]) -> None:
    result, _ = crash_build
    first, again = result.record.candidate("optimized"), result.record.candidate("optimized-again")
    assert first.status == again.status == "ok" and first.same_as is None
    assert again.same_as == "optimized" and again.metrics == first.metrics
    sel = result.record.selection
    assert sel is not None and sel.winner != "optimized-again"
    assert any(r.name == "optimized-again" and "byte-identical to optimized" in r.reason for r in sel.rejections)


def test_every_ratio_in_the_headline_is_a_side_by_side_one(crash_build: tuple[BuildResult, Path]) -> None:
    result, work = crash_build
    record = RunRecord.model_validate_json((work / "out" / "run.json").read_text())
    assert record.headline == result.record.headline and record.headline[0].startswith("winner: ")
    assert headline_mismatches(record) == []
    winner = record.candidate(record.selection.winner if record.selection else "baseline")
    if winner.confirmation is not None:  # the winner's gain, as shown, is the interleaved one
        assert winner.confirmation.ratio_text() in record.headline[0]


def _m(p50: float) -> CandidateMetrics:
    return CandidateMetrics(quality=0.95, latency_p50_ms=p50, latency_p99_ms=p50 * 2, throughput_sps=1, size_bytes=1)


def _selected(candidate: CandidateResult) -> RunRecord:
    """A run of one candidate against a 10 ms baseline, with its selection made."""
    base = CandidateResult(name="baseline", passes=(), status="ok", metrics=_m(10.0))
    record = RunRecord(
        name="r", recipe={}, recipe_sha256="0", metric="accuracy", higher_is_better=True, objective="latency",
        batch_size=8, baseline=base, candidates=(candidate,),
    )  # fmt: skip
    return record.model_copy(update={"selection": select(record, Budget(max_accuracy_drop=0.01))})


def test_headline_takes_the_interleaved_ratio_not_the_first_pass() -> None:
    """First pass says 10× (1.0 vs 10 ms); side by side it was 3.5×: only 3.50× is shown."""
    confirmed = side_by_side("baseline", "fast", [7.0] * 30, [2.0] * 30)
    fast = CandidateResult(name="fast", passes=("x",), status="ok", metrics=_m(1.0)).model_copy(
        update={"confirmed_gain": confirmed.ratio, "confirmation": confirmed}
    )
    record = _selected(fast)
    lines = headline(record)
    assert "3.50× the baseline, timed side by side" in lines[0] and "10.00×" not in " ".join(lines)
    assert headline_mismatches(record.model_copy(update={"headline": lines})) == []
    wrong = record.model_copy(update={"headline": ("winner: fast — 10.00× the baseline",)})
    assert headline_mismatches(wrong) == ["10.00× in 'winner: fast — 10.00× the baseline'"]


def test_an_unstable_gain_is_shown_without_any_number_of_times() -> None:
    """A noisy re-timing shows no 'N×' at all, so nothing in the headline can disagree with run.json."""
    shaky = side_by_side("baseline", "fast", [7.0] * 24 + [30.0] * 6, [2.0] * 30)
    fast = CandidateResult(name="fast", passes=("x",), status="ok", metrics=_m(1.0)).model_copy(
        update={"confirmed_gain": shaky.ratio, "confirmation": shaky}
    )
    record = _selected(fast)
    lines = headline(record)
    assert "its gain over the baseline, timed side by side, is unstable (" in lines[0]
    assert "×" not in " ".join(lines)
    assert headline_mismatches(record.model_copy(update={"headline": lines})) == []


def test_a_wide_spread_is_shown_as_unstable_not_as_a_ratio() -> None:
    steady = [1.0] * 18 + [1.1, 1.2]
    noisy = [2.0] * 17 + [30.0, 40.0, 50.0]  # p90 far above 2× p50: torch under load
    shaky = side_by_side("torch eager (fp32)", "winner", noisy, steady, threads=1)
    assert shaky.unstable and shaky.ratio_text().startswith("unstable (torch eager (fp32) p90")
    assert "×" not in shaky.ratio_text().split("(")[0]
    calm = side_by_side("torch eager (fp32)", "winner", [2.0] * 20, steady, threads=1)
    assert not calm.unstable and calm.ratio_text() == "2.00×"
    assert calm.reference_timing.n == 20 and calm.subject_timing.p90_ms == pytest.approx(1.01)


def test_interleave_alternates_and_warms_both_sides() -> None:
    calls: list[str] = []
    now = [0.0]

    def clock() -> float:
        now[0] += 0.001
        return now[0]

    a, b = interleave(
        lambda: calls.append("a"), lambda: calls.append("b"), warmup_runs=2, min_runs=4, min_time_s=0, clock=clock
    )
    assert calls[:4] == ["a", "b", "a", "b"]  # warm-up, both sides
    assert len(a) == len(b) >= 4
    assert calls[4:8] == ["a", "b", "b", "a"]  # who goes first alternates


class _ThreadProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(torch.get_num_threads())
        return x * 2


def test_torch_runs_at_the_engines_thread_count(tmp_path: Path) -> None:
    from slipstream.importers import convert

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    two = onnx.helper.make_tensor("two", onnx.TensorProto.FLOAT, [], [2.0])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Mul", ["x", "two"], ["y"])], "g", [x], [y], [two])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    bundle = convert(str(tmp_path / "m.onnx"), tmp_path / "b")
    before = torch.get_num_threads()
    probe = _ThreadProbe()
    engine = Engine(bundle, Target(intra_op_threads=1))
    compared = torch_side_by_side(
        probe, engine, {"x": np.ones((2, 4), np.float32)}, subject="m", min_time_s=0, max_time_s=0.05
    )
    assert probe.seen == {1} and compared.threads == 1
    assert torch.get_num_threads() == before  # put back as it was
    assert compared.reference_timing.n == compared.subject_timing.n >= 20


def test_fp16_attention_runs_at_the_safe_level_recorded_in_the_bundle(crash_build: tuple[BuildResult, Path]) -> None:
    """The fp16 model itself as the source: its session crashes at 'all' in the child, loads at 'extended';
    the level is recorded, and the winner carries it, so an Engine here (no child) loads it safely."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _, work = crash_build
    from slipstream.passes._onnx import toposort

    half = convert_float_to_float16(onnx.load(str(work / "vit.onnx")), keep_io_types=True)
    toposort(half)  # the converter appends the io Casts at the end of the node list
    onnx.save(half, str(work / "vit16.onnx"))
    recipe = parse_recipe(
        {
            "name": "vit16", "model": str(work / "vit16.onnx"), "data": {"eval": str(work / "eval.npz")},
            "metric": "cosine", "budget": {"max_accuracy_drop": 0.05}, "batch_size": 8, "bench_time_s": 0.05,
            "output": str(work / "out16"), "candidates": [],
        }
    )  # fmt: skip
    result = run_build(recipe)
    base = result.record.baseline
    assert base.status == "ok" and base.graph_optimization == "extended"
    assert any("SIGSEGV" in w and "'all'" in w for w in base.warnings)
    assert result.winner.manifest.resolved["session"]["graph_optimization"] == "extended"  # type: ignore[index]
    engine = Engine(result.winner)  # in this process: it would segfault at 'all'
    assert engine.resolved().graph_optimization == "extended" and "graph_optimization" in engine.resolved().from_bundle


def test_an_engine_uses_the_bundles_tuned_session_unless_the_caller_sets_it(tmp_path: Path) -> None:
    from slipstream.artifact.bundle import write_bundle
    from slipstream.importers import convert
    from slipstream.runtime import target

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    plain = convert(str(tmp_path / "m.onnx"), tmp_path / "plain")
    tuned = {"intra_op_threads": 3, "execution_mode": "parallel", "graph_optimization": "basic"}
    manifest = plain.manifest.model_copy(update={"resolved": {**plain.manifest.resolved, "session": tuned}})
    bundle = write_bundle(tmp_path / "tuned", plain.load_model(), manifest)
    info = Engine(bundle, target("cpu", intra_op_threads=None)).resolved()  # what `bench` passes without --threads
    assert (info.intra_op_threads, info.execution_mode, info.graph_optimization) == (3, "parallel", "basic")
    assert set(info.from_bundle) == set(tuned)
    mine = Engine(bundle, target("cpu", intra_op_threads=1, execution_mode="sequential")).resolved()
    assert (mine.intra_op_threads, mine.execution_mode, mine.graph_optimization) == (1, "sequential", "basic")
    assert Engine(plain, Target()).resolved().from_bundle == ()


def _confirmed(name: str, first_ms: float, base_ms: float, cand_ms: float) -> CandidateResult:
    """A candidate measured at ``first_ms`` on its first pass, then re-timed against the baseline."""
    timing = side_by_side("baseline", name, [base_ms] * 30, [cand_ms] * 30)
    return CandidateResult(name=name, passes=("x",), status="ok", metrics=_m(first_ms)).model_copy(
        update={"confirmed_gain": timing.ratio, "confirmation": timing}
    )


def _two_engines() -> RunRecord:
    """The ResNet case of benchmarks/engines_cpu.py: OpenVINO int8 first-pass fastest (2.0×), but its re-timing
    came out 1.2× against static int8's 2.1×, each taken at another moment."""
    ov, ort = _confirmed("openvino-int8", 5.0, 12.0, 10.0), _confirmed("int8-static", 6.0, 21.0, 10.0)
    base = CandidateResult(name="baseline", passes=(), status="ok", metrics=_m(10.0))
    return RunRecord(
        name="r", recipe={}, recipe_sha256="0", metric="accuracy", higher_is_better=True, objective="latency",
        batch_size=8, baseline=base, candidates=(ov, ort),
    )  # fmt: skip


def test_a_runner_up_whose_first_pass_was_faster_is_timed_against_the_winner() -> None:
    record = _two_engines()
    budget = Budget(max_accuracy_drop=0.01)
    selection = select(record, budget)
    assert selection.winner == "int8-static" and selection.runners == ("openvino-int8",)
    runner = runner_up(record, selection)
    assert runner is not None and runner.name == "openvino-int8"
    # Timed together, OpenVINO is 1.25x faster: it wins, and both reasons say so with the pair's own ratio.
    duel = side_by_side("int8-static", "openvino-int8", [10.0] * 30, [8.0] * 30)
    decided = record.model_copy(update={"head_to_head": duel})
    after = select(decided, budget)
    assert after.winner == "openvino-int8" and "openvino-int8 1.25× faster than int8-static" in after.reason
    (lost,) = [r for r in after.rejections if r.name == "int8-static"]
    assert lost.reason.startswith("within budget but slower; head to head with openvino-int8")
    lines = headline(decided.model_copy(update={"selection": after}))
    assert headline_mismatches(decided.model_copy(update={"selection": after, "headline": lines})) == []
    assert runner_up(decided, after) is None  # the new winner's first pass was the fastest: no second duel


def test_a_small_or_unsteady_head_to_head_keeps_the_confirmed_winner() -> None:
    record, budget = _two_engines(), Budget(max_accuracy_drop=0.01)
    close = side_by_side("int8-static", "openvino-int8", [10.0] * 30, [9.8] * 30)  # 1.02x: under min_speedup
    kept = select(record.model_copy(update={"head_to_head": close}), budget)
    assert kept.winner == "int8-static"
    (other,) = [r for r in kept.rejections if r.name == "openvino-int8"]
    assert "short of the 1.05× a change of winner needs" in other.reason
    noisy = side_by_side("int8-static", "openvino-int8", [10.0] * 20 + [40.0] * 10, [5.0] * 30)
    assert noisy.unstable
    unsteady = select(record.model_copy(update={"head_to_head": noisy}), budget)
    assert unsteady.winner == "int8-static"
    assert "confirmed order stands" in next(r.reason for r in unsteady.rejections if r.name == "openvino-int8")
