"""OpenAI-compatible routes for text-generation models: /v1/models, /v1/completions, /v1/chat/completions.

Thin adapters over the data plane (service/textgen.py): a request becomes a prompt and
SamplingParams, the model's TokenChunks become OpenAI's objects, streamed as server-sent events
(sse.py) when `stream` is true.

Honoured request fields: model, prompt (a string or a list of one string), messages (text
content: a string or a list of {"type": "text"} parts), max_tokens (chat: also
max_completion_tokens), temperature, top_p, seed, stop (a string or a list), n (1 only),
stream, stream_options.include_usage, echo (completions), and the common extensions top_k,
repetition_penalty, min_tokens, ignore_eos. logprobs/top_logprobs are refused (400): the
model does not give them. Every other field is ignored, as OpenAI clients send many.
Errors use OpenAI's error object {"error": {"message", "type", "param", "code"}}.

The app holds the data plane as `app.state.plane` (server/http/app.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from server.core.chat_template import ChatMessage
from server.core.errors import InvalidInputError, ServerError
from server.core.generation import TokenChunk
from server.core.generation_stream import TokenLogprob
from server.core.sampling import MODEL_DEFAULTED, SamplingParams
from server.http import data_plane, logprobs_fields, until_disconnect
from server.http.auth import refusal_headers
from server.http.errors import log_error, openai_error_body, status_for
from server.http.sse import EventStream, close_source, prefetch
from server.service import embeddings, textgen

logger = logging.getLogger(__name__)

# OpenAI's default for /v1/completions; chat requests without max_tokens run to the end of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
OWNER = "ortserve"


class _JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _error_response(exc: BaseException, where: str) -> Response:
    log_error(exc, where)
    status, message = status_for(exc)
    # Retry-After of a principal's rate or stream limit (--auth-config).
    return _JSONResponse(openai_error_body(status, message), status_code=status, headers=refusal_headers(exc))


def _validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for error in list(errors)[:3]:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        if error.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        parts.append(f"{location or 'body'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


class OpenAIRoute(APIRoute):
    """Answers every failure of these routes, request validation included, with OpenAI's error object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        where = self.path

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _error_response(InvalidInputError(_validation_message(exc.errors())), where)
            except ServerError as exc:
                return _error_response(exc, where)

        return route


router = APIRouter(route_class=OpenAIRoute, tags=["openai"])


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, description="Most tokens to generate.")
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions of vLLM and others; genai-perf and load tools send them.
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None

    def check_common(self) -> None:
        if self.n is not None and self.n != 1:
            raise InvalidInputError(f"n must be 1: this server returns one choice per request (got {self.n})")

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop: tuple[str, ...] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        defaults = SamplingParams()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(s for s in stop if s),
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            repetition_penalty=(
                defaults.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty
            ),
            min_tokens=defaults.min_tokens if self.min_tokens is None else self.min_tokens,
            ignore_eos=defaults.ignore_eos if self.ignore_eos is None else self.ignore_eos,
            unset=frozenset(name for name in MODEL_DEFAULTED if getattr(self, name) is None),
        )


class CompletionRequest(_GenerationFields):
    """POST /v1/completions (the honoured fields; others are ignored)."""

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ChatContentPart] | None = None


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions (the honoured fields; others are ignored)."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


_Body = TypeVar("_Body", bound=BaseModel)


def _chat_prompts(request: Request) -> textgen.ChatPrompts:
    prompts = getattr(request.app.state, "chat_prompts", None)
    if prompts is None:
        prompts = request.app.state.chat_prompts = textgen.ChatPrompts()
    return prompts


def _usage(last: TokenChunk | None) -> dict[str, int]:
    prompt, completion = (last.prompt_tokens, last.completion_tokens) if last is not None else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prompt_text(body: CompletionRequest) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise InvalidInputError(f"prompt must be a string or a list of one string (got a list of {len(body.prompt)})")
    return body.prompt[0]


def _message(message: ChatMessageIn, index: int) -> ChatMessage:
    content = message.content
    if content is None:
        return ChatMessage(message.role, "")
    if isinstance(content, str):
        return ChatMessage(message.role, content)
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise InvalidInputError(f"messages[{index}]: only text content parts are supported")
        texts.append(part.text)
    return ChatMessage(message.role, "".join(texts))


def _error_event(exc: Exception) -> dict[str, object]:
    log_error(exc, "openai stream")
    status, message = status_for(exc)
    return openai_error_body(status, message)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """The ready text-generation and embedding models, as OpenAI's model list."""
    plane = data_plane(request)
    names = sorted({*textgen.generation_models(plane), *embeddings.embedding_models(plane)})
    data = [{"id": name, "object": "model", "created": 0, "owned_by": OWNER} for name in names]
    return _JSONResponse({"object": "list", "data": data})


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its JSON itself (see _parse)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _parse(request: Request, model: type[_Body]) -> _Body:
    """The JSON body as `model`, whatever the Content-Type (curl -d sends a form type; OpenAI servers accept it).

    Raises:
        InvalidInputError: the body is not JSON, or not an object of the expected fields.
    """
    try:
        raw = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"the request body is not valid JSON: {exc}"[:200]) from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInputError(_validation_message(exc.errors())) from exc


@router.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
async def completions(request: Request) -> Response:
    """Completes a prompt; `stream: true` answers with server-sent events ending in `data: [DONE]`."""
    body = await _parse(request, CompletionRequest)
    body.check_common()
    prompt = _prompt_text(body)
    max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = dataclasses.replace(body.sampling(max_tokens), logprobs=body.logprobs)
    chunks = textgen.generate(data_plane(request), body.model, prompt, params)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = prompt if body.echo else ""

    def choice(text: str, finish: str | None, entries: list[TokenLogprob] | None, offset: int) -> dict[str, Any]:
        logprobs = None if body.logprobs is None else logprobs_fields.completion(entries or [], offset)
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    if not body.stream:
        text, last, entries = await until_disconnect(request, _collect(chunks))
        return _JSONResponse({
            "id": ident, "object": "text_completion", "created": created, "model": body.model,
            "choices": [choice(echo + text, last.finish_reason if last else None, entries, len(echo))],
            "usage": _usage(last),
        })

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events(source: AsyncIterator[TokenChunk]) -> AsyncIterator[dict[str, Any]]:
        base = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
        extra: dict[str, Any] = {"usage": None} if include_usage else {}
        prefix = echo
        last = None
        offset = 0  # characters of the completion so far: OpenAI's text_offset
        try:
            async for chunk in source:
                last = chunk
                entry = choice(prefix + chunk.text, chunk.finish_reason, chunk.logprobs, offset + len(prefix))
                yield {**base, "choices": [entry], **extra}
                offset += len(prefix + chunk.text)
                prefix = ""
        finally:
            await close_source(source)  # a stream cancelled by EventStream ends its generation too
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(last)}

    source = await until_disconnect(request, prefetch(chunks))
    return EventStream(events(source), error_event=_error_event, done="[DONE]")


@router.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """Answers a chat; the prompt comes from the model's chat template (core/chat_template.py)."""
    body = await _parse(request, ChatCompletionRequest)
    body.check_common()
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInputError("top_logprobs needs logprobs: true")
    want_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    dataplane = data_plane(request)
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    prompt = _chat_prompts(request).prompt(dataplane, body.model, messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    # Without a limit the answer may fill the context (the scheduler stops it there).
    max_tokens = requested if requested is not None else textgen.context_length(dataplane, body.model)
    params = dataclasses.replace(body.sampling(max_tokens), logprobs=want_logprobs)
    chunks = textgen.generate(dataplane, body.model, prompt, params)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        return None if want_logprobs is None else logprobs_fields.chat(entries or [])

    if not body.stream:
        text, last, entries = await until_disconnect(request, _collect(chunks))
        return _JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": chat_logprobs(entries),
                "finish_reason": last.finish_reason if last else None,
            }],
            "usage": _usage(last),
        })

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events(source: AsyncIterator[TokenChunk]) -> AsyncIterator[dict[str, Any]]:
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model}
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk_event(
            delta: dict[str, Any], finish: str | None, entries: list[TokenLogprob] | None = None
        ) -> dict[str, Any]:
            logprobs = chat_logprobs(entries) if entries else None
            entry = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**base, "choices": [entry], **extra}

        # The first chunk carries the role, as OpenAI's does.
        yield chunk_event({"role": "assistant", "content": ""}, None)
        last = None
        try:
            async for chunk in source:
                last = chunk
                if chunk.text or chunk.logprobs:
                    yield chunk_event({"content": chunk.text}, None, chunk.logprobs)
                if chunk.finish_reason is not None:
                    yield chunk_event({}, chunk.finish_reason)
        finally:
            await close_source(source)  # a stream cancelled by EventStream ends its generation too
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(last)}

    source = await until_disconnect(request, prefetch(chunks))
    return EventStream(events(source), error_event=_error_event, done="[DONE]")


async def _collect(chunks: AsyncIterator[TokenChunk]) -> tuple[str, TokenChunk | None, list[TokenLogprob]]:
    parts, last, entries = [], None, list[TokenLogprob]()
    async for chunk in chunks:
        parts.append(chunk.text)
        entries.extend(chunk.logprobs or ())
        last = chunk
    return "".join(parts), last, entries
