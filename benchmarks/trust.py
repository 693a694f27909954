"""Can the build's numbers be trusted? The digits recipe built twice: quiet, then beside CPU-burning processes.

For each build it reads run.json and prints the winner's gain over torch eager (timed side by side, torch at
the winner's threads, see evaluate/sidebyside.py) with both spreads, and checks that:
- the gain moved by at most 25 % between the quiet and the loaded build, or the loaded one is marked
  "unstable (...)" instead of printed as a number;
- every "N.NN×" in each headline is a side-by-side ratio recorded in run.json (build/report.py
  headline_mismatches).

    .venv/bin/python benchmarks/trust.py [--quick] [--out FILE]

--quick: a short ladder (no pruning or fine-tuning) and short timings, under two minutes here. Without it, the
recipe as shipped (examples/digits-cnn.yaml, `candidates: auto`). Each build gets a fresh output directory
(no measurement is re-used between the two); the pass cache is shared, so the second build does not redo
the conversions.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slipstream.build.recipe import load_recipe  # noqa: E402
from slipstream.build.record import RunRecord  # noqa: E402
from slipstream.build.report import headline_mismatches  # noqa: E402
from slipstream.build.search import run_build  # noqa: E402
from slipstream.runtime.targets import cpu_model  # noqa: E402

MAX_MOVE = 0.25


def _burn() -> None:
    while True:  # a CPU-bound neighbour, as other jobs on a shared machine are
        sum(i * i for i in range(10_000))


def build(work: Path, name: str, *, quick: bool, burners: int) -> RunRecord:
    recipe = load_recipe(ROOT / "examples" / "digits-cnn.yaml")
    update: dict[str, object] = {"output": str(work / name)}
    if quick:
        update["candidates"] = (
            {"name": "optimized", "passes": ("graph.optimize",)},
            {"name": "int8-static", "passes": ({"quantize.static": {"per_channel": True}},)},
        )
        update["bench_time_s"] = 0.5
    raw = {**recipe.model_dump(mode="json"), **update}
    recipe = type(recipe).model_validate(raw)
    procs = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(burners)]
    for p in procs:
        p.start()
    try:
        started = time.perf_counter()
        record = run_build(recipe).record
        print(f"  {name}: built in {time.perf_counter() - started:.1f} s with {burners} CPU burners", flush=True)
    finally:
        for p in procs:
            p.terminate()
            p.join()
    return record


def _row(label: str, r: RunRecord) -> str:
    src = r.source_timing
    winner = r.selection.winner if r.selection else "-"
    if src is None:
        return f"| {label} | {winner} | – | – | – | – |"
    t, w = src.reference_timing, src.subject_timing
    return (
        f"| {label} | {winner} | {src.threads} | {t.p50_ms:.3f} / {t.p90_ms:.3f} (n={t.n}) | "
        f"{w.p50_ms:.3f} / {w.p90_ms:.3f} | {src.ratio_text()} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short ladder and timings (under ~2 minutes).")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 2, help="CPU-burning processes.")
    parser.add_argument(
        "--out", type=Path, default=None, help="Where to write the section (default: benchmarks/results/trust.md)."
    )
    args = parser.parse_args()
    command = "python benchmarks/trust.py" + (" --quick" if args.quick else "")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)\ncommand: {command}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SLIPSTREAM_CACHE_DIR", str(Path(tmp) / "cache"))
        quiet = build(Path(tmp), "quiet", quick=args.quick, burners=0)
        loaded = build(Path(tmp), "loaded", quick=args.quick, burners=args.burners)
    lines = []
    for label, r in (("quiet", quiet), ("loaded", loaded)):
        bad = headline_mismatches(r)
        lines.append(f"- {label}: headline ratios match run.json: {'yes' if not bad else 'NO: ' + '; '.join(bad)}")
        lines.extend(f"  - `{line}`" for line in r.headline)
    q, ld = quiet.source_timing, loaded.source_timing
    if q is None or ld is None:
        verdict = "no torch eager comparison was made (not a torch source?)"
    elif ld.unstable or q.unstable:
        verdict = "marked unstable (no number shown): pass"
    else:
        move = abs(ld.ratio - q.ratio) / q.ratio
        verdict = f"moved by {100 * move:.1f} % ({q.ratio:.2f}× → {ld.ratio:.2f}×): " + (
            "pass" if move <= MAX_MOVE else f"FAIL (> {100 * MAX_MOVE:.0f} %)"
        )
    text = f"""
## Trust: the digits recipe, quiet and beside {args.burners} CPU burners

CPU: {cpu_model()} ({os.cpu_count()} logical cores). Command: `{command}`.
Gain over torch eager: torch and the winner timed in alternation, torch at the winner's tuned threads, after
warm-up; "unstable (...)" when either side's p90 is more than 2× its p50.

| build | winner | threads | torch eager p50 / p90 ms | winner p50 / p90 ms | winner vs torch eager |
|---|---|---|---|---|---|
{_row("quiet", quiet)}
{_row("loaded", loaded)}

Gain over torch eager between the two builds: {verdict}.

{chr(10).join(lines)}
"""
    print(text)
    out = args.out or Path(__file__).resolve().parent / "results" / "trust.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text.replace("\n## Trust", "# Trust", 1), encoding="utf-8")
    print(f"wrote {out}; `python benchmarks/run_all.py --assemble` puts it in BENCHMARKS.md")


if __name__ == "__main__":
    main()
