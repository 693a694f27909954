"""Model speed: the source framework, onnxruntime fp32 and the build's winner, side by side in one run.

Three models, each at the batch its example recipe measures:
  - the digits CNN (slipstream.demo.digits:build), batch 256: torch eager, ORT fp32, and the winner of
    `slipstream build examples/digits-cnn.yaml` (run here into a temp dir: the `auto` ladder);
  - all-MiniLM-L6-v2 sentence embeddings, batch 32 × 32 tokens of real sentences: torch eager, ORT fp32,
    and int8 dynamic per-channel (the winner of examples/minilm/minilm.yaml);
  - the breast-cancer scikit-learn pipeline of examples/tabular, batch 64: predict_proba, and ORT fp32
    (which is also that build's winner: int8 does not apply to ai.onnx.ml operators).

Variants are timed in interleaved repeats (A B C A B C ...), each repeat a median over many calls;
the table shows the median of the repeat medians, and ratios against the source framework.
Quality next to each: held-out accuracy, or for MiniLM the mean cosine to torch's embeddings.
Torch and onnxruntime both run with --threads intra-op threads (the build also picks 1 here).

    .venv/bin/python benchmarks/model_speed.py [--repeats 5] [--time-s 0.5] [--threads 1] \
        [--out benchmarks/results/model_speed.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

import slipstream  # noqa: E402
from slipstream.artifact import Bundle  # noqa: E402
from slipstream.runtime import Engine  # noqa: E402
from slipstream.runtime.targets import Target  # noqa: E402


@dataclass
class Variant:
    name: str
    call: Callable[[], Any]  # one timed call at the model's batch
    quality: float
    detail: str = ""
    repeats_ms: list[float] = field(default_factory=list)


@dataclass
class ModelRun:
    model: str
    batch: str
    metric: str
    variants: list[Variant]
    note: str = ""


def _time_once(call: Callable[[], Any], budget_s: float) -> float:
    """The median wall time of one call, in ms, over as many calls as fit in ``budget_s`` (at least 5)."""
    call()  # warm
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _load(path: Path, name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _engine(bundle: Bundle, threads: int) -> Engine:
    return Engine(bundle, Target(intra_op_threads=threads))


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(1) == labels).mean())


def digits_cnn(work: Path, threads: int) -> ModelRun:
    import torch

    from slipstream.build.recipe import load_recipe
    from slipstream.build.search import run_build
    from slipstream.demo.digits import build, held_out

    net = build()
    x, y = held_out()
    batch = 256
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))  # the held-out set repeated to 256 rows
    recipe = load_recipe(ROOT / "examples" / "digits-cnn.yaml")
    result = run_build(recipe.model_copy(update={"output": str(work / "digits-cnn")}))
    baseline = Bundle.load(work / "digits-cnn" / "baseline")
    winner = result.winner
    winner_name = result.record.selection.winner if result.record.selection else "baseline"
    fp32, best = _engine(baseline, threads), _engine(winner, threads)
    (name,) = (s.name for s in baseline.manifest.inputs)
    (wname,) = (s.name for s in winner.manifest.inputs)
    tx, txb = torch.from_numpy(x), torch.from_numpy(xb)

    def eager(inp: Any) -> np.ndarray:
        with torch.no_grad():
            return net(inp).numpy()  # type: ignore[no-any-return]

    def first(engine: Engine, feed: str, inp: np.ndarray) -> np.ndarray:
        return next(iter(engine.run({feed: inp}).values()))

    return ModelRun(
        "digits CNN (slipstream.demo.digits)",
        "256 × 1×8×8",
        "held-out accuracy",
        [
            Variant("torch eager fp32", lambda: eager(txb), _accuracy(eager(tx), y)),
            Variant("ORT fp32", lambda: first(fp32, name, xb), _accuracy(first(fp32, name, x), y)),
            Variant(
                f"build winner: {winner_name}",
                lambda: first(best, wname, xb),
                _accuracy(first(best, wname, x), y),
                detail=" → ".join(e.step for e in winner.manifest.lineage),
            ),
        ],
        note=f"The winner of `slipstream build examples/digits-cnn.yaml` (auto ladder), built in this run in "
        f"{result.record.duration_s:.0f} s",
    )


def minilm(work: Path, threads: int) -> ModelRun:
    import torch

    from slipstream.passes.recipe import optimize

    example = _load(ROOT / "examples" / "minilm" / "model.py", "minilm_example")
    encoder = example.build()
    feeds_all = example.tokenize(example.SENTENCES)  # every sentence, 32 tokens
    feeds = {k: v[:32] for k, v in feeds_all.items()}
    baseline = slipstream.convert(
        encoder, work / "minilm", example_inputs=example.example_inputs(), dynamic_axes=["1=seq"],
        output_names=["sentence_embedding"], name="minilm",
    )  # fmt: skip
    int8 = optimize(baseline, [("quantize.dynamic", {"per_channel": True})], work / "minilm-int8", cache=False)
    fp32, q8 = _engine(baseline, threads), _engine(int8, threads)

    def eager(f: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy()  # type: ignore[no-any-return]

    reference = eager(feeds_all)

    def cosine(out: np.ndarray) -> float:
        return float(
            np.mean(np.sum(out * reference, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1))
        )

    return ModelRun(
        "all-MiniLM-L6-v2 sentence embeddings",
        "32 sentences × 32 tokens",
        f"mean cosine to torch ({len(example.SENTENCES)} sentences)",
        [
            Variant("torch eager fp32", lambda: eager(feeds), cosine(reference)),
            Variant("ORT fp32", lambda: fp32.run(feeds), cosine(fp32.run(feeds_all)["sentence_embedding"])),
            Variant(
                "int8 dynamic per-channel (build winner)",
                lambda: q8.run(feeds),
                cosine(q8.run(feeds_all)["sentence_embedding"]),
            ),
        ],
        note="The winner of examples/minilm/minilm.yaml, made here with the same pass (quantize.dynamic, per_channel)",
    )


def tabular(work: Path, threads: int) -> ModelRun:
    train = _load(ROOT / "examples" / "tabular" / "train.py", "tabular_example")
    model = train.train(work / "tabular")
    _, _, x, y = train.split()
    batch = 64
    xb = np.ascontiguousarray(x[:batch])
    bundle = slipstream.convert(model, work / "tabular" / "source", sample={"input": x}, name="breast-cancer")
    fp32 = _engine(bundle, threads)
    return ModelRun(
        "breast-cancer scaler + logistic regression (scikit-learn)",
        "64 × 30",
        "held-out accuracy",
        [
            Variant(
                "scikit-learn predict_proba", lambda: model.predict_proba(xb), _accuracy(model.predict_proba(x), y)
            ),
            Variant(
                "ORT fp32 (= build winner)",
                lambda: fp32.run({"input": xb}),
                _accuracy(fp32.run({"input": x})["probabilities"], y),
            ),
        ],
        note="The build of examples/tabular/tabular.yaml keeps the baseline: no candidate beats it by 5 %",
    )


def measure(runs: list[ModelRun], repeats: int, budget_s: float) -> None:
    for _ in range(repeats):
        for run in runs:
            for v in run.variants:
                v.repeats_ms.append(_time_once(v.call, budget_s))


def render(runs: list[ModelRun], args: argparse.Namespace) -> str:
    import onnxruntime
    import torch

    lines = [
        "## Model speed: source framework vs onnxruntime fp32 vs the build winner",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical cores, **shared with other engineers' work while "
        "measured (noisy)**; "
        f"Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. "
        f"Load average (1 min, which includes this script's own export and build just before) {args.load[0]:.2f} "
        f"before measuring, {args.load[1]:.2f} after: other work ran on the same {os.cpu_count()} cores meanwhile, so "
        "absolute numbers are noisy; the variants of one model are timed interleaved, so their ratios hold up better.",
        f"Command: `.venv/bin/python benchmarks/model_speed.py --repeats {args.repeats} --time-s {args.time_s} "
        f"--threads {args.threads}`.",
        f"Every variant runs with {args.threads} intra-op thread(s). {args.repeats} interleaved repeats of "
        f"≥{args.time_s} s each; p50 = median over repeats of each repeat's median call; spread = min–max of "
        "the repeat medians.",
        "",
    ]
    for run in runs:
        base = statistics.median(run.variants[0].repeats_ms)
        lines += [
            f"### {run.model}, batch {run.batch}",
            "",
            f"| variant | p50 ms | spread ms | speed vs {run.variants[0].name} | {run.metric} |",
            "|---|---|---|---|---|",
        ]
        for v in run.variants:
            p50 = statistics.median(v.repeats_ms)
            lines.append(
                f"| {v.name} | {p50:.3f} | {min(v.repeats_ms):.3f}–{max(v.repeats_ms):.3f} | "
                f"**{base / p50:.2f}×** | {v.quality:.4f} |"
            )
        details = [f"{v.name}: {v.detail}" for v in run.variants if v.detail]
        lines += [""] + ([f"Lineage of {d}." for d in details] if details else [])
        lines += ([run.note + "."] if run.note else []) + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-s", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "model_speed.md")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        runs = [digits_cnn(work, args.threads), minilm(work, args.threads), tabular(work, args.threads)]
        print(f"prepared in {time.perf_counter() - t0:.0f} s; measuring", flush=True)
        before = os.getloadavg()[0]
        measure(runs, args.repeats, args.time_s)
        args.load = (before, os.getloadavg()[0])
        text = render(runs, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
