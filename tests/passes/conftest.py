"""Real models for the pass tests: a digits CNN and MLP trained briefly and exported by torch dynamo."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from slipstream.artifact import Bundle
from slipstream.importers import import_onnx
from slipstream.passes.finetune import FinetuneConfig, finetune
from slipstream.passes.torch_model import TorchData, TorchModel
from tests.passes.digits_models import digits_data, train_and_export


def _export(kind: str, directory: Path) -> Path:
    with warnings.catch_warnings():
        # torch 2.13's exporter emits a FutureWarning from its own pytree code (LeafSpec); not ours.
        warnings.simplefilter("ignore", FutureWarning)
        return train_and_export(kind, directory / f"digits-{kind}.onnx", epochs=4)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return digits_data()


@pytest.fixture(scope="session")
def cnn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    d = tmp_path_factory.mktemp("digits-cnn")
    return import_onnx(_export("cnn", d), d / "bundle")


@pytest.fixture(scope="session")
def mlp_bundle_real(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    d = tmp_path_factory.mktemp("digits-mlp")
    return import_onnx(_export("mlp", d), d / "bundle")


@pytest.fixture(scope="session")
def calibration_npz(tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, ...]) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "digits.npz"
    np.savez(path, pixels=digits[0][:256])
    return path


@pytest.fixture(scope="session")
def transformer_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A 2-layer nn.TransformerEncoder over token ids, exported by dynamo (dynamic batch and seq)."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 32)
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.enc(self.emb(input_ids)).mean(1)

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("transformer")
    ids = torch.ones(2, 8, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecations inside torch, not ours
        torch.onnx.export(
            Encoder().eval(),
            (ids,),
            str(d / "encoder.onnx"),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["pooled"],
            dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}},
        )
    return import_onnx(d / "encoder.onnx", d / "bundle")


@pytest.fixture(scope="session")
def torch_data(digits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> tuple[TorchData, TorchData]:
    x_train, y_train, x_test, y_test = digits
    return TorchData(x_train, y_train), TorchData(x_test, y_test)


@pytest.fixture(scope="session")
def trained_cnn(torch_data: tuple[TorchData, TorchData]) -> TorchModel:
    """A digits CNN (with batch norm) trained for a few epochs: the input of the torch-pass tests."""
    import torch

    from tests.passes.digits_models import small_cnn

    torch.manual_seed(0)
    model = TorchModel(small_cnn(), (torch.zeros(1, 1, 8, 8),))
    cfg = FinetuneConfig(epochs=5, lr=3e-3, patience=None, schedule="none", clip_grad_norm=None)
    out, _ = finetune(model, cfg, torch_data[0])
    return out
