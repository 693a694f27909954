"""Torch passes on a real digits CNN: structured and unstructured pruning, recovery fine-tuning."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from slipstream.errors import ConfigError
from slipstream.passes.finetune import FinetuneConfig, finetune
from slipstream.passes.prune_structured import PruneStructuredConfig, prune_structured
from slipstream.passes.prune_unstructured import PruneUnstructuredConfig, prune_unstructured
from slipstream.passes.torch_model import TorchData, TorchModel, evaluate


@pytest.fixture(scope="module")
def data(torch_data: tuple[TorchData, TorchData]) -> tuple[TorchData, TorchData]:
    return torch_data


@pytest.fixture(scope="module")
def trained(trained_cnn: TorchModel) -> TorchModel:
    return trained_cnn


def _params(model: TorchModel) -> list[Any]:
    return [p.detach().clone() for p in model.module.parameters()]


def test_the_trained_model_is_real(trained: TorchModel, data: tuple[TorchData, TorchData]) -> None:
    assert evaluate(trained.module, data[1]) > 0.95


def test_structured_pruning_shrinks_and_fine_tuning_recovers(
    trained: TorchModel, data: tuple[TorchData, TorchData]
) -> None:
    before = _params(trained)
    base_acc = evaluate(trained.module, data[1])
    pruned, report = prune_structured(trained, PruneStructuredConfig(amount=0.5))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(trained), strict=True))  # input untouched
    assert report.macs_ratio > 3.0  # half the channels in and out of each conv: ~4× fewer MACs
    assert report.params_after < report.params_before / 2.5
    assert pruned.module(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    convs = [m for m in pruned.module.modules() if isinstance(m, nn.Conv2d)]  # output layer excepted
    assert [c.out_channels for c in convs] == [8, 16, 16]
    assert [m.num_features for m in pruned.module.modules() if isinstance(m, nn.BatchNorm2d)] == [8, 16]
    recovered, history = finetune(pruned, FinetuneConfig(epochs=6, lr=2e-3), data[0], data[1])
    assert evaluate(recovered.module, data[1]) >= base_acc - 0.01
    assert history.best_metric is not None and len(history.history) >= 1


@pytest.mark.parametrize(("importance", "scope"), [("l1", "layer"), ("random", "layer"), ("l2", "global")])
def test_structured_importances_and_scopes(trained: TorchModel, importance: str, scope: str) -> None:
    cfg = PruneStructuredConfig.model_validate({"amount": 0.25, "importance": importance, "scope": scope})
    pruned, report = prune_structured(trained, cfg)
    assert report.macs_after < report.macs_before
    assert pruned.module(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_taylor_importance_needs_and_uses_data(trained: TorchModel, data: tuple[TorchData, TorchData]) -> None:
    with pytest.raises(ConfigError, match="needs training data"):
        prune_structured(trained, PruneStructuredConfig(amount=0.5, importance="taylor"))
    pruned, report = prune_structured(
        trained, PruneStructuredConfig(amount=0.5, importance="taylor", taylor_batches=2), data[0]
    )
    assert report.macs_ratio > 3.0
    assert all(p.grad is None for p in pruned.module.parameters())
    with pytest.raises(ConfigError, match="does not have"):
        prune_structured(trained, PruneStructuredConfig(amount=0.5, ignore=("nope",)))


def test_the_output_layer_and_residuals_stay_valid() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 32)
            self.block = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
            self.out = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(torch.relu(h + self.block(h)))

    model = TorchModel(Residual().eval(), (torch.zeros(1, 8),))
    pruned, _ = prune_structured(model, PruneStructuredConfig(amount=0.5))
    m = pruned.module
    assert m.out.out_features == 4  # the output width is the model's contract
    assert m.inp.out_features == m.block[2].out_features == m.out.in_features  # the residual add agrees
    assert m.block[0].out_features == 32
    assert m(torch.zeros(5, 8)).shape == (5, 4)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_unstructured_pruning_is_exact_and_permanent(trained: TorchModel, method: str) -> None:
    cfg = PruneUnstructuredConfig.model_validate({"amount": 0.6, "method": method})
    pruned, report = prune_unstructured(trained, cfg)
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    for layer in pruned.module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")
            assert float((layer.weight == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    assert float((next(trained.module.parameters()) == 0).float().mean()) < 0.01  # input untouched


def test_unstructured_global_and_taylor(trained: TorchModel, data: tuple[TorchData, TorchData]) -> None:
    glob, report = prune_unstructured(trained, PruneUnstructuredConfig(amount=0.5, scope="global"))
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    per_layer = [float((m.weight == 0).float().mean()) for m in glob.module.modules() if isinstance(m, nn.Linear)]
    assert max(per_layer) - min(per_layer) > 0.05  # a global ranking prunes layers unevenly
    taylor, report = prune_unstructured(trained, PruneUnstructuredConfig(amount=0.5, method="taylor"), data[0])
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert evaluate(taylor.module, data[1]) > 0.5


def test_finetune_schedules_early_stopping_and_distillation(
    trained: TorchModel, data: tuple[TorchData, TorchData]
) -> None:
    small = TorchData(data[0].inputs[:256], data[0].targets[:256])
    _, exp = finetune(trained, FinetuneConfig(epochs=3, schedule="exponential", gamma=0.5, patience=None), small)
    assert [round(e.lr / exp.history[0].lr, 3) for e in exp.history] == [1.0, 0.5, 0.25]
    _, step = finetune(trained, FinetuneConfig(epochs=3, schedule="step", step_epochs=2, gamma=0.1), small)
    assert [round(e.lr / step.history[0].lr, 3) for e in step.history] == [1.0, 1.0, 0.1]
    # A learning rate too small to change anything: no epoch improves on the first, so it stops early.
    frozen = FinetuneConfig(epochs=6, lr=1e-12, optimizer="sgd", patience=1, schedule="none")
    _, stopped = finetune(trained, frozen, small, data[1])
    assert stopped.stopped_early and len(stopped.history) == 2 and stopped.best_epoch == 1
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(trained, FinetuneConfig(epochs=1, distill_alpha=0.5), small)
    seen: list[float] = []
    student, _ = finetune(
        trained,
        FinetuneConfig(epochs=1, distill_alpha=0.7, temperature=3.0),
        small,
        teacher=trained.module,
        progress=lambda s: seen.append(s.loss),
    )
    assert len(seen) == 1 and np.isfinite(seen[0])
    assert student.module is not trained.module
