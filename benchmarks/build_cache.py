"""The build of examples/digits-cnn.yaml: cold, then cached, with the winner against torch eager.

Each repeat runs `slipstream build` twice, as a user would (a new process each time, imports
included), into a fresh output directory and a fresh pass cache: run 1 converts, tries every candidate
of the `auto` ladder (including structured pruning + fine-tuning) and measures them; run 2 re-uses the
conversion, the pass cache, the pruned candidates and the measurements.

    .venv/bin/python benchmarks/build_cache.py [--repeats 2] [--out benchmarks/results/build.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from slipstream.build.recipe import load_recipe  # noqa: E402
from slipstream.build.record import RunRecord  # noqa: E402

SLIPSTREAM = Path(sys.executable).with_name("slipstream")


def _build(recipe_file: Path, env: dict[str, str]) -> float:
    """Wall time of `slipstream build RECIPE` as a user runs it (process start and imports included)."""
    t0 = time.perf_counter()
    subprocess.run([str(SLIPSTREAM), "build", str(recipe_file), "--json"], check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def one_pair(work: Path) -> dict[str, object]:
    recipe = load_recipe(ROOT / "examples" / "digits-cnn.yaml").model_copy(update={"output": str(work / "out")})
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    env = {**os.environ, "SLIPSTREAM_CACHE_DIR": str(work / "cache")}
    cold = _build(recipe_file, env)
    warm = _build(recipe_file, env)
    record = RunRecord.model_validate_json((work / "out" / "run.json").read_text())
    sel = record.selection
    winner = record.candidate(sel.winner if sel else "baseline")
    base = record.baseline.metrics
    drop = (base.quality - winner.metrics.quality) if base and winner.metrics else float("nan")
    eager = record.source_timing
    return {
        "cold": cold,
        "warm": warm,
        "winner": winner.name,
        "vs_eager": eager.ratio if eager else float("nan"),  # torch eager vs the winner, side by side
        "drop": drop,
        "candidates": len(record.candidates),
        "rejected": len(sel.rejections) if sel else 0,
        "line": eager.text() if eager else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build.md")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_pair(Path(tmp)))
    cold = statistics.median(float(r["cold"]) for r in runs)  # type: ignore[arg-type]
    warm = statistics.median(float(r["warm"]) for r in runs)  # type: ignore[arg-type]
    rows = "\n".join(
        f"| {i + 1} | {r['cold']:.1f} | {r['warm']:.2f} | {r['winner']} | {r['vs_eager']:.2f}× | "
        f"{100 * float(r['drop']):+.2f} | {r['candidates']} ({r['rejected']} rejected) |"  # type: ignore[arg-type]
        for i, r in enumerate(runs)
    )
    text = f"""## Build: examples/digits-cnn.yaml, cold and cached

Machine: {platform.machine()}, {os.cpu_count()} logical cores (shared), Python {platform.python_version()}.
Command: `.venv/bin/python benchmarks/build_cache.py --repeats {args.repeats}`.
Recipe: the digits CNN (torch entry point), `auto` ladder, at most 1 point of accuracy, latency at batch 256.
The model is trained once and cached by the example itself before the first repeat is timed.

| repeat | cold s | cached s | winner | vs torch eager (p50, b=256) | accuracy, points | candidates |
|---|---|---|---|---|---|---|
{rows}

Median cold build **{cold:.1f} s**, cached **{warm:.2f} s**: the second run is **{cold / warm:.1f}× faster**.
Last run: {runs[-1]["line"]}.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
