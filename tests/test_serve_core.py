"""The protocol-neutral core: the one signature check, the route table, and InferenceCore without HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from slipstream.artifact.tensor import TensorSpec
from slipstream.errors import InputError, MethodNotAllowedError, ModelNotFoundError, ProtocolError
from slipstream.serve.core import InferenceCore
from slipstream.serve.request import InferenceRequest, RequestedOutput
from slipstream.serve.routes import Call, RouteTable
from slipstream.serve.settings import GuardSettings, ServeSettings
from slipstream.serve.signature import Signature
from tests.serve_support import Reference, add_version

IDS = TensorSpec(name="ids", dtype="int64", shape=("batch", "seq"), value_range=(0, 39), max_shape=(None, 16))
MASK = TensorSpec(name="mask", dtype="float32", shape=("batch", "seq"))
PIXELS = TensorSpec(name="pixels", dtype="float32", shape=("batch", 8))
TEXT = TensorSpec(name="text", dtype="string", shape=("batch",))


def _problems(signature: Signature, inputs: dict[str, np.ndarray]) -> str:
    with pytest.raises(InputError) as info:
        signature.check(inputs)
    assert info.value.status_code == 400
    return str(info.value)


# -- the signature check ------------------------------------------------------------------------
def test_a_good_request_passes_in_the_models_input_order() -> None:
    signature = Signature([IDS, MASK])
    ids, mask = np.ones((2, 5), np.int64), np.ones((2, 5), np.float32)
    checked = signature.check({"mask": mask, "ids": ids})
    assert list(checked) == ["ids", "mask"] and checked["ids"] is ids and checked["mask"] is mask


def test_every_problem_of_a_request_is_listed_in_one_error() -> None:
    signature = Signature([IDS, MASK])
    mask = np.ones((2, 5), np.float32)
    mask[1, 1] = np.nan
    text = _problems(
        signature,
        {"ids": np.ones((2, 5), np.int32), "mask": mask, "extra": np.zeros(1, np.float32)},
    )
    assert text.startswith("The request has 3 problems: (1) Expected inputs [ids, mask]; got [ids, mask, extra]")
    assert "unknown ['extra']" in text
    assert "(2) Input 'ids' must be sent as INT64; got INT32" in text
    assert "(3) Input 'mask' holds 1 NaN or Inf value(s)" in text
    # each problem's hint, once
    assert "Convert the data to INT64" in text and "--non-finite allow" in text


def test_shapes_ranges_and_axis_limits_are_checked_together() -> None:
    signature = Signature([IDS, MASK])
    ids = np.full((1, 20), 40, np.int64)  # past the position table and out of the vocabulary
    text = _problems(signature, {"ids": ids, "mask": np.ones((1, 7), np.float32)})
    assert "Input 'ids' axis 1 ('seq') has size 20; this model takes at most 16 there" in text
    assert "Input 'mask' axis 1 is 'seq', which input 'ids' set to 20; got 7" in text
    # the values of a tensor whose shape is refused are not judged as well
    assert "must lie in" not in text
    text = _problems(signature, {"ids": np.full((1, 4), 40, np.int64), "mask": np.ones((1, 4, 1), np.float32)})
    assert "Input 'ids' must lie in [0, 39]; got values in [40, 40] (4 outside)" in text
    assert "Input 'mask' must have shape [batch, seq] (rank 2); got [1, 4, 1] (rank 3)" in text


def test_a_lone_problem_reads_as_itself() -> None:
    signature = Signature([PIXELS])
    text = _problems(signature, {"pixels": np.zeros((1, 9), np.float32)})
    assert text.startswith("Input 'pixels' must have shape [batch, 8]; got [1, 9] (axis 1 must be 8).")
    assert "problems" not in text


@pytest.mark.parametrize("sent", [np.int32, np.int64, np.uint64, np.bool_, np.float64, np.float16])
def test_a_datatype_other_than_the_models_is_refused_not_cast(sent: type) -> None:
    signature = Signature([PIXELS])
    with pytest.raises(InputError) as info:
        signature.check({"pixels": np.zeros((1, 8), sent)})
    assert info.value.input_name == "pixels"
    assert info.value.message.startswith("Input 'pixels' must be sent as FP32; got ")


def test_nan_passes_when_the_server_allows_it_and_strings_pass_as_text() -> None:
    x = np.full((1, 8), np.inf, np.float32)
    assert Signature([PIXELS], non_finite="allow").check({"pixels": x})["pixels"] is x
    assert "NaN or Inf" in _problems(Signature([PIXELS]), {"pixels": x})
    text = np.array(["a", "b"], dtype=object)
    assert Signature([TEXT]).check({"text": text})["text"] is text
    assert "must be sent as BYTES; got FP32" in _problems(Signature([TEXT]), {"text": np.zeros(2, np.float32)})


# -- the route table ------------------------------------------------------------------------------
async def _handler(call: Call) -> str:
    return "ok"


def test_a_route_match_captures_the_model_and_version_once() -> None:
    table = RouteTable(
        [
            ("GET", "/v2", "caller", _handler),
            ("POST", "/v2/models/{name}/infer", "caller", _handler),
            ("POST", "/v2/models/{name}/versions/{version}/infer", "caller", _handler),
            ("GET", "/v2/models/{name}", "caller", _handler),
        ]
    )
    found = table.match("/v2/models/mlp/versions/3/infer")
    assert found is not None and (found.model, found.version) == ("mlp", "3")
    assert found.route("POST").access == "caller"
    found = table.match("/v2/models/mlp/infer")
    assert found is not None and (found.model, found.version) == ("mlp", None)
    assert table.match("/v2/") is not None and table.match("/v2/models/mlp/") is not None
    for missing in ("/v2/models/mlp/bogus", "/v3", "/v2/models/mlp/versions/3/infer/more"):
        assert table.match(missing) is None
    infer = table.match("/v2/models/mlp/infer")
    assert infer is not None
    with pytest.raises(MethodNotAllowedError, match="answers POST, not GET"):
        infer.route("GET")
    with pytest.raises(ValueError, match="declared twice"):
        RouteTable([("GET", "/v2", "open", _handler), ("GET", "/v2", "open", _handler)])


# -- the core without a protocol --------------------------------------------------------------------
def test_the_core_serves_a_typed_request_and_counts_it_once(tmp_path: Path) -> None:
    add_version(tmp_path / "repo", "mlp", "1", tmp_path)
    core = InferenceCore(tmp_path / "repo", ServeSettings(port=0, guard=GuardSettings()))
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)

    async def main() -> None:
        await core.start()
        try:
            entry = core.model("mlp", None)
            assert core.input_datatypes(entry) == {"pixels": "FP32"}
            request = InferenceRequest(id="r1", inputs={"pixels": x}, outputs=None)
            response = await core.infer(entry, request, request_id="q1", caller="test", started=0.0)
            assert (response.model, response.version, response.id) == ("mlp", "1", "r1")
            assert response.wanted == (RequestedOutput("probabilities", None),)
            want = Reference().run("mlp", "1", {"pixels": x})["probabilities"]
            np.testing.assert_allclose(response.outputs["probabilities"], want, rtol=1e-5, atol=1e-6)
            core.finish(response.model, response.version, 200, None, core.clock())
            with pytest.raises(ProtocolError, match="Requested outputs \\['nope'\\] do not exist"):
                bad = InferenceRequest(id=None, inputs={"pixels": x}, outputs=(RequestedOutput("nope", None),))
                await core.infer(entry, bad, request_id="q2", caller="test", started=0.0)
            with pytest.raises(ModelNotFoundError):
                core.model("nope", None)
            assert core.model_ready("mlp", "1") and core.ready() and core.live()
            meta = core.model_metadata("mlp", None)
            assert meta.inputs[0].shape == (-1, 8) and meta.inputs[0].datatype == "FP32"
            assert core.server_metadata()["extensions"] == ["binary_tensor_data", "model_repository"]
        finally:
            await core.stop()

    asyncio.run(main())
    assert core.metrics.requests == {("mlp", "1", "200"): 1}
    assert core.metrics.in_flight == 0


def test_the_fast_screen_and_the_full_check_agree_at_the_edges() -> None:
    """The hot path screens with one float64 sum (NaN/Inf) or min/max (ranges); its doubts go to the full check."""
    huge = np.full((1, 8), np.finfo(np.float32).max, np.float32)  # the float32 sum would overflow; float64 does not
    assert Signature([PIXELS]).check({"pixels": huge})["pixels"] is huge
    wide = TensorSpec(name="pixels", dtype="float64", shape=("batch", 8))
    x = np.zeros((1, 8), np.float64)
    x[0, 0] = np.inf
    assert "holds 1 NaN or Inf" in _problems(Signature([wide]), {"pixels": x})
    ranged = TensorSpec(name="pixels", dtype="float32", shape=("batch", 8), value_range=(0.0, 1.0))
    y = np.full((1, 8), 0.5, np.float32)
    assert Signature([ranged]).check({"pixels": y})["pixels"] is y
    y[0, 3] = np.nan
    assert "holds 1 NaN or Inf" in _problems(Signature([ranged]), {"pixels": y})
    y[0, 3] = 2.0
    assert "must lie in [0, 1]; got values in [0.5, 2] (1 outside)" in _problems(Signature([ranged]), {"pixels": y})
    open_range = TensorSpec(name="pixels", dtype="float32", shape=("batch", 8), value_range=(0.0, float("inf")))
    z = np.full((1, 8), np.inf, np.float32)
    assert "NaN or Inf" in _problems(Signature([open_range]), {"pixels": z})
