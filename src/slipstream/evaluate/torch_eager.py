"""The source framework's own speed: a torch module in eager mode, timed like an engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

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

    return time_batch(run, batch, settings)
