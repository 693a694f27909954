from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from slipstream.artifact import Bundle
from slipstream.data import example_inputs
from slipstream.errors import ConfigError, InputError, ProviderUnavailableError
from slipstream.importers import import_onnx
from slipstream.runtime import Engine, Target, target
from slipstream.runtime.targets import PROVIDER_PACKAGES, PROVIDERS, physical_cores


@pytest.fixture(scope="module")
def engine(mlp_bundle: Bundle) -> Engine:
    return Engine(mlp_bundle, Target(intra_op_threads=1))


def test_runs_and_matches_a_plain_session(engine: Engine, mlp_bundle: Bundle) -> None:
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    out = engine.run({"pixels": x})
    plain = ort.InferenceSession(str(mlp_bundle.model_path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(out["probabilities"], plain.run(None, {"pixels": x})[0])
    assert out["probabilities"].shape == (5, 4)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


def test_reports_what_it_runs_on(engine: Engine) -> None:
    info = engine.resolved()
    assert info.providers == ("CPUExecutionProvider",)
    assert info.fallback is None
    assert info.intra_op_threads == 1
    assert engine.load_time_s > 0


def test_default_threads_are_physical_cores(mlp_bundle: Bundle) -> None:
    assert Target().resolved_intra_op_threads() == physical_cores()
    assert Target(name="edge-cpu").resolved_intra_op_threads() == 1


def test_lossless_casts_are_accepted(engine: Engine) -> None:
    out = engine.run({"pixels": np.ones((2, 8), dtype=np.float64)})
    assert out["probabilities"].dtype == np.float32
    engine.run({"pixels": [[1] * 8]})  # plain ints, as JSON gives them


def test_wrong_dtype_shape_and_names_are_precise(engine: Engine) -> None:
    with pytest.raises(InputError, match=r"must have shape \[batch, 8\]; got \[3, 64\]"):
        engine.run({"pixels": np.zeros((3, 64), np.float32)})
    with pytest.raises(InputError, match="rank 2"):
        engine.run({"pixels": np.zeros((8,), np.float32)})
    with pytest.raises(InputError, match="must be float32; got <U1"):
        engine.run({"pixels": np.full((1, 8), "a")})
    with pytest.raises(InputError, match=r"missing \['pixels'\]; unknown \['image'\]"):
        engine.run({"image": np.zeros((1, 8), np.float32)})
    with pytest.raises(InputError, match="do not exist"):
        engine.run({"pixels": np.zeros((1, 8), np.float32)}, outputs=["logits"])


def test_shared_symbols_must_agree(scorer_onnx: Path, tmp_path: Path) -> None:
    eng = Engine(import_onnx(scorer_onnx, tmp_path / "b"), Target(intra_op_threads=1))
    feeds = example_inputs(eng.inputs, 3, dims={"seq": 5})
    assert eng.run(feeds)["score"].shape == (3,)
    feeds["attention_mask"] = np.ones((3, 6), np.float32)
    with pytest.raises(InputError, match="'seq', which another input set to 5; got 6"):
        eng.run(feeds)


def _a_missing_target() -> str:
    """An accelerated target whose provider this onnxruntime build lacks (every CPU build lacks all)."""
    available = set(ort.get_available_providers())
    return next(name for name in ("openvino", "tensorrt", "cuda") if PROVIDERS[name][0] not in available)


def test_missing_provider_names_what_to_install(mlp_bundle: Bundle) -> None:
    name = _a_missing_target()
    provider = PROVIDERS[name][0]
    with pytest.raises(ProviderUnavailableError, match=re.escape(PROVIDER_PACKAGES[provider])) as info:
        Engine(mlp_bundle, target(name))
    assert info.value.provider == provider
    assert "--allow-fallback" in str(info.value)


def test_fallback_is_explicit_and_recorded(mlp_bundle: Bundle) -> None:
    name = _a_missing_target()
    eng = Engine(mlp_bundle, target(name, allow_fallback=True))
    info = eng.resolved()
    assert info.providers[-1] == "CPUExecutionProvider"
    assert info.fallback is not None and PROVIDERS[name][0] in info.fallback


def test_unknown_target_and_bad_settings(mlp_bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="Unknown target 'tpu'"):
        target("tpu")
    with pytest.raises(ConfigError, match="intra_op_threads"):
        target("cpu", intra_op_threads=0)


@pytest.mark.gpu
def test_cuda_engine_runs_on_the_gpu(mlp_bundle: Bundle) -> None:
    eng = Engine(mlp_bundle, target("cuda"))
    assert eng.resolved().providers[0] == "CUDAExecutionProvider"
    out = eng.run({"pixels": np.ones((4, 8), np.float32)})
    assert out["probabilities"].shape == (4, 4)


def test_int8_runs_unfused_only_where_the_cpu_would_saturate_full_range_weights() -> None:
    from slipstream.runtime.engine import full_range_int8
    from slipstream.runtime.targets import int8_fusion

    avx2, vnni = frozenset({"avx2", "fma"}), frozenset({"avx2", "avx512_vnni"})
    assert int8_fusion(True, avx2)[0] is False and "no VNNI/AMX" in int8_fusion(True, avx2)[1]
    assert int8_fusion(True, vnni)[0] is True
    assert int8_fusion(False, avx2)[0] is True  # fp32 or 7-bit weights: nothing to saturate
    assert full_range_int8({"quantized": True})  # a TFLite int8 import
    assert full_range_int8({"quantize.static": {"calibration": "minmax"}})  # made before reduce_range was recorded
    assert full_range_int8({"quantize.static#2": {"reduce_range": False}})
    assert not full_range_int8({"quantize.static": {"reduce_range": True}, "quantized": False, "opset": 17})


def test_the_engine_records_how_it_runs_int8(engine: Engine) -> None:
    assert engine.resolved().int8_kernels.startswith("fused: no int8 weights")
