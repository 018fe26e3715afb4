"""A client for ortserve (and any Open Inference Protocol / KServe v2 gRPC server) that stands alone.

It needs grpcio, protobuf and numpy (Pillow for images), never the server: the protocol modules in
`ortserve_client.pb` are generated from the repository's protos/ for this package (clients/python/gen_stubs.py).

    ortserve_client.pb.grpc_service_pb2(_grpc)     inference.GRPCInferenceService (Triton-compatible)
    ortserve_client.pb.text_generation_pb2(_grpc)  ortserve.v1.TextGeneration
    ortserve_client.codec                          numpy <-> raw and typed tensor contents
    python -m ortserve_client.predict              one inference from the command line
    python -m ortserve_client.generate             a streamed completion to the terminal
"""

from __future__ import annotations

__version__ = "0.1.0"
