"""ortserve.v1.TextGeneration: the typed streaming service over the same generation scheduler."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from server.core.errors import InvalidInputError, quoted
from server.core.sampling import SamplingParams
from server.core.model import Model
from server.repository.registry import ModelRegistry
from server.rpc import status
from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc


def sampling_params_from_pb(request: gen_pb.GenerateRequest) -> SamplingParams:
    """Sampling settings from a GenerateRequest, with the documented defaults for unset fields."""
    return SamplingParams(
        max_tokens=request.max_tokens or 64,
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        repetition_penalty=request.repetition_penalty if request.HasField("repetition_penalty") else 1.0,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
    )


class TextGenerationServicer(gen_grpc.TextGenerationServicer):
    """Streams completions from a generation model in the registry."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    @status.streaming
    async def Generate(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        model = self._registry.get(request.model, request.model_version)
        generator = model.generator if isinstance(model, Model) else None
        if not isinstance(model, Model) or generator is None:
            raise InvalidInputError(f"model {quoted(request.model)} is not a text-generation model")
        params = sampling_params_from_pb(request)
        started = time.perf_counter_ns()
        ok = False
        try:
            async for chunk in generator.generate(request.prompt.encode("utf-8"), params, context.time_remaining()):
                yield gen_pb.GenerateResponse(
                    text=chunk.text,
                    token_ids=chunk.token_ids,
                    finish_reason=chunk.finish_reason or "",
                    prompt_tokens=chunk.prompt_tokens,
                    completion_tokens=chunk.completion_tokens,
                )
            ok = True
        finally:
            model.record_generation(ok, time.perf_counter_ns() - started)
