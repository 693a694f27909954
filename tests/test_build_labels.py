"""Builds without labels: a label-free metric needs none; fine-tuning is skipped with its reason; data
problems stop the build before the source is converted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slipstream.build.recipe import Recipe, parse_recipe
from slipstream.build.search import run_build
from slipstream.errors import DataError

FEATURES = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
# What every recipe here shares: a small, quick build with a label-free metric.
QUICK = {"metric": "cosine", "budget": {"max_accuracy_drop": 0.01}, "batch_size": 16, "bench_time_s": 0.1}


def _recipe(tmp_path: Path, **fields: object) -> Recipe:
    return parse_recipe({**QUICK, "output": str(tmp_path / "out"), **fields})


def test_finetuning_is_skipped_with_its_reason_when_there_are_no_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "eval.npz", features=FEATURES)  # no labels anywhere
    np.savez(tmp_path / "train.npz", features=FEATURES[::-1])
    recipe = _recipe(
        tmp_path,
        model="tests.torch_models:build_mlp",
        data={"eval": str(tmp_path / "eval.npz"), "train": str(tmp_path / "train.npz")},
        candidates=[{"name": "finetuned", "passes": [{"train.finetune": {"epochs": 1}}, "export"]}],
    )
    record = run_build(recipe).record
    skipped = record.candidate("finetuned")
    assert skipped.status == "skipped" and skipped.metrics is None and skipped.bundle is None
    assert skipped.error is not None and skipped.error.startswith(
        f"skipped: train.finetune needs labeled training data and data.train '{tmp_path / 'train.npz'}' has no 'labels'"
    )
    assert "label-free metric" in skipped.error  # what to do instead, not an empty hint
    assert record.baseline.status == "ok" and record.baseline.metrics is not None  # the build went on
    assert record.selection is not None and record.selection.winner == "baseline"
    assert {r.name: r.reason for r in record.selection.rejections}.get("finetuned") == skipped.error
    assert "skipped: train.finetune needs labeled training data" in (tmp_path / "out" / "report.html").read_text()


def _counting_source(tmp_path: Path) -> tuple[str, Path]:
    """A torch entry point that leaves a marker when it is loaded: proof of whether conversion began."""
    marker = tmp_path / "LOADED"
    code = f"import pathlib\nimport torch\n\ndef build():\n    pathlib.Path({str(marker)!r}).touch()\n"
    (tmp_path / "model.py").write_text(code + "    return torch.nn.Linear(8, 2).eval()\n")
    return f"{tmp_path / 'model.py'}:build", marker


@pytest.mark.parametrize(
    ("metric", "calibration", "message"),
    [
        ("accuracy", None, r"data.eval: metric 'accuracy' compares with labels, but .*eval.npz' has no 'labels'"),
        ("cosine", "missing.npz", r"data.calibration: no data file at '.*missing.npz'"),
    ],
)
def test_data_problems_stop_the_build_before_the_source_is_converted(
    tmp_path: Path, metric: str, calibration: str | None, message: str
) -> None:
    model, marker = _counting_source(tmp_path)
    np.savez(tmp_path / "eval.npz", features=FEATURES)
    data = {"eval": str(tmp_path / "eval.npz")}
    if calibration is not None:
        data["calibration"] = str(tmp_path / calibration)
    recipe = _recipe(tmp_path, model=model, input_shape="batch,8", metric=metric, data=data)
    with pytest.raises(DataError, match=message):
        run_build(recipe)
    assert not marker.exists()  # refused before the model was even loaded
