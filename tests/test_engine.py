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
