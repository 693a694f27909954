"""The gRPC section's transport floor: a grpc.aio server whose ModelInfer does nothing.

It answers every ``inference.GRPCInferenceService/ModelInfer`` call with the same pre-serialized, empty
``ModelInferResponse``, without parsing the request (a generic handler with no serializers: bytes in, bytes
out), on the same uvloop and with the same channel options as slipstream's gRPC front end. What a call costs
here is what grpcio's asyncio server costs on its own, so slipstream's gRPC req/s over this floor's says what
its decoding, checks, batching and metrics cost, and REST's req/s over this floor's says how much of the gap
between the protocols is the library's.

    python benchmarks/baselines/grpc_empty.py --port 8003
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # run from a checkout, too

from slipstream.serve.grpc import grpc_predict_v2_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


async def serve(port: int) -> None:
    reply = pb.ModelInferResponse(model_name="empty", model_version="1").SerializeToString()

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    async def live(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ServerLive": grpc.unary_unary_rpc_method_handler(live),
    }
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.http2.max_frame_size", 1024 * 1024),  # as slipstream's front end sets them
            ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
        ]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpc empty floor on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
