"""OpenAI-compatible `POST /v1/embeddings` over the data plane's embedding models (service/embeddings.py).

Honoured request fields: model, input (a string or a list of strings; OpenAI's token-id
forms are refused with 400, since the model tokenizes text itself), encoding_format
(float, the default, or base64: the little-endian float32 bytes, which the openai
package asks for by default), dimensions (only the model's own). Other fields (user...)
are ignored. Errors are OpenAI's error object, from the app's one error table.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import Response

from server.core.errors import InvalidInputError
from server.http import data_plane, until_disconnect
from server.service import embeddings

router = APIRouter(tags=["openai"])


class EmbeddingRequest(BaseModel):
    """The fields of OpenAI's embeddings request that this server reads."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def _texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if all(isinstance(v, str) for v in value):
        return [v for v in value if isinstance(v, str)]
    raise InvalidInputError("input as token ids is not supported: send text (a string or a list of strings)")


def _parse(raw: bytes) -> EmbeddingRequest:
    try:
        return EmbeddingRequest.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"the request body is not valid JSON: {exc}"[:200]) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInputError(f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}") from exc


@router.post(
    "/v1/embeddings",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EmbeddingRequest.model_json_schema()}},
        }
    },
)
async def create_embeddings(request: Request) -> Response:
    """Embeds each input text with the named embedding model; vectors come back in input order."""
    body = _parse(await request.body())
    texts = _texts(body.input)
    plane = data_plane(request)
    result = await until_disconnect(request, embeddings.embed(plane, body.model, texts))
    dim = int(result.vectors.shape[1])
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidInputError(f"dimensions must be the model's own ({dim}); got {body.dimensions}")
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(result.vectors):
        value: Any = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    content = {"object": "list", "data": data, "model": body.model, "usage": usage}
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
