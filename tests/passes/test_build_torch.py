"""The build from a PyTorch entry point: torch eager timing, pruning + fine-tuning candidates, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slipstream.artifact import Bundle
from slipstream.build.recipe import parse_recipe
from slipstream.build.search import BuildResult, run_build
from slipstream.passes.torch_model import TorchData, TorchModel

ENTRY = """
import torch
from tests.passes.digits_models import small_cnn

def build():
    model = small_cnn()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()
"""


@pytest.fixture(scope="module")
def torch_build(
    trained_cnn: TorchModel, torch_data: tuple[TorchData, TorchData], tmp_path_factory: pytest.TempPathFactory
) -> tuple[BuildResult, BuildResult, Path]:
    work = tmp_path_factory.mktemp("torch-build")
    torch.save(trained_cnn.module.state_dict(), work / "weights.pt")
    (work / "model.py").write_text(f"WEIGHTS = {str(work / 'weights.pt')!r}\n" + ENTRY)
    train, test = torch_data
    np.savez(work / "train.npz", pixels=train.inputs, labels=train.targets)
    np.savez(work / "eval.npz", pixels=test.inputs, labels=test.targets)
    recipe = parse_recipe(
        {
            "name": "digits-cnn",
            "model": f"{work / 'model.py'}:build",
            "input_shape": "batch,1,8,8",
            "data": {"eval": str(work / "eval.npz"), "train": str(work / "train.npz")},
            "budget": {"max_accuracy_drop": 0.02},
            "batch_size": 256,
            "bench_time_s": 0.3,
            "output": str(work / "out"),
            "candidates": [
                {
                    "name": "pruned-50",
                    "passes": [
                        {"prune.structured": {"amount": 0.5}},
                        {"train.finetune": {"epochs": 3, "lr": 0.002}},
                        "export",
                    ],
                },
                {"name": "int8-dynamic", "passes": ["quantize.dynamic"]},
            ],
        }
    )
    return run_build(recipe), run_build(recipe), work


def test_torch_source_is_timed_and_pruned(torch_build: tuple[BuildResult, BuildResult, Path]) -> None:
    first, _, work = torch_build
    record = first.record
    src = record.source_timing
    assert src is not None and src.reference.startswith("torch eager")
    assert src.subject == (record.selection.winner if record.selection else "baseline")
    assert src.threads == record.tuning["chosen"]["intra_op_threads"]  # type: ignore[index]  # matched
    assert record.baseline.lineage == ("import.torch@1",)
    pruned = record.candidate("pruned-50")
    assert pruned.status == "ok", pruned.error
    assert pruned.lineage == ("prune.structured@1", "train.finetune@1", "import.torch@1")
    assert pruned.metrics is not None and record.baseline.metrics is not None
    assert pruned.metrics.quality >= record.baseline.metrics.quality - 0.02
    assert pruned.metrics.size_bytes < record.baseline.metrics.size_bytes / 2.5  # really smaller
    assert any(line.startswith(src.text()[:40]) for line in record.headline)  # shown side by side
    assert (work / "out" / "calibration.npz").is_file()
    Bundle.load(work / "out" / "winner")


def test_second_torch_build_reuses_everything(torch_build: tuple[BuildResult, BuildResult, Path]) -> None:
    first, second, _ = torch_build
    pruned = second.record.candidate("pruned-50")
    assert pruned.cache_hits == 3
    assert [c.metrics for c in second.record.candidates] == [c.metrics for c in first.record.candidates]
    assert second.record.source_timing == first.record.source_timing


def test_bench_compare_times_the_torch_source_on_the_same_inputs(
    torch_build: tuple[BuildResult, BuildResult, Path],
) -> None:
    import json

    from typer.testing import CliRunner

    from slipstream.cli import app

    _, _, work = torch_build
    args = ["bench", str(work / "out" / "winner"), "--batch", "1,32", "--max-time", "0.1", "--json"]
    result = CliRunner().invoke(app, [*args, "--compare", f"{work / 'model.py'}:build"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source_framework"] == "torch eager (fp32)"
    compared = report["comparisons"]
    assert [c["subject"].rsplit(" ", 1)[1] for c in compared] == ["1", "32"]
    assert all(c["threads"] == report["engine"]["intra_op_threads"] for c in compared)  # torch at the same threads
    assert all(c["reference_timing"]["p50_ms"] > 0 and c["subject_timing"]["n"] >= 20 for c in compared)
