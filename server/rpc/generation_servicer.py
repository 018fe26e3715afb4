"""ortserve.v1.TextGeneration: the typed streaming service, over the data plane."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence

import grpc

from server.core.generation_stream import TokenLogprob
from server.core.sampling import MODEL_DEFAULTED
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
        # Settings left out take the model's defaults (top_k has no presence: 0 counts as left out).
        given = {
            "temperature": request.HasField("temperature"), "top_p": request.HasField("top_p"),
            "repetition_penalty": request.HasField("repetition_penalty"), "top_k": request.top_k != 0,
        }
        unset = frozenset(name for name in MODEL_DEFAULTED if not given[name])
        params = dataclasses.replace(
            params, logprobs=request.logprobs if request.HasField("logprobs") else None, unset=unset
        )
        chunks = self._plane.generate(
            request.model, request.model_version, request.prompt, params, context.time_remaining()
        )
        async for chunk in chunks:
            response = converters.token_chunk_to_pb(chunk)
            if chunk.logprobs:
                response.logprobs.extend(_logprobs_to_pb(chunk.logprobs))
            yield response


def _logprobs_to_pb(entries: Sequence[TokenLogprob]) -> list[gen_pb.TokenLogprob]:
    return [
        gen_pb.TokenLogprob(
            token_id=e.token_id, text=e.text, logprob=e.logprob,
            top=[gen_pb.TokenLogprob(token_id=i, text=t, logprob=lp) for i, t, lp in e.top],
        )
        for e in entries
    ]
