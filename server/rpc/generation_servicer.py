"""ortserve.v1.TextGeneration: the typed streaming service, over the data plane."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from server.rpc import converters, status
from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc
from server.service.dataplane import DataPlane


class TextGenerationServicer(gen_grpc.TextGenerationServicer):
    """Streams completions from a generation model."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    @status.streaming
    async def Generate(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        params = converters.sampling_params_from_pb(request)
        chunks = self._plane.generate(
            request.model, request.model_version, request.prompt, params, context.time_remaining()
        )
        async for chunk in chunks:
            yield converters.token_chunk_to_pb(chunk)
