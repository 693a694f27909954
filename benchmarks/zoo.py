"""The model zoo (issue 19): every tests/zoo entry converted, proven, quantized, timed and served, in one table.

    .venv/bin/python benchmarks/zoo.py            # every entry, longer timings
    .venv/bin/python benchmarks/zoo.py --quick    # shorter timings (conversions are the same)
    .venv/bin/python benchmarks/zoo.py --only torch-mlp,lightgbm

Per entry: the convert time (the importer only: export, parity proof, bundle write), the parity proof's largest
error against the framework, quantize.dynamic's int8 model timed side by side with the fp32 one (alternating
calls, one onnxruntime thread each, as the server runs them; 'unstable' when either p90 is over 2× its p50),
the int8 model's fidelity on the entry's request (largest |int8 - fp32| for float outputs, agreement for labels),
and whether one real server on loopback answered the request as the framework itself does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["HF_HUB_OFFLINE"] = "1"  # the transformers entries come from configs: nothing may download

import httpx  # noqa: E402
from tests.zoo.harness import (  # noqa: E402
    Converted,
    ask,
    check_answer,
    client_feeds,
    convert_entry,
    integer_ops,
    quantize_entry,
)
from tests.zoo.models import ZOO  # noqa: E402

from slipstream.evaluate.sidebyside import interleave, side_by_side  # noqa: E402
from slipstream.runtime.engine import Engine  # noqa: E402
from slipstream.runtime.targets import Target, cpu_model  # noqa: E402
from slipstream.serve.background import ServerThread  # noqa: E402
from slipstream.serve.settings import ServeSettings  # noqa: E402

BATCH = 32  # rows per timed call: the entry's request repeated


@dataclass
class Row:
    name: str
    framework: str
    kind: str
    convert: str = "—"
    parity: str = "—"
    speed: str = "—"
    fidelity: str = "—"
    served: str = "—"
    note: str = ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _fidelity(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray]) -> str:
    parts = []
    for name, ref in fp32.items():
        got = int8[name]
        if ref.dtype.kind in "fc":
            parts.append(f"{name}: max Δ {float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0)):.3g}")
        else:
            parts.append(f"{name}: {100 * float(np.mean(got == ref)):.0f} % same")
    return "; ".join(parts)


def measure_int8(converted: Converted, work: Path, *, quick: bool) -> tuple[str, str, str]:
    """(speed, fidelity, note) of quantize.dynamic's model against the fp32 bundle."""
    quantized, said = quantize_entry(converted, work / "int8" / converted.entry.name)
    note = "; ".join(s.split(": ", 1)[-1] for s in said)
    if not integer_ops(quantized):
        return "— (nothing to quantize)", "—", note
    target = Target(intra_op_threads=1)
    fp32, int8 = Engine(converted.bundle, target), Engine(quantized, target)
    feeds = fp32.check_inputs(client_feeds(converted, rows=BATCH))
    fidelity = _fidelity(fp32.run(feeds, check=False), int8.run(feeds, check=False))
    ref_ms, sub_ms = interleave(
        lambda: fp32.run(feeds, check=False),
        lambda: int8.run(feeds, check=False),
        warmup_runs=3 if quick else 10,
        min_runs=10 if quick else 50,
        min_time_s=0.1 if quick else 1.0,
        max_time_s=0.5 if quick else 3.0,
    )
    timing = side_by_side("fp32", "int8", ref_ms, sub_ms, threads=1)
    speed = (
        f"{timing.ratio_text()} ({timing.reference_timing.p50_ms:.3f} → {timing.subject_timing.p50_ms:.3f} ms p50; "
        f"p90 {timing.reference_timing.p90_ms:.3f} / {timing.subject_timing.p90_ms:.3f}; n={timing.subject_timing.n})"
    )
    return speed, fidelity, note


def run(names: list[str] | None, *, quick: bool) -> list[Row]:
    rows: list[Row] = []
    done: list[tuple[Row, Converted]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("SLIPSTREAM_CACHE_DIR", str(work / "cache"))
        for entry in ZOO:
            if names and entry.name not in names:
                continue
            row = Row(entry.name, entry.framework, entry.kind)
            rows.append(row)
            print(f"  {entry.name} ...", flush=True)
            try:
                converted = convert_entry(entry, work)
            except Exception as exc:  # a table row per entry: the failure is the result
                row.convert = f"✗ {_first_line(exc)}"
                continue
            row.convert, row.parity = f"{converted.convert_s:.2f} s", f"{converted.parity_max_error:.2g}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row.speed, row.fidelity, row.note = measure_int8(converted, work, quick=quick)
            except Exception as exc:
                row.speed = f"✗ {_first_line(exc)}"
            done.append((row, converted))
        settings = ServeSettings(port=0, access_log=False)
        with ServerThread(work / "bundles", settings) as server, httpx.Client(base_url=server.url, timeout=60) as c:
            for row, converted in done:
                try:
                    worst = check_answer(converted, ask(c, converted))
                    row.served = f"✓ (max Δ {worst:.2g})"
                except Exception as exc:
                    row.served = f"✗ {_first_line(exc)}"
    return rows


def render(rows: list[Row], command: str, seconds: float) -> str:
    table = "\n".join(
        f"| {r.name} | {r.framework} | {r.kind} | {r.convert} | {r.parity} | {r.speed} | {r.fidelity} | {r.served} |"
        for r in rows
    )
    said: dict[str, list[str]] = {}
    for r in rows:
        if r.note:
            said.setdefault(r.note, []).append(r.name)
    notes = "\n".join(f'- {", ".join(names)}: quantize.dynamic said "{note}"' for note, names in said.items())
    ok = sum(r.served.startswith("✓") for r in rows)
    return f"""# Model zoo: {len(rows)} models from {len({r.framework for r in rows})} frameworks ({ok} served ✓)

CPU: {cpu_model()} ({os.cpu_count()} logical cores). Command: `{command}` ({seconds:.0f} s in all).
The models are tests/zoo's (built from code in seconds, nothing downloaded; the same run as `pytest tests/zoo`).
Convert: the importer's wall time (export, parity proof against the framework, bundle write); the first torch
entry also pays the exporter's one-time imports. Timings were taken on a shared machine: compare within a row.
Parity: the largest |onnx − framework| over the importer's parity cases.
int8 vs fp32: quantize.dynamic's bundle against the fp32 one, batch {BATCH}, one onnxruntime thread each, timed
in alternation ("unstable (...)" when either p90 is over 2× its p50); > 1× means int8 is faster.
int8 fidelity: on the entry's request rows, largest |int8 − fp32| per float output, share of equal labels.
Served: one server on loopback serving every bundle; the answer to one request compared with the framework's own.

| model | framework | kind | convert | parity max error | int8 vs fp32 | int8 fidelity | served |
|---|---|---|---|---|---|---|---|
{table}

{notes}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Shorter int8/fp32 timings (under ~2 minutes).")
    parser.add_argument("--only", default="", help="Comma-separated entry names (default: the whole zoo).")
    parser.add_argument("--out", type=Path, default=None, help="Default: benchmarks/results/zoo.md.")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or None
    command = (
        "python benchmarks/zoo.py" + (" --quick" if args.quick else "") + (f" --only {args.only}" if names else "")
    )
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)\ncommand: {command}", flush=True)
    started = time.perf_counter()
    rows = run(names, quick=args.quick)
    text = render(rows, command, time.perf_counter() - started)
    print(text)
    out = args.out or ROOT / "benchmarks" / "results" / "zoo.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}; `python benchmarks/run_all.py --assemble` puts it in BENCHMARKS.md")


if __name__ == "__main__":
    main()
