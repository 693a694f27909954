"""`slipstream export --to triton`: every config.pbtxt parsed with Triton's own ModelConfig message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from slipstream.artifact import Bundle
from slipstream.artifact.bundle import write_bundle
from slipstream.deploy import DeployOptions, export
from slipstream.errors import ExportRefusedError
from slipstream.importers import import_onnx


def parse(path: Path) -> model_config_pb2.ModelConfig:
    # Parse (not Merge) rejects unknown fields and wrong types, as Triton's server does.
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def built_bundle(mlp_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mlp bundle as a build leaves a winner: measured at batch 16, tuned to 2 threads, for openvino."""
    measured = {
        "build": {
            "metric": "accuracy",
            "quality": 0.9,
            "latency_p50_ms": 0.4,
            "latency_p99_ms": 0.9,
            "throughput_sps": 40000.0,
            "batch_size": 16,
            "target": "openvino",
        }
    }
    manifest = mlp_bundle.manifest.model_copy(
        update={"metrics": measured, "resolved": {"session": {"intra_op_threads": 2}}, "name": "digits"}
    )
    return write_bundle(tmp_path_factory.mktemp("built") / "digits", mlp_bundle.load_model(), manifest).path


def test_batchable_bundle_folds_the_batch_axis_and_uses_the_build_measurements(
    built_bundle: Path, tmp_path: Path
) -> None:
    result = export(built_bundle, "triton", tmp_path / "triton")
    config = parse(tmp_path / "triton" / "digits" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 400  # the measured p50 of 0.4 ms
    (x,) = config.input
    assert x.data_type == model_config_pb2.TYPE_FP32
    assert list(x.dims) == [8]  # [batch, 8] with the batch folded into max_batch_size
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.optimization.execution_accelerators.cpu_execution_accelerator[0].name == "openvino"
    # The version directory is the bundle itself, still verifiable where Triton reads it.
    assert Bundle.load(tmp_path / "triton" / "digits" / "1").model_sha256 == Bundle.load(built_bundle).model_sha256
    assert "digits/config.pbtxt" in result.files


def test_tensorrt_accelerator_runs_on_gpu_instances(built_bundle: Path, tmp_path: Path) -> None:
    options = DeployOptions(accelerator="tensorrt", instances_per_replica=2, max_queue_delay_us=50)
    export(built_bundle, "triton", tmp_path / "t", options)
    config = parse(tmp_path / "t" / "digits" / "config.pbtxt")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 2
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == "FP32"
    assert config.dynamic_batching.max_queue_delay_microseconds == 50


def _fixed_batch_bundle(mlp_bundle: Bundle, dest: Path) -> Path:
    """The mlp with its batch axis fixed at 1: a model that cannot batch."""
    model = mlp_bundle.load_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx_path = dest.with_suffix(".onnx")
    import onnx

    onnx.save_model(model, str(onnx_path))
    return import_onnx(onnx_path, dest).path


def test_non_batchable_model_is_refused_when_batching_is_asked_and_written_without_it(
    mlp_bundle: Bundle, tmp_path: Path
) -> None:
    fixed = _fixed_batch_bundle(mlp_bundle, tmp_path / "fixed")
    with pytest.raises(ExportRefusedError, match="cannot batch") as caught:
        export(fixed, "triton", tmp_path / "out", DeployOptions(batching=True))
    assert caught.value.target == "triton"
    assert not (tmp_path / "out").exists()
    export(fixed, "triton", tmp_path / "out")  # batching=None: batch when the model can
    config = parse(tmp_path / "out" / Bundle.load(fixed).manifest.name / "config.pbtxt")
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 8]


def test_repository_with_several_models_and_versions(mlp_bundle_dir: Path, scorer_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(mlp_bundle_dir, repo / "mlp" / "1")
    shutil.copytree(mlp_bundle_dir, repo / "mlp" / "2")
    import_onnx(scorer_onnx, repo / "scorer" / "3")
    result = export(repo, "triton", tmp_path / "triton")
    assert result.models == ("mlp/1", "mlp/2", "scorer/3")
    scorer = parse(tmp_path / "triton" / "scorer" / "config.pbtxt")
    assert [list(i.dims) for i in scorer.input] == [[-1], [-1]]  # [batch, seq]: seq stays dynamic
    assert [i.data_type for i in scorer.input] == [model_config_pb2.TYPE_INT64, model_config_pb2.TYPE_FP32]
    (score,) = scorer.output
    assert list(score.dims) == [1] and score.HasField("reshape")  # one scalar per row
    for version in ("1", "2"):
        Bundle.load(tmp_path / "triton" / "mlp" / version)


def test_non_numeric_version_is_refused(mlp_bundle_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(mlp_bundle_dir, tmp_path / "repo" / "mlp" / "candidate")
    with pytest.raises(ExportRefusedError, match="version 'candidate'"):
        export(tmp_path / "repo", "triton", tmp_path / "out")
    assert not (tmp_path / "out").exists()
