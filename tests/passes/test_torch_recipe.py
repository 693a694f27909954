"""Torch recipes end to end: prune → fine-tune → export (parity proof) → int8, on a real digits CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slipstream.errors import ConfigError
from slipstream.evaluate.metrics import get_metric
from slipstream.passes import plan
from slipstream.passes.torch_model import TorchData, TorchModel
from slipstream.passes.torch_recipe import optimize_torch
from slipstream.runtime import Engine, Target


def _accuracy(bundle_engine: Engine, data: TorchData) -> float:
    logits = bundle_engine.run({bundle_engine.inputs[0].name: data.inputs})[bundle_engine.outputs[0].name]
    return get_metric("accuracy")(logits, data.targets)


def test_prune_finetune_export_quantize(
    trained_cnn: TorchModel, torch_data: tuple[TorchData, TorchData], tmp_path: Path
) -> None:
    train, test = torch_data
    np.savez(tmp_path / "calibration.npz", pixels=train.inputs[:256])
    events: list[str] = []
    bundle = optimize_torch(
        trained_cnn,
        ["prune.structured:amount=0.5", "train.finetune:epochs=4,lr=0.002", "export", "quantize.static"],
        tmp_path / "small",
        name="digits",
        train=train,
        eval_data=test,
        data=tmp_path / "calibration.npz",
        progress=lambda e: events.append(f"{e.index}:{e.step}:{'done' if e.run else 'start'}"),
    )
    steps = [e.step for e in bundle.manifest.lineage]
    assert steps == ["prune.structured@1", "train.finetune@1", "import.torch@1", "quantize.static@1"]
    assert bundle.manifest.parity is not None and bundle.manifest.parity.status == "passed"
    prune_metrics = bundle.manifest.metrics["prune.structured@1"]
    assert isinstance(prune_metrics, dict) and float(prune_metrics["macs_ratio"]) > 3.0  # type: ignore[arg-type]
    engine = Engine(bundle, Target(intra_op_threads=1))
    base = TorchModel(trained_cnn.module, trained_cnn.example_inputs)
    import torch

    with torch.no_grad():
        base_acc = float((base.module(torch.from_numpy(test.inputs)).argmax(1).numpy() == test.targets).mean())
    assert _accuracy(engine, test) >= base_acc - 0.02
    assert events[0] == "0:prune.structured@1:start" and events[-1].startswith("3:quantize.static@1:done")


def test_export_is_added_when_missing_and_order_is_checked(
    trained_cnn: TorchModel, torch_data: tuple[TorchData, TorchData], tmp_path: Path
) -> None:
    bundle = optimize_torch(trained_cnn, ["prune.unstructured:amount=0.3"], tmp_path / "b", train=torch_data[0])
    assert [e.step for e in bundle.manifest.lineage] == ["prune.unstructured@1", "import.torch@1"]
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert Engine(bundle).run({bundle.manifest.inputs[0].name: x})[bundle.manifest.outputs[0].name].shape == (2, 10)
    with pytest.raises(ConfigError, match=r"prune\.structured works on a torch model; put it before export"):
        plan(["export", "prune.structured:amount=0.5"], start="torch")
    with pytest.raises(ConfigError, match="put it before export"):
        plan(["train.finetune"], start="onnx")
