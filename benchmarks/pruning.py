"""Structured pruning + fine-tuning on the digits CNN: accuracy and onnxruntime speed against the unpruned model.

One run: the demo's digits CNN (trained and cached by slipstream.demo.digits) is exported as is and after
`prune.structured` (50 % and 75 % of channels, L2 importance) followed by `train.finetune`; each bundle is
timed at batch 256 in onnxruntime fp32 (1 and 2 intra-op threads), the variants interleaved over repeats,
medians reported. Accuracy on the 497 held-out digits.

    .venv/bin/python benchmarks/pruning.py [--repeats 7] [--out benchmarks/results/pruning.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slipstream.artifact.bundle import Bundle  # noqa: E402
from slipstream.demo.digits import build, split  # noqa: E402
from slipstream.evaluate.bench import BenchSettings, bench  # noqa: E402
from slipstream.importers import convert  # noqa: E402
from slipstream.passes.torch_model import TorchData, TorchModel  # noqa: E402
from slipstream.passes.torch_recipe import optimize_torch  # noqa: E402
from slipstream.runtime import Engine, Target  # noqa: E402


def _accuracy(bundle: Bundle, x: np.ndarray, y: np.ndarray) -> float:
    engine = Engine(bundle, Target(intra_op_threads=1))
    logits = engine.run({"pixels": x})[engine.outputs[0].name]
    return float((logits.argmax(axis=1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pruning.md")
    args = parser.parse_args()
    import torch

    x_train, y_train, x_test, y_test = split()
    module = build()
    model = TorchModel(module, (torch.zeros(1, 1, 8, 8),))
    train, test = TorchData(x_train, y_train), TorchData(x_test, y_test)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SLIPSTREAM_CACHE_DIR"] = str(work / "cache")
        bundles = {"unpruned": convert("slipstream.demo.digits:build", work / "base", input_shapes=["batch,1,8,8"])}
        macs: dict[str, float] = {"unpruned": 1.0}
        for amount in (0.5, 0.75):
            name = f"pruned {int(amount * 100)} % + fine-tune"
            bundles[name] = optimize_torch(
                model,
                [f"prune.structured:amount={amount}", "train.finetune:epochs=8,lr=0.002,patience=3", "export"],
                work / name.replace(" ", "-").replace("%", "pct").replace("+", "and"),
                train=train,
                eval_data=test,
            )
            stats = bundles[name].manifest.metrics["prune.structured@1"]
            macs[name] = float(stats["macs_ratio"]) if isinstance(stats, dict) else float("nan")  # type: ignore[arg-type]
        accuracy = {k: _accuracy(b, x_test, y_test) for k, b in bundles.items()}
        feeds = {256: {"pixels": np.ascontiguousarray(np.resize(x_test, (256, 1, 8, 8)))}}
        settings = BenchSettings(batch_sizes=(256,), warmup_runs=5, min_time_s=0.3, max_time_s=0.6)
        timings: dict[tuple[str, int], list[float]] = {(k, t): [] for k in bundles for t in (1, 2)}
        engines = {(k, t): Engine(b, Target(intra_op_threads=t)) for k, b in bundles.items() for t in (1, 2)}
        for _ in range(args.repeats):
            for key, engine in engines.items():
                timings[key].append(bench(lambda e=engine: e, settings, feeds=feeds).results[0].p50_ms)
        sizes = {k: b.size_bytes for k, b in bundles.items()}
    med = {k: statistics.median(v) for k, v in timings.items()}
    base_acc = accuracy["unpruned"]
    rows = []
    for name in bundles:
        rows.append(
            f"| {name} | {100 * accuracy[name]:.2f} ({100 * (accuracy[name] - base_acc):+.2f}) | {macs[name]:.1f}× | "
            f"{sizes[name] / 1024:.0f} | {med[(name, 1)]:.3f} | {med[('unpruned', 1)] / med[(name, 1)]:.2f}× | "
            f"{med[(name, 2)]:.3f} | {med[('unpruned', 2)] / med[(name, 2)]:.2f}× |"
        )
    text = f"""## Structured pruning + fine-tuning (digits CNN)

Machine: {platform.machine()}, {os.cpu_count()} logical cores (shared), Python {platform.python_version()}.
Command: `.venv/bin/python benchmarks/pruning.py --repeats {args.repeats}`.
Digits CNN from `slipstream.demo.digits` (3 convs with batch norm + 2 linear layers); `prune.structured`
(torch-pruning dependency graph, L2 importance, output layer kept) then `train.finetune` (Adam, cosine
decay, clipping, early stopping on held-out accuracy), exported by dynamo with a parity proof.
onnxruntime fp32 at batch 256, variants interleaved, median of {args.repeats} repeats.

| model | held-out accuracy % (change) | fewer MACs | KiB | p50 ms, 1 thread | speed-up | p50 ms, 2 threads | speed-up |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
