"""The source framework's own speed: a torch module in eager mode, timed like an engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from slipstream.artifact.tensor import TensorSpec
from slipstream.data.synthetic import example_inputs
from slipstream.evaluate.bench import BatchResult, BenchSettings, time_batch


def time_torch_eager(
    module: Any, feeds: Mapping[str, np.ndarray], settings: BenchSettings, *, threads: int | None = None
) -> BatchResult:
    """Latency of ``module(*inputs)`` under ``torch.inference_mode()``, inputs in ``feeds`` order."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
    batch = len(next(iter(feeds.values())))
    module.eval()

    def run() -> None:
        with torch.inference_mode():
            module(*tensors)

    # torch's first calls build its kernels and grow its allocator: warm it up well, to be fair to it.
    warmed = settings.model_copy(update={"warmup_runs": max(settings.warmup_runs, 20)})
    return time_batch(run, batch, warmed)


def compare_torch_source(
    source: str, specs: Sequence[TensorSpec], settings: BenchSettings, *, trust_pickle: bool = False
) -> tuple[BatchResult, ...]:
    """Time the torch source (entry point, TorchScript, .pt2) in eager mode on the inputs bench uses."""
    from slipstream.importers.torch_sources import load_torch_module

    module = load_torch_module(source, trust_pickle=trust_pickle)
    return tuple(
        time_torch_eager(module, example_inputs(specs, batch, dims=settings.dims, seed=settings.seed), settings)
        for batch in settings.batch_sizes
    )
