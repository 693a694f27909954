"""Keras, SavedModel and TFLite → bundle, each with a real parity proof (TF is built once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from slipstream.artifact import Bundle
from slipstream.cli import app
from slipstream.errors import (
    ConfigError,
    MissingDependencyError,
    ParityError,
    UnsupportedOpError,
    UntrustedPickleError,
)
from slipstream.importers import convert
from slipstream.importers.keras import import_keras, load_tensorflow
from slipstream.runtime import Engine
from tests import keras_models as km

ROOT = Path(__file__).resolve().parents[1]
SLIPSTREAM = Path(sys.executable).with_name("slipstream")


@pytest.fixture(scope="session")
def tf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tf")


@pytest.fixture(scope="session")
def mlp() -> Any:
    return km.seed_mlp()


@pytest.fixture(scope="session")
def digits32() -> dict[str, np.ndarray]:
    x, _ = km.digits_784(32)
    return {"pixels": x}


@pytest.fixture(scope="session")
def mlp_keras_file(mlp: Any, tf_dir: Path) -> Path:
    path = tf_dir / "mlp.keras"
    km.save(mlp, path)
    return path


@pytest.fixture(scope="session")
def mlp_saved_model(mlp: Any, tf_dir: Path) -> Path:
    path = tf_dir / "mlp_saved_model"
    mlp.export(str(path), format="tf_saved_model", verbose=False)
    return path


def _parity_errors(bundle: Bundle) -> list[float]:
    parity = bundle.manifest.parity
    assert parity is not None and parity.status == "passed"
    return [o.max_abs_error for case in parity.cases for o in case.outputs]


def test_seed_mlp_converts_with_parity_on_a_batch_of_32(
    mlp: Any, digits32: dict[str, np.ndarray], tmp_path: Path
) -> None:
    bundle = import_keras(mlp, tmp_path / "b", sample=digits32)
    m = bundle.manifest
    assert m.source.framework == "keras" and m.lineage[-1].step == "import.keras@1"
    assert [(s.name, s.shape) for s in m.inputs] == [("pixels", ("batch", 784))]
    assert [(s.name, s.shape) for s in m.outputs] == [("probabilities", ("batch", 10))]
    assert m.parity is not None and m.parity.reference == "keras model.predict" and m.parity.data == "sample"
    assert [c.batch for c in m.parity.cases] == [1, 32]
    assert max(_parity_errors(bundle)) < 1e-5
    assert m.resolved["exporter"] == "tf2onnx" and m.resolved["opset"] == 17
    # The bundle serves the same answers as Keras on data the proof did not see.
    x, _ = km.digits_784(100)
    got = Engine(Bundle.load(bundle.path)).run({"pixels": x[60:100]})["probabilities"]
    np.testing.assert_allclose(got, mlp.predict(x[60:100], verbose=0), atol=1e-5)


def test_seed_conv_pair_converts_with_parity(tmp_path: Path) -> None:
    bundle = convert(km.seed_conv_pair(), tmp_path / "b")  # an in-memory Keras model is recognised
    m = bundle.manifest
    assert m.inputs[0].shape == ("batch", 28, 28, 1) and m.outputs[0].shape == ("batch", 28, 28, 32)
    assert [c.batch for c in m.parity.cases] == [1, 3]  # type: ignore[union-attr]
    ops = [n.op_type for n in onnx.load(str(bundle.model_path)).graph.node]
    assert ops.count("Conv") == 2
    assert max(_parity_errors(bundle)) < 1e-4


def test_legacy_h5_file_converts_with_parity(tf_dir: Path, tmp_path: Path) -> None:
    path = tf_dir / "conv.h5"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*HDF5 file.*legacy", category=UserWarning)
        km.save(km.seed_conv_pair(), path)
    bundle = convert(path, tmp_path / "b")
    assert bundle.manifest.source.framework == "keras" and bundle.manifest.source.sha256 is not None
    assert max(_parity_errors(bundle)) < 1e-4


def test_saved_model_signature_converts_with_parity(
    mlp_saved_model: Path, digits32: dict[str, np.ndarray], tmp_path: Path
) -> None:
    bundle = convert(mlp_saved_model, tmp_path / "b", sample=digits32)
    m = bundle.manifest
    assert m.source.framework == "tensorflow" and m.source.sha256 is not None
    assert m.parity is not None and m.parity.reference == "SavedModel signature serving_default"
    assert [s.name for s in m.inputs] == ["pixels"] and [s.name for s in m.outputs] == ["output_0"]
    assert m.inputs[0].shape == ("batch", 784) and m.outputs[0].shape == ("batch", 10)
    assert max(_parity_errors(bundle)) < 1e-5

    with pytest.raises(ConfigError, match=r"no signature 'nope'.*'serve', 'serving_default'"):
        convert(mlp_saved_model, tmp_path / "c", signature="nope")
    assert not (tmp_path / "c").exists()


def test_tflite_from_the_mlp_converts_with_parity(
    mlp: Any, digits32: dict[str, np.ndarray], tf_dir: Path, tmp_path: Path
) -> None:
    path = km.to_tflite(mlp, tf_dir / "mlp.tflite")
    bundle = convert(path, tmp_path / "b", sample=digits32)
    m = bundle.manifest
    assert m.source.framework == "tflite" and m.parity is not None
    assert m.parity.reference == "tf.lite.Interpreter" and [c.batch for c in m.parity.cases] == [1, 32]
    assert [(s.name, s.shape) for s in m.inputs] == [("pixels", ("batch", 784))]
    assert m.resolved["quantized"] is False
    assert max(_parity_errors(bundle)) < 1e-5


def test_fixed_batch_tflite_converts_at_its_own_batch(tf_dir: Path, tmp_path: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((784,), batch_size=1, name="pixels"), keras.layers.Dense(10)])
    path = km.to_tflite(model, tf_dir / "fixed_batch.tflite")
    bundle = convert(path, tmp_path / "b")
    assert bundle.manifest.inputs[0].shape == (1, 784)
    assert [c.batch for c in bundle.manifest.parity.cases] == [1]  # type: ignore[union-attr]
    assert max(_parity_errors(bundle)) < 1e-5


def test_tflite_with_ops_onnx_lacks_names_them(mlp: Any, tf_dir: Path, tmp_path: Path) -> None:
    """A concrete function converted without freezing keeps resource-variable ops, which have no ONNX form."""
    import tensorflow as tf

    fn = tf.function(lambda x: mlp(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec((None, 784), tf.float32, name="pixels"))
    path = tf_dir / "resource_vars.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([concrete], mlp).convert())
    with pytest.raises(UnsupportedOpError) as info:
        convert(path, tmp_path / "b")
    assert info.value.op == "TFL_VAR_HANDLE" and "TFL_READ_VARIABLE" in str(info.value)
    assert not (tmp_path / "b").exists()


def test_int8_tflite_matches_the_interpreter_within_quantization_tolerance(
    mlp: Any, digits32: dict[str, np.ndarray], tf_dir: Path, tmp_path: Path
) -> None:
    path = km.to_tflite(mlp, tf_dir / "mlp_int8.tflite", int8=True)
    bundle = convert(path, tmp_path / "b", sample=digits32)
    m = bundle.manifest
    ops = {n.op_type for n in onnx.load(str(bundle.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert m.resolved["quantized"] is True
    atol = m.resolved["parity_tolerances"]["float32"][0]  # type: ignore[index]
    assert 0 < atol <= 2 / 128  # two steps of an int8 scale for probabilities in [0, 1]
    assert all(o.atol == atol for c in m.parity.cases for o in c.outputs)  # type: ignore[union-attr]


def test_int8_io_tflite_matches_the_interpreter_within_one_step(mlp: Any, tf_dir: Path, tmp_path: Path) -> None:
    path = km.to_tflite(mlp, tf_dir / "mlp_int8_io.tflite", int8=True, int8_io=True)
    bundle = convert(path, tmp_path / "b")
    m = bundle.manifest
    assert m.inputs[0].dtype == "int8" and m.outputs[0].dtype == "int8"
    assert m.parity is not None
    results = [o for c in m.parity.cases for o in c.outputs]
    assert results and all(o.passed and o.atol == 1.0 and o.max_abs_error <= 1.0 for o in results)
    # A client quantizes its floats with the input's scale and zero point: the spec carries the interpreter's.
    from slipstream.importers.tflite import open_interpreter
    from tests.test_serve_ranges import serve

    scale, zero_point = open_interpreter(path).get_input_details()[0]["quantization"]
    assert m.inputs[0].quantization is not None and scale > 0
    assert (m.inputs[0].quantization.scale, m.inputs[0].quantization.zero_point) == (pytest.approx(scale), zero_point)
    (meta,) = serve(bundle.path, [("GET", f"/v2/models/{m.name}", {})])
    params = meta.json()["inputs"][0]["parameters"]
    assert params == {"quantization_scale": pytest.approx(scale), "quantization_zero_point": zero_point}


def test_custom_layer_needs_custom_objects(tf_dir: Path, tmp_path: Path) -> None:
    path = tf_dir / "custom.keras"
    km.save(km.custom_layer_model(), path)
    with pytest.raises(UntrustedPickleError, match="custom objects") as info:
        convert(path, tmp_path / "refused")
    assert "--custom-objects module:dict" in str(info.value)
    assert not (tmp_path / "refused").exists()

    bundle = convert(path, tmp_path / "b", custom_objects="tests.keras_models:CUSTOM_OBJECTS")
    assert bundle.manifest.lineage[-1].config["custom_objects"] == "tests.keras_models:CUSTOM_OBJECTS"
    assert max(_parity_errors(bundle)) < 1e-5
    with pytest.raises(ConfigError, match="module:dict"):
        convert(path, tmp_path / "c", custom_objects="no_colon_here")


def test_lambda_layer_needs_trust_pickle(tf_dir: Path, tmp_path: Path) -> None:
    path = tf_dir / "lambda.keras"
    km.save(km.lambda_model(), path)
    with pytest.raises(UntrustedPickleError, match="safe_mode") as info:
        convert(path, tmp_path / "refused")
    assert "--trust-pickle" in str(info.value)
    bundle = convert(path, tmp_path / "b", trust_pickle=True)
    assert max(_parity_errors(bundle)) < 1e-5


def test_a_nondeterministic_model_fails_parity_and_writes_no_bundle(tmp_path: Path) -> None:
    import keras
    import tensorflow as tf

    class Noise(keras.layers.Layer):  # type: ignore[misc]
        def call(self, x: Any) -> Any:
            return x + tf.random.uniform(tf.shape(x))

    model = keras.Sequential([keras.Input((4,), name="x"), Noise(), keras.layers.Dense(2, name="y")])
    with pytest.raises(ParityError) as info:
        import_keras(model, tmp_path / "b")
    assert "[batch=1] output 'y'" in str(info.value) and "[batch=3] output 'y'" in str(info.value)
    assert not (tmp_path / "b").exists()

    bundle = import_keras(model, tmp_path / "skipped", skip_parity=True)
    assert bundle.manifest.parity is not None and bundle.manifest.parity.status == "skipped"


def test_missing_tensorflow_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # what an install without the extra looks like
    with pytest.raises(MissingDependencyError) as info:
        load_tensorflow()
    assert info.value.extra == "tensorflow" and "slipstream[tensorflow]" in str(info.value)


def test_cli_converts_a_keras_file(mlp_keras_file: Path, tmp_path: Path) -> None:
    """`slipstream convert model.keras -o bundle` through the real console script."""
    out = tmp_path / "bundle"
    done = subprocess.run(
        [str(SLIPSTREAM), "convert", str(mlp_keras_file), "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    bundle = Bundle.load(out)
    assert bundle.manifest.name == "mlp" and bundle.manifest.source.framework == "keras"
    assert bundle.manifest.parity is not None and bundle.manifest.parity.status == "passed"


def test_cli_flags_reach_the_importer(tf_dir: Path, mlp_saved_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    path = tf_dir / "custom_cli.keras"
    km.save(km.custom_layer_model(), path)
    refused = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "--custom-objects" in refused.output
    ok = runner.invoke(
        app, ["convert", str(path), "-o", str(tmp_path / "b"), "--custom-objects", "tests.keras_models:CUSTOM_OBJECTS"]
    )
    assert ok.exit_code == 0, ok.output
    sig = runner.invoke(app, ["convert", str(mlp_saved_model), "-o", str(tmp_path / "c"), "--signature", "serve"])
    assert sig.exit_code == 0, sig.output
    assert Bundle.load(tmp_path / "c").manifest.resolved["signature"] == "serve"
    skip = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "d"), "--skip-parity", "--trust-pickle",
                               "--custom-objects", "tests.keras_models:CUSTOM_OBJECTS"])  # fmt: skip
    assert skip.exit_code == 0, skip.output
    assert Bundle.load(tmp_path / "d").manifest.parity.status == "skipped"  # type: ignore[union-attr]


def test_importing_slipstream_does_not_import_tensorflow() -> None:
    code = "import sys, slipstream, slipstream.importers, slipstream.cli; print('tensorflow' in sys.modules)"
    env: Mapping[str, str] = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_keras_own_exporter_also_passes_parity(mlp: Any, tmp_path: Path) -> None:
    """Last in the module: Keras' exporter monkey-patches tf2onnx for the rest of the process."""
    bundle = import_keras(mlp, tmp_path / "b", exporter="keras")
    assert bundle.manifest.resolved["exporter"] == "keras"
    assert [s.name for s in bundle.manifest.outputs] == ["probabilities"]
    assert bundle.manifest.outputs[0].shape == ("batch", 10)
    assert max(_parity_errors(bundle)) < 1e-5
