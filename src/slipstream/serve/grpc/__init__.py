"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), beside the HTTP front end.

``grpc_predict_v2.proto`` is KServe's definition with Triton's repository RPCs, so that Triton's and
KServe's clients work unchanged; the ``*_pb2*`` stubs are generated from it (``generate.py``) and checked
in. The server (``server.py``) is a thin adapter over the same ``InferenceCore`` as HTTP.
"""
