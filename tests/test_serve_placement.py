from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from slipstream.monitor.process.placement import Placement, pin_thread, plan, unpinned

CPUS = frozenset(os.sched_getaffinity(0))


def test_auto_gives_the_monitor_the_last_cpu_and_the_event_loop_the_others() -> None:
    placed = plan("auto")
    assert placed.allowed == CPUS
    if len(CPUS) < 2:  # nothing to separate: the kernel places both
        assert placed == Placement(CPUS)
    else:
        assert placed.monitor == frozenset({max(CPUS)}) and placed.loop == CPUS - {max(CPUS)}
        assert "monitor process on CPU" in placed.describe()
    assert plan("none") == Placement(CPUS) and "placed by the kernel" in plan("none").describe()


def test_one_cpu_is_left_to_the_kernel() -> None:
    """In a process allowed a single CPU (taskset), auto does not pin anything."""
    code = (
        "from slipstream.monitor.process.placement import plan; "
        "p = plan('auto'); print(p.loop, p.monitor, len(p.allowed))"
    )
    out = subprocess.run(
        ["taskset", "-c", str(min(CPUS)), sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["None", "None", "1"]


def test_pinning_is_per_thread_and_inherited_by_the_threads_it_starts() -> None:
    seen: dict[str, frozenset[int]] = {}

    def child() -> None:
        seen["child"] = frozenset(os.sched_getaffinity(0))

    def pinned() -> None:
        assert pin_thread(frozenset({min(CPUS)}))
        seen["pinned"] = frozenset(os.sched_getaffinity(0))
        t = threading.Thread(target=child)
        t.start()
        t.join()

    t = threading.Thread(target=pinned)
    t.start()
    t.join()
    assert seen == {"pinned": {min(CPUS)}, "child": {min(CPUS)}}
    assert frozenset(os.sched_getaffinity(0)) == CPUS  # the calling thread kept every CPU
    assert not pin_thread(None) and not pin_thread(frozenset())


def test_a_cpu_that_does_not_exist_is_a_warning_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(pin_thread(frozenset({4096}))))
    t.start()
    t.join()
    assert result == [False] and "could not place this thread on CPU 4096" in caplog.text


def _threads_cpus() -> dict[int, str]:
    """Every thread of this process and its CPU list, from /proc."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            lines = (task / "status").read_text().splitlines()
        except FileNotFoundError:  # a thread (another test's, a pool's) that ended while we listed them
            continue
        out[int(task.name)] = next(line.split()[1] for line in lines if line.startswith("Cpus_allowed_list"))
    return out


def test_a_model_loaded_from_a_pinned_thread_gets_every_cpu_for_its_inference_pool() -> None:
    """A version found after startup is loaded from a thread the pinned event loop started: its onnxruntime
    pool must not inherit the event loop's CPUs (and the loading thread goes back where it was)."""
    import onnxruntime as ort

    from tests.onnx_models import build_trained_digits_mlp

    model = build_trained_digits_mlp(hidden=8)[0].SerializeToString()
    placement = Placement(CPUS, loop=frozenset({min(CPUS)}), monitor=frozenset({max(CPUS)}))
    seen: dict[str, object] = {}

    def loader() -> None:
        assert pin_thread(placement.loop)
        before = _threads_cpus()
        with unpinned(placement):
            seen["inside"] = frozenset(os.sched_getaffinity(0))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 3
            seen["session"] = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        seen["after"] = frozenset(os.sched_getaffinity(0))
        seen["pool"] = {cpus for tid, cpus in _threads_cpus().items() if tid not in before}

    t = threading.Thread(target=loader)
    t.start()
    t.join()
    assert seen["inside"] == CPUS and seen["after"] == {min(CPUS)}
    every = _threads_cpus()[threading.get_native_id()]  # this thread was never pinned
    assert seen["pool"] == {every}  # the session's pool threads (2 of them) run on every CPU
    with unpinned(None):  # nothing planned: nothing moves
        assert frozenset(os.sched_getaffinity(0)) == CPUS
