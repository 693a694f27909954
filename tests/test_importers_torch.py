"""PyTorch → bundle with real exports, real onnxruntime sessions and the parity proof."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import slipstream
from slipstream.artifact import Bundle
from slipstream.errors import (
    ConfigError,
    ConversionError,
    InvalidModelError,
    MissingDependencyError,
    ParityError,
    UnsupportedOpError,
    UntrustedPickleError,
)
from slipstream.importers.torch import require
from slipstream.runtime import Engine
from tests.torch_models import CNN, MLP, CumulativeMax, TokenEncoder

SLIPSTREAM = Path(sys.executable).with_name("slipstream")


def _seeded(cls: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@pytest.fixture(scope="session")
def torch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch")


@pytest.fixture(scope="session")
def mlp() -> torch.nn.Module:
    return _seeded(MLP)


@pytest.fixture(scope="session")
def mlp_bundle(mlp: torch.nn.Module, torch_dir: Path) -> Bundle:
    return slipstream.convert(mlp, torch_dir / "mlp", example_inputs=(torch.randn(4, 8),))


@pytest.fixture(scope="session")
def encoder() -> torch.nn.Module:
    return _seeded(TokenEncoder)


@pytest.fixture(scope="session")
def encoder_bundle(encoder: torch.nn.Module, torch_dir: Path) -> Bundle:
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    return slipstream.convert(
        encoder, torch_dir / "encoder", example_inputs=(tokens,), dynamic_axes=["tokens:1=seq"],
        output_names=["states", "pooled"],
    )  # fmt: skip


def test_mlp_converts_with_a_recorded_parity_proof(mlp: torch.nn.Module, mlp_bundle: Bundle) -> None:
    m = mlp_bundle.manifest
    assert m.source.framework == "torch"
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("features", "float32", ("batch", 8))]
    assert [(s.name, s.shape) for s in m.outputs] == [("output", ("batch", 4))]
    assert m.parity is not None and m.parity.status == "passed" and m.parity.data == "generated"
    assert m.parity.reference == "torch eager (module)"
    assert [c.batch for c in m.parity.cases] == [1, 3]
    assert all(o.passed and o.max_abs_error <= 1e-5 for c in m.parity.cases for o in c.outputs)
    assert m.resolved["exporter"] == "dynamo" and m.resolved["dynamic_axes"] == {"features": {"0": "batch"}}
    assert isinstance(m.resolved["opset"], int) and m.resolved["opset"] >= 18
    assert [e.step for e in m.lineage] == ["import.torch@1"]
    assert m.lineage[0].config["exporter"] == "dynamo"

    x = np.random.default_rng(5).standard_normal((7, 8)).astype(np.float32)
    got = Engine(mlp_bundle).run({"features": x})["output"]
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_cnn_converts_from_memory_with_its_training_mode_restored(torch_dir: Path) -> None:
    cnn = _seeded(CNN).train()
    bundle = slipstream.convert(cnn, torch_dir / "cnn", example_inputs=torch.randn(1, 1, 8, 8))
    assert cnn.training  # exported in eval mode, handed back as it came
    m = bundle.manifest
    assert m.inputs[0].shape == ("batch", 1, 8, 8) and m.outputs[0].shape == ("batch", 10)
    assert m.parity is not None and m.parity.status == "passed"
    x = np.random.default_rng(2).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = cnn.eval()(torch.from_numpy(x)).numpy()
    cnn.train()
    np.testing.assert_allclose(Engine(bundle).run({"pixels": x})["output"], want, atol=1e-4)


def test_transformer_encoder_has_dynamic_batch_and_sequence(encoder: torch.nn.Module, encoder_bundle: Bundle) -> None:
    m = encoder_bundle.manifest
    assert [(s.name, s.dtype, s.shape) for s in m.inputs] == [("tokens", "int64", ("batch", "seq"))]
    assert [(s.name, s.shape) for s in m.outputs] == [("states", ("batch", "seq", 16)), ("pooled", ("batch", 16))]
    assert m.inputs[0].value_range == (0.0, 49.0)  # read from the graph: the embedding table has 50 rows
    assert m.parity is not None
    assert [(c.batch, c.dims) for c in m.parity.cases] == [
        (1, {"seq": 8}), (1, {"seq": 13}), (3, {"seq": 8}), (3, {"seq": 13}),
    ]  # fmt: skip
    assert m.resolved["dynamic_axes"] == {"tokens": {"0": "batch", "1": "seq"}}
    tokens = np.random.default_rng(3).integers(0, 50, size=(2, 21))
    got = Engine(encoder_bundle).run({"tokens": tokens})
    with torch.no_grad():
        states, pooled = encoder(torch.from_numpy(tokens))
    np.testing.assert_allclose(got["states"], states.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["pooled"], pooled.numpy(), atol=1e-4)


def test_a_sequence_length_baked_in_by_the_torchscript_exporter_is_caught(
    encoder: torch.nn.Module, tmp_path: Path
) -> None:
    with pytest.raises(ParityError) as info:
        slipstream.convert(
            encoder, tmp_path / "b", input_shapes=["batch,seq"], input_dtypes=["int64"], exporter="torchscript"
        )
    text = str(info.value)
    assert "seq=13" in text and "baked in as a constant" in text
    assert "--exporter" in text
    assert not (tmp_path / "b").exists()  # no proof, no bundle


def test_skip_parity_writes_the_bundle_and_says_so(encoder: torch.nn.Module, tmp_path: Path) -> None:
    bundle = slipstream.convert(
        encoder, tmp_path / "b", input_shapes=["batch,seq"], input_dtypes=["int64"], exporter="torchscript",
        skip_parity=True, opset=17,
    )  # fmt: skip
    m = bundle.manifest
    assert m.parity is not None and m.parity.status == "skipped" and m.parity.cases == ()
    assert m.parity.reason and "skip" in m.parity.reason
    assert (m.resolved["exporter"], m.resolved["opset"]) == ("torchscript", 17)
    assert m.inputs[0].value_range == (0.0, 49.0)  # the TorchScript graph's Gather says the same


def test_an_output_named_like_an_internal_value_is_refused(encoder: torch.nn.Module, tmp_path: Path) -> None:
    """dynamo names the nn.Embedding result 'embedding'; an output of that name would break the model."""
    with pytest.raises(ConversionError, match=r"\['embedding'\] clash") as info:
        slipstream.convert(
            encoder, tmp_path / "b", input_shapes=["batch,seq"], input_dtypes=["int64"],
            output_names=["embedding", "pooled"],
        )  # fmt: skip
    assert "--output-name" in (info.value.hint or "")
    assert not (tmp_path / "b").exists()


def test_an_unsupported_op_names_the_op_and_its_module(tmp_path: Path) -> None:
    for exporter in ("dynamo", "torchscript"):
        with pytest.raises(UnsupportedOpError) as info:
            slipstream.convert(_seeded(CumulativeMax), tmp_path / exporter, input_shapes=["batch,4"], exporter=exporter)
        err = info.value
        assert err.op == "aten::cummax"
        assert err.module == "'running' (_Running)"
        assert "aten::cummax" in err.message and "'running' (_Running)" in err.message
        assert err.hint is not None and "--opset" in err.hint and "--exporter" in err.hint
        assert not (tmp_path / exporter).exists()


def test_missing_example_inputs_say_how_to_provide_them(mlp: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        slipstream.convert(mlp, tmp_path / "b")
    assert "example inputs" in info.value.message
    hint = info.value.hint or ""
    assert "--input-shape" in hint and "example_inputs()" in hint and "example_inputs=" in hint


def test_example_inputs_that_do_not_fit_the_model_are_explained(mlp: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        slipstream.convert(mlp, tmp_path / "b", input_shapes=["batch,5"])
    assert "failed on its example inputs (features: [2, 5] torch.float32)" in info.value.message
    assert "--input-shape" in (info.value.hint or "")


def test_a_pickled_model_needs_trust(mlp: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(mlp, path)
    with pytest.raises(UntrustedPickleError) as info:
        slipstream.convert(path, tmp_path / "b", input_shapes=["batch,8"])
    assert "runs arbitrary Python code" in info.value.message and "--trust-pickle" in (info.value.hint or "")
    assert not (tmp_path / "b").exists()

    bundle = slipstream.convert(path, tmp_path / "b", input_shapes=["batch,8"], trust_pickle=True)
    assert bundle.manifest.resolved["source_kind"] == "pickle"
    assert bundle.manifest.source.path == str(path) and bundle.manifest.source.sha256 is not None


def test_a_state_dict_is_not_a_model(mlp: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(mlp.state_dict(), path)
    with pytest.raises(InvalidModelError, match="not a model") as info:
        slipstream.convert(path, tmp_path / "b", input_shapes=["batch,8"])
    assert "FILE.py:FACTORY" in (info.value.hint or "")


def test_torchscript_file_uses_the_torchscript_exporter(mlp: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; users still bring .pt files made with it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(mlp).save(str(path))
    bundle = slipstream.convert(path, tmp_path / "b", input_shapes=["batch,8"])
    m = bundle.manifest
    assert m.resolved["source_kind"] == "torchscript" and m.resolved["exporter"] == "torchscript"
    assert "TorchScript source" in str(m.resolved["exporter_reason"])
    assert m.inputs[0].name == "features" and m.inputs[0].shape == ("batch", 8)
    assert m.parity is not None and m.parity.status == "passed"
    with pytest.raises(ConfigError, match="cannot read a TorchScript"):
        slipstream.convert(path, tmp_path / "c", input_shapes=["batch,8"], exporter="dynamo")


def test_torch_export_program_file(mlp: torch.nn.Module, tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(mlp, (torch.randn(4, 8),), dynamic_shapes={"features": {0: batch}})
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, path)
    bundle = slipstream.convert(path, tmp_path / "b")
    m = bundle.manifest
    assert m.resolved["source_kind"] == "exported_program"
    assert m.inputs[0].shape == ("batch", 8)
    assert m.parity is not None and [c.batch for c in m.parity.cases] == [1, 3]


def test_entry_point_with_a_companion_and_sample_data(tmp_path: Path) -> None:
    sample = tmp_path / "sample.npz"
    np.savez(sample, features=np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    bundle = slipstream.convert("tests.torch_models:build_mlp", tmp_path / "b", sample=sample, name="digits")
    m = bundle.manifest
    assert m.name == "digits" and m.resolved["source_kind"] == "entry_point"
    assert m.parity is not None and m.parity.data == "sample" and [c.batch for c in m.parity.cases] == [1, 32]
    assert m.lineage[0].config["example_shapes"] == {"features": [4, 8]}  # from example_inputs()


def test_bad_dynamic_axis_declarations(encoder: torch.nn.Module, tmp_path: Path) -> None:
    tokens = torch.randint(0, 50, (2, 6))
    with pytest.raises(ConfigError, match="INPUT:AXIS=NAME"):
        slipstream.convert(encoder, tmp_path / "c", example_inputs=(tokens,), dynamic_axes=["tokens-1"])
    with pytest.raises(ConfigError, match="model's inputs are"):
        slipstream.convert(encoder, tmp_path / "c", example_inputs=(tokens,), dynamic_axes=["ids:1=seq"])


def test_a_missing_dependency_names_the_extra() -> None:
    with pytest.raises(MissingDependencyError) as info:
        require("slipstream_no_such_package", "Converting a PyTorch model")
    assert info.value.extra == "torch" and "pip install 'slipstream[torch]'" in str(info.value)


def test_cli_entry_point_then_inspect(tmp_path: Path) -> None:
    """`slipstream convert my_model.py:build -o bundle --input-shape batch,1,8,8`, then inspect it."""
    (tmp_path / "my_model.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn


            def build():
                torch.manual_seed(0)
                return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
            """
        )
    )
    done = subprocess.run(
        [str(SLIPSTREAM), "convert", "my_model.py:build", "-o", "bundle", "--input-shape", "batch,1,8,8"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote bundle" in done.stdout
    assert "Traceback" not in done.stderr and "torchvision" not in done.stderr
    shown = subprocess.run(
        [str(SLIPSTREAM), "inspect", "bundle", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    summary = json.loads(shown.stdout)
    assert summary["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert summary["outputs"][0]["shape"] == ["batch", 10]
    assert summary["op_histogram"]["Conv"] == 1
    assert [e["step"] for e in summary["lineage"]] == ["import.torch@1"]
    human = subprocess.run([str(SLIPSTREAM), "inspect", "bundle"], cwd=tmp_path, capture_output=True, text=True)
    assert human.returncode == 0 and "import.torch@1" in human.stdout
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["parity"]["status"] == "passed"
    timed = subprocess.run(
        [str(SLIPSTREAM), "bench", "bundle", "--batch", "8", "--max-time", "0.2", "--compare", "my_model.py:build",
         "--json"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert timed.returncode == 0, timed.stderr
    (compared,) = json.loads(timed.stdout)["comparisons"]  # torch eager against the bundle, side by side
    assert compared["reference"] == "torch eager (fp32)" and compared["ratio"] > 0

    refused = subprocess.run(
        [str(SLIPSTREAM), "convert", "my_model.py:build", "-o", "other"], cwd=tmp_path, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "--input-shape" in refused.stderr and "Traceback" not in refused.stderr


class _CountingMLP(MLP):
    """The MLP, counting its forward() calls: a dry run or an export would call it."""

    calls = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(features)


def test_a_sample_for_another_model_is_refused_before_the_export(tmp_path: Path) -> None:
    model = _CountingMLP().eval()
    sample = {"pixels": np.zeros((4, 8), np.float32)}
    refused = r"Sample data has arrays \['pixels'\]; the model's inputs are \['features'\]"
    with pytest.raises(ConfigError, match=refused):
        slipstream.convert(model, tmp_path / "b", example_inputs=(torch.randn(2, 8),), sample=sample)
    assert _CountingMLP.calls == 0 and not (tmp_path / "b").exists()
