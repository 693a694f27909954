"""Robust accuracy of the digits CNN after compression: how static int8 and structured pruning change it against fp32.

One run: the demo's digits CNN (slipstream.demo.digits, trained and cached on first use) is exported as fp32,
quantized (static int8, calibrated on the training digits), pruned (50 % of channels + fine-tuning) and
pruned then quantized. FGSM and PGD examples (ε = 2 % and 5 % of the input range, PGD 10 steps) are crafted
once on the torch source and sent to every model (transfer, as the build does); uniform noise and SimBA
(black-box, on each model's own onnxruntime session) run at the same ε, once per seed. Speed: p50 at batch
256, 1 intra-op thread, the models interleaved over repeats. The run's own time is reported.

    .venv/bin/python benchmarks/robustness.py [--examples 497] [--seeds 3] [--repeats 7]
    .venv/bin/python benchmarks/robustness.py --quick     # proves the script works (minutes less, noisier)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slipstream.artifact.bundle import Bundle  # noqa: E402
from slipstream.build.robustness import session_predict  # noqa: E402
from slipstream.demo.digits import build, split  # noqa: E402
from slipstream.evaluate.bench import BenchSettings, bench  # noqa: E402
from slipstream.evaluate.robust import AttackSet, RobustnessConfig, craft, evaluate, prepare  # noqa: E402
from slipstream.importers import convert  # noqa: E402
from slipstream.passes.recipe import optimize  # noqa: E402
from slipstream.passes.torch_model import TorchData, TorchModel  # noqa: E402
from slipstream.passes.torch_recipe import optimize_torch  # noqa: E402
from slipstream.runtime import Engine, Target  # noqa: E402
from slipstream.runtime.targets import cpu_model  # noqa: E402

EPS = (0.02, 0.05)
COLUMNS = [("fgsm", 0.02), ("pgd", 0.02), ("fgsm", 0.05), ("pgd", 0.05), ("uniform", 0.05), ("simba", 0.05)]
NAMES = {"fgsm": "FGSM", "pgd": "PGD", "uniform": "uniform", "simba": "SimBA"}
WHITE_BOX = "torch source, white-box"
UNSTABLE = 0.25  # a timing whose (max - min) / median over repeats is wider than this is shown as unstable


def _bundles(work: Path, finetune_epochs: int) -> dict[str, Bundle]:
    import torch

    x_train, y_train, x_test, y_test = split()
    np.savez(work / "calib.npz", pixels=x_train[:512])
    fp32 = convert("slipstream.demo.digits:build", work / "fp32", input_shapes=["batch,1,8,8"])
    int8 = ("quantize.static", {"data": str(work / "calib.npz"), "per_channel": True})
    model = TorchModel(build(), (torch.zeros(1, 1, 8, 8),))
    tune = f"train.finetune:epochs={finetune_epochs},lr=0.002,patience=3"
    pruned = optimize_torch(
        model, ["prune.structured:amount=0.5", tune, "export"], work / "pruned",
        train=TorchData(x_train, y_train), eval_data=TorchData(x_test, y_test),
    )  # fmt: skip
    return {
        "fp32": fp32,
        "int8 static": optimize(fp32, [int8], work / "int8", cache=False),
        "pruned 50 % + fine-tune": pruned,
        "pruned 50 % + int8": optimize(pruned, [int8], work / "pruned-int8", cache=False),
    }


def _robust(bundles: dict[str, Bundle], examples: int, seeds: int) -> tuple[dict[str, dict[str, list[float]]], float]:
    """Per model, per column: accuracies over seeds (FGSM/PGD are deterministic: one value per seed, equal)."""
    _, _, x_test, y_test = split()
    config = RobustnessConfig(eps_of_range=EPS, examples=examples)
    started = time.perf_counter()
    engines = {k: Engine(b, Target(intra_op_threads=1)) for k, b in bundles.items()}
    base = session_predict(engines["fp32"])
    out: dict[str, dict[str, list[float]]] = {k: {} for k in bundles}
    for seed in range(seeds):
        prepared = prepare({"pixels": x_test}, y_test, base, config, seed)
        if not isinstance(prepared, AttackSet):
            raise SystemExit(f"robustness does not apply: {prepared}")
        attack_set, source = craft(prepared, build(), threads=1)
        white = out.setdefault(WHITE_BOX, {})
        for r in source:
            white.setdefault(f"{r.attack}@{r.eps_of_range}", []).append(r.accuracy)
        for name, engine in engines.items():
            robust = evaluate(session_predict(engine), attack_set)
            out[name].setdefault("clean", []).append(
                float("nan") if robust.clean_accuracy is None else robust.clean_accuracy
            )
            for attack, eps in COLUMNS:
                value = robust.accuracy(attack, eps)
                out[name].setdefault(f"{attack}@{eps}", []).append(float("nan") if value is None else value)
    return out, time.perf_counter() - started


def _timings(bundles: dict[str, Bundle], repeats: int) -> dict[str, list[float]]:
    _, _, x_test, _ = split()
    feeds = {256: {"pixels": np.ascontiguousarray(np.resize(x_test, (256, 1, 8, 8)))}}
    settings = BenchSettings(batch_sizes=(256,), warmup_runs=5, min_time_s=0.3, max_time_s=0.6)
    engines = {k: Engine(b, Target(intra_op_threads=1)) for k, b in bundles.items()}
    timings: dict[str, list[float]] = {k: [] for k in bundles}
    for _ in range(repeats):  # interleaved: every model once per round
        for name, engine in engines.items():
            timings[name].append(bench(lambda e=engine: e, settings, feeds=feeds).results[0].p50_ms)
    return timings


def _cell(values: list[float], base: list[float]) -> str:
    mid, ref = statistics.median(values), statistics.median(base)
    spread = f" [{100 * min(values):.1f}–{100 * max(values):.1f}]" if max(values) > min(values) else ""
    return f"{100 * mid:.1f}{spread} ({100 * (mid - ref):+.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=497, help="held-out rows attacked (497: all of them)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the noise and SimBA (their spread)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="128 rows, 1 seed, 3 repeats, 2 fine-tune epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness.md")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.seeds, args.repeats = 128, 1, 3
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SLIPSTREAM_CACHE_DIR"] = str(work / "cache")
        bundles = _bundles(work, 2 if args.quick else 8)
        made_s = time.perf_counter() - started
        robust, robust_s = _robust(bundles, args.examples, args.seeds)
        timings = _timings(bundles, args.repeats)
    total_s = time.perf_counter() - started
    med = {k: statistics.median(v) for k, v in timings.items()}
    rows = []
    for name in bundles:
        spread = (max(timings[name]) - min(timings[name])) / med[name]
        speed = f"{med[name]:.3f} ({med['fp32'] / med[name]:.2f}×)" + (" unstable" if spread > UNSTABLE else "")
        cells = [_cell(robust[name]["clean"], robust["fp32"]["clean"])]
        cells += [_cell(robust[name][f"{a}@{e}"], robust["fp32"][f"{a}@{e}"]) for a, e in COLUMNS]
        rows.append(f"| {name} | {speed} | " + " | ".join(cells) + " |")
    white = robust.get(WHITE_BOX, {})
    cells = [_cell(white[f"{a}@{e}"], robust["fp32"][f"{a}@{e}"]) if f"{a}@{e}" in white else "–" for a, e in COLUMNS]
    rows.append(f"| {WHITE_BOX} | – | – | " + " | ".join(cells) + " |")
    head = " | ".join(f"{NAMES[a]} ε {e:g}" for a, e in COLUMNS)
    command = "benchmarks/robustness.py" + (" --quick" if args.quick else "")
    text = f"""## Robust accuracy after compression (digits CNN)

CPU: {cpu_model()} ({os.cpu_count()} logical cores{", shared: noisy" if args.quick else ""}); {platform.machine()},
Python {platform.python_version()}. Command: `.venv/bin/python {command}` ({args.examples} held-out rows,
{args.seeds} seed(s), {args.repeats} timing rounds).

FGSM and PGD (10 steps) are crafted on the torch source and sent to every model (transfer, as `slipstream
build` does); uniform noise and SimBA (32 pixels per row, ±ε) attack each model's own onnxruntime session.
The last row is the source's own accuracy on the examples crafted on it:
PGD is stronger than FGSM there, but a transferred PGD example need not be stronger than a transferred FGSM
one. ε is a fraction of the input range [0, 1]. Accuracy in %, median over seeds [min–max when they differ]
(change against fp32). p50 ms at batch 256, 1 thread, models interleaved over {args.repeats} rounds
(speed-up against fp32; "unstable" when max − min over the rounds exceeds {UNSTABLE:.0%} of the median).

| model | p50 ms (speed-up) | clean | {head} |
|---|---|---|{"---|" * len(COLUMNS)}
{chr(10).join(rows)}

Run time: {total_s:.0f} s in all ({made_s:.0f} s to export, prune, fine-tune and quantize; {robust_s:.1f} s for
every attack on every model over {args.seeds} seed(s); the rest timing).
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
