"""Does timing two engines call by call bias the ratio? OpenVINO f32 against onnxruntime fp32, one model.

The build compares a candidate with the baseline (and two finalists with each other) call by call in
alternation (slipstream.evaluate.sidebyside.interleave). onnxruntime's intra-op threads spin for a while after
each call; in alternation they spin on the cores the other engine's next call needs. This script measures the
same pair of engines, the digits CNN (slipstream.demo.digits) at batch 256 on all cores, four ways in one run:
  - call by call, onnxruntime spinning (its default; what the build did before this was measured);
  - call by call, onnxruntime not spinning (what the build's confirmations do now: build/measure.py);
  - call by call, both sides onnxruntime fp32 sessions spinning (the same model twice: the ratio should be 1);
  - in blocks: each engine alone for --block-s seconds at a time, alternating (nothing interleaves).
Each way is repeated --rounds times, in rotation; the table shows the median ratio (OpenVINO speed over
onnxruntime speed) with its range.

    .venv/bin/python benchmarks/interleave_bias.py     # ~1-2 min on 2 cores
Writes benchmarks/results/interleave_bias.md (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engines_cpu import cpu_section  # the same machine lines

from slipstream.evaluate.sidebyside import interleave
from slipstream.runtime import Target, open_engine
from slipstream.runtime.targets import physical_cores

TORCH_SPIN = "torch eager against onnxruntime, call by call, onnxruntime spinning"
TORCH_QUIET = "torch eager against onnxruntime, call by call, onnxruntime not spinning (what the build does now)"
TORCH_ALONE = "torch eager against onnxruntime, in blocks, onnxruntime spinning"


def _block(first: Callable[[], object], second: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Per-call ms of each, timed alone for ``seconds``, one after the other."""
    out = []
    for fn in (first, second):
        fn()
        t0, calls = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            fn()
            calls += 1
        out.append((time.perf_counter() - t0) / calls * 1000)
    return out[0], out[1]


def _call_by_call(first: Callable[[], object], second: Callable[[], object], seconds: float) -> tuple[float, float]:
    a, b = interleave(first, second, min_time_s=seconds, max_time_s=2 * seconds)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block-s", type=float, default=1.0, help="Seconds per way (per engine in blocks).")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "interleave_bias.md")
    args = parser.parse_args()
    started = time.perf_counter()

    import torch

    import slipstream
    from slipstream.demo import digits
    from slipstream.passes import load_pass, lookup

    x, _ = digits.held_out()
    feeds = {"pixels": x[:256]}
    with tempfile.TemporaryDirectory(prefix="interleave-bias-") as tmp:
        work = Path(tmp)
        base = slipstream.convert(
            digits.build(), work / "cnn", example_inputs=(torch.from_numpy(x[:2]),), input_names=["pixels"], name="cnn"
        )
        step = load_pass(lookup("engine.openvino"))
        ov_bundle = step.run(base, work / "ov", step.make_config({"precision": "f32"})).bundle
        t = args.threads
        ort_spin = open_engine(base, Target(intra_op_threads=t, intra_op_spinning=True))
        ort_spin_2 = open_engine(base, Target(intra_op_threads=t, intra_op_spinning=True))
        ort_quiet = open_engine(base, Target(intra_op_threads=t, intra_op_spinning=False))
        ov = open_engine(ov_bundle, Target(intra_op_threads=t))

        def run(engine: object) -> Callable[[], object]:
            return lambda: engine.run(feeds, check=False)  # type: ignore[attr-defined]

        ways: dict[str, Callable[[], tuple[float, float]]] = {
            "call by call, onnxruntime spinning": lambda: _call_by_call(run(ort_spin), run(ov), args.block_s),
            "call by call, onnxruntime not spinning": lambda: _call_by_call(run(ort_quiet), run(ov), args.block_s),
            "in blocks, onnxruntime spinning": lambda: _block(run(ort_spin), run(ov), args.block_s / 2),
        }
        control = "call by call, onnxruntime fp32 twice (both spinning; the ratio should be 1)"
        ways[control] = lambda: _call_by_call(run(ort_spin), run(ort_spin_2), args.block_s)
        # The build's "N× torch eager" line: torch's own module against onnxruntime, the same batch.
        net, pixels = digits.build().eval(), torch.from_numpy(x[:256])
        torch.set_num_threads(t)

        def eager() -> object:
            with torch.inference_mode():
                return net(pixels)

        ways[TORCH_SPIN] = lambda: _call_by_call(run(ort_spin), eager, args.block_s)
        ways[TORCH_QUIET] = lambda: _call_by_call(run(ort_quiet), eager, args.block_s)
        ways[TORCH_ALONE] = lambda: _block(run(ort_spin), eager, args.block_s / 2)
        ratios: dict[str, list[float]] = {w: [] for w in ways}
        times: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        names = list(ways)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                ort_ms, other_ms = ways[name]()
                ratios[name].append(ort_ms / other_ms)
                times[name].append((ort_ms, other_ms))

    lines = [
        "# Timing two engines call by call: the bias of onnxruntime's spinning threads",
        "",
        *cpu_section(args.threads),
        f"- command: `python benchmarks/interleave_bias.py {' '.join(sys.argv[1:])}`",
        "",
        f"digits CNN, batch 256, {args.threads} threads each; {args.rounds} rounds, the ways rotated each round. "
        "Ratio: onnxruntime ms / the other side's ms (> 1: the other side is faster; < 1: onnxruntime is).",
        "",
        "| way | onnxruntime ms | other side ms | ratio (median) | range |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        o = statistics.median(t[0] for t in times[name])
        v = statistics.median(t[1] for t in times[name])
        rs = ratios[name]
        lines.append(f"| {name} | {o:.2f} | {v:.2f} | **{statistics.median(rs):.2f}** | {min(rs):.2f}-{max(rs):.2f} |")
    spin, quiet = statistics.median(ratios[names[0]]), statistics.median(ratios[names[1]])
    blocks = statistics.median(ratios[names[2]])
    lines += [
        "",
        f"OpenVINO against onnxruntime: {spin:.2f}× call by call with spinning, {quiet:.2f}× without, "
        f"{blocks:.2f}× in blocks. The build's confirmations run onnxruntime without spinning (build/measure.py).",
        "",
        "onnxruntime against torch eager (the build's 'N× torch eager'): "
        f"{1 / statistics.median(ratios[TORCH_SPIN]):.2f}× call by call with spinning, "
        f"{1 / statistics.median(ratios[TORCH_QUIET]):.2f}× without, "
        f"{1 / statistics.median(ratios[TORCH_ALONE]):.2f}× in blocks. torch's time moves with what ran just "
        "before it on the same cores; the build and `bench --compare` time it against onnxruntime not spinning.",
        "",
        f"Total time: {time.perf_counter() - started:.0f} s.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
