"""Candidates run in a child process, so that a crash in onnxruntime is a recorded failure, not the build's end.

A candidate's passes (their fidelity checks open onnxruntime sessions) and its measurement (session, quality,
timing) run in ``python -m slipstream.build.isolate TASK.json``. The child writes its progress (which stage it
is in) and its result to a JSON file; the parent reads that file whatever happened. A segfault, an abort or a
memory limit becomes "onnxruntime crashed with SIGSEGV while building the session", with the child's last
stderr lines, and the build goes on with the next candidate.

Children are forked from the build's fork server (build/forkserver.py), which has imported numpy, onnx,
onnxruntime and the passes once: each candidate still gets a fresh process of its own, without a second of
imports each.

Measured here (onnxruntime 1.32): an fp16 ViT (``nn.TransformerEncoderLayer``) segfaults at graph optimization
``all`` (the ``NchwcTransformer`` + ``MatmulTransposeFusion`` pair) and loads at ``extended``. So when the child
crashes while building the session, the parent retries at the next safer level, and records the level that
worked as a resolved choice of the candidate (and of the winner's bundle, when it wins).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, JsonValue

from slipstream.build.forkserver import run_forked
from slipstream.frozen import Frozen

Stage = Literal["start", "passes", "session", "quality", "timing", "done"]
LABELS = "__labels__"
# Graph-optimization levels tried, in order, when onnxruntime crashes while building a session.
SAFER_LEVELS = ("all", "extended", "basic", "disable")
STDERR_LINES = 12


class MeasureSpec(Frozen):
    """How the child measures a bundle: data, metric, batch size and the target's session settings."""

    data: str = Field(description="An .npz of the evaluation inputs (labels under '__labels__').")
    reference: str = Field(description="The baseline's outputs (.npy), the fidelity reference.")
    write_reference: bool = Field(default=False, description="This is the baseline: write its outputs there.")
    metric: str = Field(description="The recipe's metric name.")
    batch_size: int = Field(description="The batch size timings are taken at.")
    bench_time_s: float = Field(description="Time budget for timing the bundle.")
    target: dict[str, JsonValue] = Field(description="The Target, as its JSON dump.")
    key_salt: tuple[JsonValue, ...] = Field(description="What a measurement key hashes besides the model sha256.")
    skip_keys: tuple[str, ...] = Field(default=(), description="Keys already measured: produce, do not measure.")


class ChildTask(Frozen):
    """One candidate for the child: run ``passes`` on ``bundle`` into ``dest`` (if any), then measure."""

    bundle: str = Field(description="The bundle to measure, or the one the passes start from.")
    passes: tuple[JsonValue, ...] = Field(default=(), description="Pass refs: 'name' or [name, {options}].")
    dest: str | None = Field(default=None, description="Where the passes write the candidate's bundle.")
    seed: int = Field(default=0, description="The build's seed.")
    data: str | None = Field(default=None, description="Real inputs (.npz) for fidelity and calibration.")
    measure: MeasureSpec | None = Field(default=None, description="What to measure; None: only produce.")
    memory_limit_mb: int | None = Field(default=None, description="RLIMIT_AS for the child, in MiB.")


class ChildOutcome(Frozen):
    """What the child reported, and how it ended."""

    stage: Stage = Field(description="The last stage the child entered.")
    pid: int | None = Field(default=None, description="The child's process id, written when it starts.")
    bundle: str | None = Field(default=None, description="The candidate's bundle, once the passes wrote it.")
    cache_hits: int = Field(default=0, description="Passes answered by the pass cache.")
    metrics: dict[str, JsonValue] | None = Field(default=None, description="CandidateMetrics, when measured.")
    error: str | None = Field(default=None, description="Why the candidate failed (exception or crash).")
    signal: str | None = Field(default=None, description="The signal that killed the child (e.g. SIGSEGV).")


_STAGE_TEXT = {
    "start": "starting",
    "passes": "applying the passes",
    "session": "building the onnxruntime session",
    "quality": "scoring quality",
    "timing": "timing",
    "done": "finishing",
}


def _run_process(args: tuple[str, str, str], timeout_s: float) -> int | None:
    """The child's exit code (negative: the signal that killed it), or None when it ran past ``timeout_s``:
    forked from the build's fork server, or a fresh interpreter when that is off or down."""
    served, code = run_forked(args, timeout_s)
    if served:
        return code
    task_file, status_file, stderr_file = args
    cmd = [sys.executable, "-m", "slipstream.build.isolate", task_file, status_file]
    try:
        with Path(stderr_file).open("wb") as err:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return None
    return proc.returncode


def run_child(task: ChildTask, workdir: Path, *, timeout_s: float = 1800.0) -> ChildOutcome:
    """Run ``task`` in a fresh child process; a crash or timeout comes back as an outcome with its error."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    task_file, status_file = workdir / f"task-{stamp}.json", workdir / f"status-{stamp}.json"
    stderr_file = workdir / f"stderr-{stamp}.txt"
    task_file.write_text(task.model_dump_json(), encoding="utf-8")
    rc = _run_process((str(task_file), str(status_file), str(stderr_file)), timeout_s)
    status: dict[str, Any] = {"stage": "start"}
    if status_file.is_file():
        status = json.loads(status_file.read_text(encoding="utf-8"))
    tail = _tail(stderr_file)
    for f in (task_file, status_file, stderr_file):
        f.unlink(missing_ok=True)
    outcome = ChildOutcome.model_validate(status)
    doing = _STAGE_TEXT[outcome.stage]
    if rc is None:
        return outcome.model_copy(update={"error": f"timed out after {timeout_s:.0f} s while {doing}"})
    if rc < 0:
        name = _signal_name(-rc)
        text = f"onnxruntime or a pass crashed the child process with {name} while {doing}"
        return outcome.model_copy(
            update={"error": text + (f"; last stderr lines:\n{tail}" if tail else ""), "signal": name}
        )
    if rc != 0 and outcome.error is None:
        return outcome.model_copy(update={"error": f"the child exited with status {rc} while {doing}: {tail}"})
    return outcome


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(path: Path) -> str:
    if not path.is_file():
        return ""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return "\n".join(lines[-STDERR_LINES:])


def write_eval_data(inputs: dict[str, np.ndarray], labels: np.ndarray | None, dest: Path) -> Path:
    """The evaluation data as one .npz the child reads (labels under a name no input can have)."""
    arrays = dict(inputs)
    if labels is not None:
        arrays[LABELS] = labels
    np.savez(dest, **arrays)  # type: ignore[arg-type]  # numpy types allow_pickle in **kwds
    return dest


# ---- the child ---------------------------------------------------------------------------------------------


class _Status:
    """The child's progress file: rewritten (atomically) at every stage, so a crash leaves the last one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.state: dict[str, Any] = {"stage": "start"}

    def update(self, **fields: Any) -> None:
        self.state.update(fields)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.state), encoding="utf-8")
        tmp.replace(self.path)


def _pass_ref(ref: JsonValue) -> Any:
    if isinstance(ref, list):
        return (ref[0], dict(ref[1]))  # type: ignore[arg-type]  # [name, {options}] as the parent wrote it
    return ref


def _produce(task: ChildTask, status: _Status) -> Any:
    from slipstream.artifact.bundle import Bundle

    if not task.passes:
        return Bundle.load(task.bundle)
    from slipstream.passes.recipe import optimize

    status.update(stage="passes")
    hits = 0

    def count_hits(event: Any) -> None:
        nonlocal hits
        if event.run is not None and event.run.cache_hit:
            hits += 1

    refs = [_pass_ref(p) for p in task.passes]
    bundle = optimize(
        task.bundle, refs, task.dest or "", overwrite=True, seed=task.seed, data=task.data, progress=count_hits
    )
    status.update(bundle=str(bundle.path), cache_hits=hits)
    return bundle


def _measure(bundle: Any, spec: MeasureSpec, status: _Status) -> dict[str, JsonValue]:
    from slipstream.build.measure import first_rows
    from slipstream.data.datasets import Dataset
    from slipstream.evaluate.bench import BenchSettings, bench
    from slipstream.evaluate.metrics import get_metric
    from slipstream.evaluate.quality import predict, score
    from slipstream.runtime.open import open_engine
    from slipstream.runtime.targets import Target

    status.update(stage="session")
    engine = open_engine(bundle, Target.model_validate(spec.target))
    status.update(stage="quality")
    with np.load(spec.data) as data:
        inputs = {k: data[k] for k in data.files if k != LABELS}
        labels = data[LABELS] if LABELS in data.files else None
    dataset = Dataset(inputs, labels, spec.data)
    outputs = predict(engine, dataset, batch_size=256)
    reference = Path(spec.reference)
    if spec.write_reference:
        np.save(reference, outputs)
    quality = score(get_metric(spec.metric), outputs, dataset, np.load(reference))
    status.update(stage="timing")
    budget = spec.bench_time_s
    settings = BenchSettings(batch_sizes=(spec.batch_size,), warmup_runs=3, min_time_s=budget / 4, max_time_s=budget)
    feeds = {spec.batch_size: first_rows(dataset, spec.batch_size)}
    timing = bench(lambda: engine, settings, feeds=feeds).results[0]
    return {
        "quality": quality,
        "latency_p50_ms": timing.p50_ms,
        "latency_p90_ms": timing.p90_ms,
        "latency_p99_ms": timing.p99_ms,
        "timed_runs": timing.runs,
        "throughput_sps": timing.throughput_sps,
        "size_bytes": bundle.size_bytes,
    }


def child_main(task_file: str, status_file: str) -> int:
    """The child's whole life: produce, measure, write the outcome. Exit 1 on a Python error."""
    from slipstream.artifact.hashing import sha256_json
    from slipstream.errors import SlipstreamError
    from slipstream.runtime.choice import engine_key

    task = ChildTask.model_validate_json(Path(task_file).read_text(encoding="utf-8"))
    status = _Status(Path(status_file))
    status.update(stage="start", pid=os.getpid())
    if task.memory_limit_mb is not None:
        limit = task.memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        bundle = _produce(task, status)
        spec = task.measure
        if (
            spec is not None
            and sha256_json([engine_key(bundle.model_sha256, bundle.manifest), *spec.key_salt]) not in spec.skip_keys
        ):
            status.update(metrics=_measure(bundle, spec, status))
    except Exception as exc:  # the parent records it as the candidate's error
        text = str(exc) if isinstance(exc, SlipstreamError) else f"{type(exc).__name__}: {exc}"
        status.update(error=text)
        return 1
    status.update(stage="done")
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
