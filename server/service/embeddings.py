"""Sentence embeddings for the OpenAI-style route, known to no transport: which models embed, and embedding.

An embedding model is any served model (typically an ensemble: tokenizer -> encoder with pooling)
whose signature is text in, vector out: one BYTES input of dims [1] with a batch dimension, and
an FP32 output named `embedding` of dims [D]. An INT64 output `token_count` [1], when the model
has one, gives the tokens each text used (OpenAI's usage.prompt_tokens). Nothing else marks a
model: exporters/hf_encoder.py writes exactly this signature, and so can anyone by hand.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from server.core.errors import InvalidInputError, quoted
from server.core.model import ModelSignature
from server.core.types import InferRequest, InputTensor, RequestedOutput
from server.service import access
from server.service.dataplane import DataPlane

EMBEDDING_OUTPUT = "embedding"
TOKEN_COUNT_OUTPUT = "token_count"
# OpenAI's own bound on inputs per request; bigger lists are split into the model's batches anyway.
MAX_INPUTS = 2048


@dataclass(frozen=True)
class Embeddings:
    """The vectors of one request, in input order, and the tokens they used (0 when the model does not say)."""

    vectors: np.ndarray
    prompt_tokens: int


def why_not_embedding(signature: ModelSignature) -> str:
    """Why a signature is not an embedding model's, or "" when it is one."""
    if signature.max_batch_size <= 0:
        return "it does not batch (max_batch_size 0)"
    if len(signature.inputs) != 1 or signature.inputs[0].datatype != "BYTES" or signature.inputs[0].dims != (1,):
        return "it does not take one BYTES input of dims [1] (text)"
    output = next((o for o in signature.outputs if o.name == EMBEDDING_OUTPUT), None)
    if output is None or output.datatype != "FP32" or len(output.dims) != 1:
        return f"it has no FP32 output {quoted(EMBEDDING_OUTPUT)} of one dimension"
    return ""


def embedding_models(dataplane: DataPlane) -> list[str]:
    """Names of the ready embedding models, sorted."""
    names = []
    for entry in dataplane.repository_index(ready_only=True):
        if dataplane.registry.is_ready(entry.name):
            if not why_not_embedding(dataplane.registry.get(entry.name).signature):
                names.append(entry.name)
    return sorted(set(names))


def _signature(dataplane: DataPlane, name: str) -> ModelSignature:
    signature: ModelSignature = dataplane.registry.get(name, "").signature
    why = why_not_embedding(signature)
    if why:
        raise InvalidInputError(f"model {quoted(name)} is not an embedding model: {why}")
    return signature


async def embed(dataplane: DataPlane, name: str, texts: list[str], request_id: str = "") -> Embeddings:
    """Embeds the texts with model `name`, in batches of the model's max_batch_size run concurrently.

    Raises:
        ServerUnavailableError: the server is draining.
        InvalidInputError: no model name, no or too many texts, an empty text, or not an embedding model.
        ModelNotFoundError, ModelNotReadyError: as ModelRegistry.get.
        ServerError: from the model's steps (queue full, deadline...).
    """
    dataplane.check_accepting()
    if not name:
        raise InvalidInputError("model is required")
    if len(name) > 128:
        raise InvalidInputError(f"model name {quoted(name)} is too long")
    access.check_model(name)  # before the signature is looked at: a model the caller may not use stays opaque
    if not texts:
        raise InvalidInputError("input must hold at least one text")
    if len(texts) > MAX_INPUTS:
        raise InvalidInputError(f"input holds {len(texts)} texts; at most {MAX_INPUTS} per request")
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise InvalidInputError(f"input[{empty[0]}] is an empty string; every input must hold some text")
    signature = _signature(dataplane, name)
    text_input = signature.inputs[0].name
    counted = any(o.name == TOKEN_COUNT_OUTPUT and o.datatype == "INT64" for o in signature.outputs)
    outputs = [EMBEDDING_OUTPUT] + ([TOKEN_COUNT_OUTPUT] if counted else [])
    size = signature.max_batch_size

    async def run(chunk: list[str]) -> list[np.ndarray]:
        data = np.array([[t.encode("utf-8")] for t in chunk], dtype=object).reshape(len(chunk), 1)
        request = InferRequest(
            model_name=name,
            id=request_id,
            inputs=[InputTensor(text_input, "BYTES", data.shape, data)],
            outputs=[RequestedOutput(o) for o in outputs],
        )
        response = await dataplane.infer(request)
        by_name = {o.name: o.data for o in response.outputs}
        return [by_name[o] for o in outputs]

    results = await asyncio.gather(*(run(texts[i : i + size]) for i in range(0, len(texts), size)))
    vectors = np.concatenate([r[0] for r in results]).astype(np.float32, copy=False)
    tokens = int(sum(int(r[1].sum()) for r in results)) if counted else 0
    return Embeddings(vectors, tokens)
