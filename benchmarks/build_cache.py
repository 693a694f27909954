"""Build time, cold and cached: the same recipe run twice in one process run.

A trained digits classifier (scikit-learn MLP on load_digits, written as ONNX) goes through the `auto`
ladder under a 1-point accuracy budget. Run 1 starts with an empty pass cache and no measurements; run 2
re-uses both. Repeated `--repeats` times with fresh directories; medians reported.

    .venv/bin/python benchmarks/build_cache.py [--repeats 3] [--out benchmarks/results/build.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.onnx_models import build_trained_digits_mlp

from slipstream.build.recipe import parse_recipe
from slipstream.build.search import run_build


def one_pair(work: Path) -> tuple[float, float, str, int]:
    os.environ["SLIPSTREAM_CACHE_DIR"] = str(work / "cache")
    model, x, y = build_trained_digits_mlp()
    onnx.save_model(model, str(work / "digits.onnx"))
    np.savez(work / "eval.npz", pixels=x, labels=y)
    recipe = parse_recipe(
        {
            "name": "digits",
            "model": str(work / "digits.onnx"),
            "data": {"eval": str(work / "eval.npz")},
            "budget": {"max_accuracy_drop": 0.01},
            "batch_size": 256,
            "output": str(work / "out"),
        }
    )
    t0 = time.perf_counter()
    first = run_build(recipe)
    t1 = time.perf_counter()
    run_build(recipe)
    t2 = time.perf_counter()
    sel = first.record.selection
    return t1 - t0, t2 - t1, sel.winner if sel else "?", len(first.record.candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/build.md"))
    args = parser.parse_args()
    cold, warm, winners = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            c, w, winner, n = one_pair(Path(tmp))
            cold.append(c)
            warm.append(w)
            winners.append(winner)
    cold_m, warm_m = statistics.median(cold), statistics.median(warm)
    text = f"""# Build time: cold vs cached

Machine: {platform.machine()}, {os.cpu_count()} logical cores (shared), Python {platform.python_version()}.
Command: `.venv/bin/python benchmarks/build_cache.py --repeats {args.repeats}`.
Model: scikit-learn MLP (64→64→10) trained on load_digits, as ONNX; recipe: `auto` ladder ({n} candidates),
accuracy budget 1 point, latency at batch 256 (bench_time_s 2.0 per candidate).

| run | median s | all runs s |
|---|---|---|
| cold (empty pass cache, nothing measured) | {cold_m:.2f} | {", ".join(f"{v:.2f}" for v in cold)} |
| cached (same recipe again) | {warm_m:.3f} | {", ".join(f"{v:.3f}" for v in warm)} |
| **speed-up** | **{cold_m / warm_m:.0f}×** | |

Winners chosen: {", ".join(winners)} (on this tiny model the candidates are within run-to-run noise of each other;
the confirmation step re-times a would-be winner alternately with the baseline before it is accepted).
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
