"""The gRPC front end (Open Inference Protocol v2, ``inference.GRPCInferenceService``) on a real server.

One server answers both protocols on loopback: every RPC is called through Triton's own client
(``tritonclient.grpc``, unchanged) and through the checked-in stubs (typed contents, which Triton's
client never sends), and each answer, and each refusal's text, is compared with what REST says.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from slipstream.errors import (
    EngineError,
    ForbiddenError,
    InputError,
    ModelNotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    RateLimitedError,
    RequestTimeoutError,
    ServerBusyError,
    ServingError,
    UnauthorizedError,
)
from slipstream.serve.app import create_app
from slipstream.serve.grpc import generate
from slipstream.serve.grpc import grpc_predict_v2_pb2 as pb
from slipstream.serve.grpc import grpc_predict_v2_pb2_grpc as stubs
from slipstream.serve.grpc.convert import decode_request, encode_response, split_raw
from slipstream.serve.grpc.server import SPLIT_FROM_BYTES, STATUS_CODES
from slipstream.serve.guard import hash_key
from slipstream.serve.replies import error_reply, refusal
from slipstream.serve.request import InferenceResponse, RequestedOutput
from slipstream.serve.settings import GuardSettings, ServeSettings
from tests.serve_support import ADMIN_KEY, API_KEY, Reference, ServerThread, add_version, free_port

LIMIT = 256 * 1024  # the guard's body limit: gRPC's message limit follows it
KEY = (("authorization", f"Bearer {API_KEY}"),)
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
HTTP_AUTH = {"Authorization": f"Bearer {API_KEY}"}


# -- the proto and the stubs (no server) ---------------------------------------------------------------
def test_checked_in_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    for path in generate.generate(tmp_path):
        checked_in = generate.HERE / path.name
        assert path.read_text() == checked_in.read_text(), f"{path.name} drifted: run python -m {generate.__name__}"


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    out: dict[str, Any] = {f.name: (f.number, f.type, f.label, f.type_name) for f in message.field}
    out.update({f"{n.name}.": _fields(n) for n in message.nested_type})
    return out


def test_every_message_and_rpc_matches_tritons_field_numbers() -> None:
    """Triton's clients send Triton's messages: every field we share must carry the same number and type."""
    ours, theirs = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    triton_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    their_messages = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert message.name in their_messages, message.name
        assert _fields(message) == _fields(their_messages[message.name]), message.name
    their_methods = {m.name: m for m in theirs.service[0].method}
    assert ours.service[0].name == theirs.service[0].name == "GRPCInferenceService"
    for method in ours.service[0].method:
        theirs_m = their_methods[method.name]
        assert (method.input_type, method.output_type) == (theirs_m.input_type, theirs_m.output_type)
    assert {m.name for m in ours.service[0].method} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    }  # fmt: skip


def test_decode_and_encode_raw_and_typed_without_a_server() -> None:
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    raw = pb.ModelInferRequest(model_name="m", id="r1", raw_input_contents=[x.tobytes()])
    raw.inputs.add(name="pixels", datatype="FP32", shape=[2, 8])
    raw.outputs.add(name="probabilities")
    raw.parameters["group"].string_param = "a"
    request = decode_request(raw, max_id_chars=256, size=raw.ByteSize())
    assert request.id == "r1" and request.parameters == {"group": "a"}
    assert request.outputs == (RequestedOutput("probabilities", None),)
    np.testing.assert_array_equal(request.inputs["pixels"], x)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="pixels", datatype="FP32", shape=[2, 8]).contents.fp32_contents.extend(x.reshape(-1))
    np.testing.assert_array_equal(decode_request(typed, max_id_chars=256, size=typed.ByteSize()).inputs["pixels"], x)
    wide = pb.ModelInferRequest(model_name="m")
    wide.inputs.add(name="ids", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    with pytest.raises(ProtocolError, match="not a regular array of INT8"):  # never wrapped to 44
        decode_request(wide, max_id_chars=256, size=wide.ByteSize())
    text = pb.ModelInferRequest(model_name="m")
    text.inputs.add(name="t", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(["é".encode(), b"x"])
    assert decode_request(text, max_id_chars=256, size=text.ByteSize()).inputs["t"].tolist() == ["é", "x"]
    text.inputs[0].contents.bytes_contents[1] = b"\xff"
    with pytest.raises(ProtocolError, match="BYTES element 1 is not UTF-8 text"):
        decode_request(text, max_id_chars=256, size=text.ByteSize())
    strings = InferenceResponse("m", "1", None, {"s": np.array(["é", "x"], object)}, (RequestedOutput("s", None),))
    assert list(encode_response(strings, raw=False).outputs[0].contents.bytes_contents) == ["é".encode(), b"x"]
    assert encode_response(strings, raw=True).raw_output_contents == [
        struct.pack("<I", 2) + "é".encode() + b"\1\0\0\0x"
    ]
    answer = InferenceResponse("m", "1", None, {"p": x}, (RequestedOutput("p", None),))
    as_raw, as_typed = encode_response(answer, raw=True), encode_response(answer, raw=False)
    assert as_raw.raw_output_contents == [x.tobytes()] and not as_raw.outputs[0].HasField("contents")
    assert list(as_typed.outputs[0].contents.fp32_contents) == x.reshape(-1).tolist()
    assert not as_typed.raw_output_contents and list(as_typed.outputs[0].shape) == [2, 8]
    half = InferenceResponse("m", "1", "i", {"h": x.astype(np.float16)}, (RequestedOutput("h", None),))
    assert encode_response(half, raw=False).raw_output_contents == [x.astype(np.float16).tobytes()]  # FP16: raw only


def test_split_raw_gives_what_protobuf_parses_without_copying_the_tensors() -> None:
    rng = np.random.default_rng(2)
    blobs = [rng.bytes(n) for n in (0, 5, 40_000)]
    head = pb.ModelInferRequest(model_name="m", model_version="2", id="r")
    head.parameters["group"].int64_param = 1 << 40
    for i, blob in enumerate(blobs):
        head.inputs.add(name=f"t{i}", datatype="UINT8", shape=[len(blob)])
    head.outputs.add(name="o")
    parts = [pb.ModelInferRequest(raw_input_contents=[b]).SerializeToString() for b in blobs]
    unknown = b"\xa0\x06\x05"  # field 100, a varint: kept for the parser, as protobuf keeps unknown fields
    # Fields in any order (protobuf merges repeated top-level fields), raw ones before, between and after.
    data = parts[0] + head.SerializeToString() + parts[1] + unknown + parts[2]
    split = split_raw(data)
    assert split is not None
    rest, raw = split
    want = pb.ModelInferRequest.FromString(data)
    assert [bytes(r) for r in raw] == list(want.raw_input_contents)
    assert all(r.obj is data for r in raw)  # views of the received bytes: nothing copied
    del want.raw_input_contents[:]
    assert pb.ModelInferRequest.FromString(rest) == want and len(rest) < 200
    plain = head.SerializeToString()
    assert split_raw(plain) == (plain, [])
    for broken in (b"\xff\xff\xff", b"\x3a\x05ab", b"\x0b", b"\x3a", b"\x00\x01"):  # the parser words these
        assert split_raw(broken) is None, broken
    x = np.arange(9, dtype=np.float32).reshape(1, 9)
    odd = pb.ModelInferRequest(model_name="m", raw_input_contents=[x.tobytes()])
    odd.inputs.add(name="pixels", datatype="FP32", shape=[1, 9])
    rest, raw = split_raw(odd.SerializeToString()) or (b"", [])
    got = decode_request(pb.ModelInferRequest.FromString(rest), max_id_chars=256, size=100, raw=raw).inputs["pixels"]
    np.testing.assert_array_equal(got, x)
    assert got.flags.aligned  # a view at an odd offset is copied once: onnxruntime's own copy is far slower


def test_every_refusal_maps_to_its_grpc_code_with_the_rest_body_text() -> None:
    noted = InputError("Input 'x' is odd.", hint="Send an even one.")
    noted.add_note("onnxruntime: node 7 said so")
    refusals = [
        (ProtocolError("Bad.", hint="Fix it."), grpc.StatusCode.INVALID_ARGUMENT),
        (noted, grpc.StatusCode.INVALID_ARGUMENT),
        (UnauthorizedError("Who?"), grpc.StatusCode.UNAUTHENTICATED),
        (ForbiddenError("No."), grpc.StatusCode.PERMISSION_DENIED),
        (ModelNotFoundError("Gone."), grpc.StatusCode.NOT_FOUND),
        (PayloadTooLargeError("Big."), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RateLimitedError("Slow down.", retry_after_s=2), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ServerBusyError("Full.", retry_after_s=1), grpc.StatusCode.UNAVAILABLE),
        (RequestTimeoutError("Late."), grpc.StatusCode.DEADLINE_EXCEEDED),
        (EngineError("onnxruntime crashed at /secret/path"), grpc.StatusCode.INTERNAL),
    ]
    for exc, code in refusals:
        assert STATUS_CODES.get(exc.status_code or 500, grpc.StatusCode.INTERNAL) is code, exc
        assert refusal(exc, "rid-1")[1] == json.loads(error_reply(exc, "rid-1").body)["error"], exc
    assert "/secret/path" not in refusal(refusals[-1][0], "rid-1")[1]  # a server fault's text stays in the log


# -- a real server: both protocols on loopback ---------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("serve-grpc")
    root = work / "repo"
    for name, version in [("mlp", "1"), ("mlp", "2"), ("echo", "1"), ("scorer", "1")]:
        add_version(root, name, version, work)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    settings = ServeSettings(
        port=0,
        grpc_port=free_port(),
        version_policy="all",
        access_log=False,
        guard=GuardSettings(
            api_key_hashes=frozenset({hash_key(API_KEY)}),
            admin_key_hashes=frozenset({hash_key(ADMIN_KEY)}),
            max_body_bytes=LIMIT,
        ),
    )
    with ServerThread(repo, settings) as running:
        yield running


@pytest.fixture(scope="module")
def target(server: ServerThread) -> str:
    return f"127.0.0.1:{server.settings.grpc_port}"


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(target) as c:
        yield c


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[stubs.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 4 * LIMIT)]) as channel:
        yield stubs.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def rest(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=HTTP_AUTH, timeout=30) as c:
        yield c


def _triton_input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_every_rpc_through_tritons_client_answers_as_rest_does(
    client: triton.InferenceServerClient, rest: httpx.Client
) -> None:
    assert client.is_server_live() and client.is_server_ready()  # no key needed, as over REST
    assert client.is_model_ready("mlp", headers=dict(KEY)) and client.is_model_ready("mlp", "1", headers=dict(KEY))
    meta = client.get_server_metadata(headers=dict(KEY))
    assert {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)} == rest.get("/v2").json()
    for path, (name, version) in {"/v2/models/mlp": ("mlp", ""), "/v2/models/mlp/versions/1": ("mlp", "1")}.items():
        got = client.get_model_metadata(name, version, headers=dict(KEY), as_json=True)
        want = rest.get(path).json()
        assert got["name"] == want["name"] and got["versions"] == want["versions"]
        assert got["platform"] == want["platform"]
        for side in ("inputs", "outputs"):
            assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in got[side]] == [
                (t["name"], t["datatype"], t["shape"]) for t in want[side]
            ]


def test_raw_infer_through_tritons_client_equals_rest_binary_and_onnxruntime(
    client: triton.InferenceServerClient, rest: httpx.Client
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    for version in ("1", "2"):
        result = client.infer(
            "mlp", [_triton_input("pixels", x, "FP32")], model_version=version, request_id="q7", headers=dict(KEY)
        )
        answer = result.get_response()
        assert (answer.model_name, answer.model_version, answer.id) == ("mlp", version, "q7")
        got = result.as_numpy("probabilities")
        head = {
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [3, 8], "parameters": {"binary_data_size": 96}}],
            "parameters": {"binary_data_output": True},
        }
        text = json.dumps(head).encode()
        response = rest.post(
            f"/v2/models/mlp/versions/{version}/infer",
            content=text + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(text))},
        )
        length = int(response.headers["inference-header-content-length"])
        want = np.frombuffer(response.content[length:], np.float32).reshape(3, 4)
        np.testing.assert_array_equal(got, want)  # the same engine, batcher and bytes: bit for bit
        np.testing.assert_allclose(got, Reference().run("mlp", version, {"pixels": x})["probabilities"], rtol=1e-5)


def test_bytes_and_fp16_round_trip_raw_through_tritons_client(client: triton.InferenceServerClient) -> None:
    text = np.array(["héllo", "", "wörld"], dtype=object)
    half = np.arange(6, dtype=np.float16).reshape(3, 2)
    result = client.infer(
        "echo", [_triton_input("text", text, "BYTES"), _triton_input("half", half, "FP16")], headers=dict(KEY)
    )
    assert [t.decode() for t in result.as_numpy("text_out")] == list(text)
    np.testing.assert_array_equal(result.as_numpy("half_out"), half * 2)


def test_typed_contents_round_trip_typed_and_equal_rest_json(
    stub: stubs.GRPCInferenceServiceStub, rest: httpx.Client
) -> None:
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="mlp", model_version="2", id="typed")
    request.inputs.add(name="pixels", datatype="FP32", shape=[2, 8]).contents.fp32_contents.extend(x.reshape(-1))
    answer = stub.ModelInfer(request, metadata=KEY)
    assert not answer.raw_output_contents and answer.id == "typed"
    (out,) = answer.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [2, 4])
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 8], "data": x.reshape(-1).tolist()}]}
    want = rest.post("/v2/models/mlp/versions/2/infer", json=body).json()["outputs"][0]["data"]
    np.testing.assert_array_equal(np.array(out.contents.fp32_contents, np.float32), np.array(want, np.float32))
    strings = pb.ModelInferRequest(model_name="echo")
    strings.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append("ünï".encode())
    strings.inputs.add(name="half", datatype="FP16", shape=[1, 2])
    strings.raw_input_contents.extend([struct.pack("<I", 6) + "ünï".encode(), np.ones((1, 2), np.float16).tobytes()])
    with pytest.raises(grpc.RpcError) as mixed:  # typed and raw in one request: the protocol forbids it
        stub.ModelInfer(strings, metadata=KEY)
    assert mixed.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "also carries raw" in mixed.value.details()


def _rest_error(rest: httpx.Client, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    response = rest.post(path, content=body, headers=headers or {})
    return response.status_code, response.json()["error"]


def _raw(model: str, datatype: str, shape: list[int], blob: bytes, **fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[blob], **fields)
    request.inputs.add(name="pixels", datatype=datatype, shape=shape)
    return request


def _binary(datatype: str, shape: list[int], blob: bytes, **extra: Any) -> tuple[bytes, dict[str, str]]:
    head = {
        "inputs": [
            {"name": "pixels", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(blob)}}
        ],
        **extra,
    }
    text = json.dumps(head).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text))}


def _cases() -> list[tuple[str, pb.ModelInferRequest, str, bytes, dict[str, str], grpc.StatusCode]]:
    """(label, gRPC request, REST path, REST body, REST headers, expected code) for the same mistake."""
    eight = np.full((1, 8), 0.5, np.float32)
    typed = pb.ModelInferRequest(model_name="mlp")
    typed.inputs.add(name="pixels", datatype="FP32", shape=[1, 8]).contents.fp32_contents.extend([0.5] * 7)
    json_seven = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 7}]})
    negative = pb.ModelInferRequest(model_name="mlp")
    negative.inputs.add(name="pixels", datatype="FP32", shape=[-1, 8]).contents.fp32_contents.extend([0.5] * 8)
    json_negative = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8], "data": [1] * 8}]})
    bad, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    infer = "/v2/models/mlp/infer"
    return [
        ("wrong datatype", _raw("mlp", "FP64", [1, 8], eight.astype(np.float64).tobytes()), infer,
         *_binary("FP64", [1, 8], eight.astype(np.float64).tobytes()), bad),
        ("shape and contents disagree", typed, infer, json_seven.encode(), {}, bad),
        ("raw contents of the wrong length", _raw("mlp", "FP32", [1, 8], eight.tobytes()[:28]), infer,
         *_binary("FP32", [1, 8], eight.tobytes()[:28]), bad),
        ("a negative dimension", negative, infer, json_negative.encode(), {}, bad),
        ("NaN in the input", _raw("mlp", "FP32", [1, 8], np.full((1, 8), np.nan, np.float32).tobytes()), infer,
         *_binary("FP32", [1, 8], np.full((1, 8), np.nan, np.float32).tobytes()), bad),
        ("an unknown output", _raw("mlp", "FP32", [1, 8], eight.tobytes(), outputs=[{"name": "nope"}]), infer,
         *_binary("FP32", [1, 8], eight.tobytes(), outputs=[{"name": "nope"}]), bad),
        ("an unknown model", _raw("ghost", "FP32", [1, 8], eight.tobytes()), "/v2/models/ghost/infer",
         *_binary("FP32", [1, 8], eight.tobytes()), not_found),
        ("an unknown version", _raw("mlp", "FP32", [1, 8], eight.tobytes(), model_version="9"),
         "/v2/models/mlp/versions/9/infer", *_binary("FP32", [1, 8], eight.tobytes()), not_found),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_a_malformed_request_gets_the_code_and_the_same_text_as_rest(
    stub: stubs.GRPCInferenceServiceStub, rest: httpx.Client, case: Any
) -> None:
    _, request, path, body, headers, code = case
    status, text = _rest_error(rest, path, body, headers)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, metadata=KEY)
    assert refused.value.code() is code, refused.value.details()
    assert refused.value.details() == text
    assert status == (404 if code is grpc.StatusCode.NOT_FOUND else 400)
    assert "Traceback" not in text


def test_a_large_raw_request_is_answered_as_rest_answers_it(
    client: triton.InferenceServerClient, stub: stubs.GRPCInferenceServiceStub, rest: httpx.Client
) -> None:
    """From SPLIT_FROM_BYTES on, the tensors are taken as views of the message (at any byte offset)."""
    rows = SPLIT_FROM_BYTES // 32 + 7
    x = np.random.default_rng(3).standard_normal((rows, 8)).astype(np.float32)
    got = client.infer("mlp", [_triton_input("pixels", x, "FP32")], headers=dict(KEY)).as_numpy("probabilities")
    body, headers = _binary("FP32", [rows, 8], x.tobytes(), parameters={"binary_data_output": True})
    response = rest.post("/v2/models/mlp/infer", content=body, headers=headers)
    length = int(response.headers["inference-header-content-length"])
    np.testing.assert_array_equal(got, np.frombuffer(response.content[length:], np.float32).reshape(rows, 4))
    for offset in range(1, 4):  # odd offsets: an id of 1-3 characters moves the tensor off 4-byte alignment
        request = _raw("mlp", "FP32", [rows, 8], x.tobytes(), id="i" * offset)
        answer = stub.ModelInfer(request, metadata=KEY)
        np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(rows, 4), got)
    nan = x.copy()
    nan[-1, -1] = np.nan  # past SUM_SCREEN_BELOW values: the NaN screen's other branch
    for shape, blob in (([rows, 8], x.tobytes()[:-4]), ([rows, 8], nan.tobytes())):  # refused with REST's text
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_raw("mlp", "FP32", shape, blob), metadata=KEY)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == _rest_error(rest, "/v2/models/mlp/infer", *_binary("FP32", shape, blob))[1]
    assert "1 NaN or Inf" in refused.value.details()


def test_auth_comes_from_the_same_metadata_keys_as_rest_headers(
    stub: stubs.GRPCInferenceServiceStub, server: ServerThread
) -> None:
    request = _raw("mlp", "FP32", [1, 8], np.zeros((1, 8), np.float32).tobytes())
    with httpx.Client(base_url=server.url) as anonymous:
        http = anonymous.post("/v2/models/mlp/infer", json={"inputs": []}).json()["error"]
    for metadata in ((), (("authorization", "Bearer wrong-key-but-long-enough"),), (("x-api-key", "nope"),)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, metadata=metadata)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.details() == http
    assert stub.ModelInfer(request, metadata=(("x-api-key", API_KEY),)).model_name == "mlp"
    with pytest.raises(grpc.RpcError) as two:
        stub.ModelInfer(request, metadata=(("x-api-key", API_KEY), ("authorization", f"Bearer {ADMIN_KEY}")))
    assert two.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "different keys" in two.value.details()
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # health needs no key


def test_bytes_that_are_no_infer_request_are_invalid_argument(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\xff\xff\xff", metadata=KEY)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("The request (3 bytes) is not a valid ModelInferRequest")


def test_a_message_over_the_body_limit_is_refused_and_the_server_keeps_serving(
    stub: stubs.GRPCInferenceServiceStub, client: triton.InferenceServerClient
) -> None:
    big = np.zeros((LIMIT // 32 + 64, 8), np.float32)  # just over the guard's limit
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_raw("mlp", "FP32", list(big.shape), big.tobytes()), metadata=KEY)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    x = np.ones((1, 8), np.float32)
    assert client.infer("mlp", [_triton_input("pixels", x, "FP32")], headers=dict(KEY)).as_numpy("probabilities").shape


def test_repository_rpcs_need_the_admin_key_and_load_and_unload(
    client: triton.InferenceServerClient, stub: stubs.GRPCInferenceServiceStub, rest: httpx.Client
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_repository_index(headers=dict(KEY))
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    rows = client.get_model_repository_index(headers=dict(ADMIN), as_json=True)["models"]
    http = rest.post("/v2/repository/index", json={}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert [(r["name"], r["version"], r["state"]) for r in rows] == [
        (r["name"], r["version"], r["state"]) for r in http
    ]
    client.unload_model("scorer", headers=dict(ADMIN))
    ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=ADMIN).models
    assert {r.name for r in ready} == {"mlp", "echo"}
    client.load_model("scorer", headers=dict(ADMIN))
    assert client.is_model_ready("scorer", headers=dict(KEY))


def test_grpc_requests_are_counted_in_the_same_metrics(
    client: triton.InferenceServerClient, rest: httpx.Client
) -> None:
    def count(status: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in rest.get("/metrics").text.splitlines()
            if line.startswith("slipstream_requests_total{") and 'model="mlp"' in line and f'status="{status}"' in line
        )

    ok, refused = count("200"), count("400")
    for _ in range(3):
        client.infer("mlp", [_triton_input("pixels", np.ones((1, 8), np.float32), "FP32")], headers=dict(KEY))
    with pytest.raises(InferenceServerException):
        client.infer("mlp", [_triton_input("pixels", np.ones((1, 8)), "FP64")], headers=dict(KEY))
    assert (count("200"), count("400")) == (ok + 3, refused + 1)


def test_a_taken_grpc_port_fails_start_up_loudly(repo: Path) -> None:
    async def start(port: int) -> None:
        app = create_app(repo, ServeSettings(port=0, grpc_port=port, access_log=False))
        try:
            await app.startup()
        finally:
            assert app.grpc is None and app.core.draining  # the core was stopped again: nothing left running

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServingError, match="could not bind"):
            asyncio.run(start(taken.getsockname()[1]))


def test_the_rate_limit_is_shared_with_rest_and_says_when_to_retry(repo: Path) -> None:
    settings = ServeSettings(
        port=0,
        grpc_port=free_port(),
        access_log=False,
        guard=GuardSettings(api_key_hashes=frozenset({hash_key(API_KEY)}), rate_per_s=0.01, burst=2),
    )
    with ServerThread(repo, settings) as running, grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as ch:
        stub = stubs.GRPCInferenceServiceStub(ch)
        assert stub.ModelReady(pb.ModelReadyRequest(name="mlp"), metadata=KEY).ready  # one token of two
        http = httpx.get(f"{running.url}/v2/models/mlp/ready", headers=HTTP_AUTH)  # the other, over REST
        assert http.status_code == 200
        with pytest.raises(grpc.RpcError) as limited:
            stub.ModelReady(pb.ModelReadyRequest(name="mlp"), metadata=KEY)
        http = httpx.get(f"{running.url}/v2/models/mlp/ready", headers=HTTP_AUTH)
    assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited.value.details() == http.json()["error"] and http.status_code == 429
    assert dict(limited.value.trailing_metadata())["retry-after"] == http.headers["retry-after"]


def test_grpc_port_is_a_serve_option_and_a_setting() -> None:
    from typer.testing import CliRunner

    from slipstream.cli import app
    from slipstream.serve.server import settings_from_options

    assert "--grpc-port" in CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    assert settings_from_options({"grpc_port": 8001}, {}).grpc_port == 8001
    assert ServeSettings().grpc_port is None  # off unless asked for
