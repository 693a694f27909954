"""The source framework's own speed: a torch module in eager mode, timed side by side with an engine.

A torch timing taken alone on a shared machine is meaningless (its p90 was seen at 140× its p50 under load),
and torch at its default thread count against onnxruntime at one thread compares thread counts, not
runtimes. So torch runs at the engine's intra-op thread count, warmed up, in alternation with the engine
(evaluate/sidebyside.py), and the ratio carries both spreads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from slipstream.data.synthetic import example_inputs
from slipstream.evaluate.bench import BenchSettings
from slipstream.evaluate.sidebyside import Clock, SideBySide, interleave, side_by_side
from slipstream.runtime.base import EngineBase

TORCH_EAGER = "torch eager (fp32)"
# torch's first calls build its kernels and grow its allocator: warm it up well, to be fair to it.
TORCH_WARMUP_RUNS = 20


def torch_side_by_side(
    module: Any,
    engine: EngineBase,
    feeds: Mapping[str, np.ndarray],
    *,
    subject: str,
    min_time_s: float = 0.5,
    max_time_s: float = 5.0,
    clock: Clock | None = None,
) -> SideBySide:
    """torch eager (``module(*inputs)`` in ``feeds`` order) against ``engine``, at the engine's thread count."""
    import torch

    threads = engine.resolved().intra_op_threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        checked = engine.check_inputs(feeds)
        module.eval()

        def run_torch() -> None:
            with torch.inference_mode():
                module(*tensors)

        for _ in range(TORCH_WARMUP_RUNS):
            run_torch()
        torch_ms, engine_ms = interleave(
            run_torch,
            lambda: engine.run(checked, check=False),
            min_time_s=min_time_s,
            max_time_s=max_time_s,
            clock=clock or time.perf_counter,
        )
    finally:
        torch.set_num_threads(before)
    return side_by_side(TORCH_EAGER, subject, torch_ms, engine_ms, threads=threads)


def compare_torch_source(
    source: str, engine: EngineBase, settings: BenchSettings, *, trust_pickle: bool = False
) -> tuple[SideBySide, ...]:
    """Time the torch source (entry point, TorchScript, .pt2) side by side with ``engine`` at each batch size."""
    from slipstream.importers.torch_sources import load_torch_module

    module = load_torch_module(source, trust_pickle=trust_pickle)
    return tuple(
        torch_side_by_side(
            module,
            engine,
            example_inputs(engine.inputs, batch, dims=settings.dims, seed=settings.seed),
            subject=f"{engine.bundle.manifest.name} at batch {batch}",
            min_time_s=settings.min_time_s,
            max_time_s=settings.max_time_s,
        )
        for batch in settings.batch_sizes
    )
