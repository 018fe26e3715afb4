"""KServe v2 REST with Triton's extensions, and Triton's generate extension: thin routes over the data plane.

Each route converts (binary.py for inference bodies), awaits the data plane, converts back.
Errors are the domain exceptions; app.py's handlers turn them into statuses (errors.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from server.core import datatypes
from server.core.errors import InvalidInputError, UnsupportedError, quoted
from server.core.types import InferRequest, InputTensor, ParamValue, TextResponse
from server.http import binary, data_plane, until_disconnect
from server.http.errors import error_body, log_error, status_for
from server.http.sse import EventStream, prefetch
from server.logs import adopt_request_id
from server.repository.config import config_from_json, config_to_dict
from server.schema import model_config_pb2 as mc
from server.service.dataplane import ModelMetadata
from server.service.statistics import BATCH_DURATIONS, REQUEST_DURATIONS, VersionStatistics

router = APIRouter(tags=["KServe v2"])

JSON = "application/json"


def json_response(content: Any, status_code: int = 200) -> Response:
    """A JSON answer encoded with orjson."""
    return Response(orjson.dumps(content), status_code=status_code, media_type=JSON)


def _flag(value: bool) -> Response:
    """Triton's health and readiness answers: 200 or 400, empty body."""
    return Response(status_code=200 if value else 400)


async def _json_body(request: Request, optional: bool = False) -> dict[str, Any]:
    body = await request.body()
    if optional and not body.strip():
        return {}
    document = binary.parse_json(body)
    if not isinstance(document, dict):
        raise InvalidInputError("request body must be a JSON object")
    return document


# Health and metadata.


@router.get("/v2/health/live", summary="Server liveness (200 live, 400 not)")
async def server_live(request: Request) -> Response:
    return _flag(data_plane(request).live())


@router.get("/v2/health/ready", summary="Server readiness (200 ready, 400 not)")
async def server_ready(request: Request) -> Response:
    return _flag(data_plane(request).ready())


@router.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    plane = data_plane(request)
    meta = plane.metadata()
    response = json_response({"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)})
    if plane.worker_index is not None:
        # Says which worker process answered (diagnostics, and tests of --workers), as on gRPC.
        response.headers["ortserve-worker"] = str(plane.worker_index)
    return response


# /v2/models/stats comes before /v2/models/{name}, which would otherwise take "stats" as a name.
@router.get("/v2/models/stats", summary="Statistics of every model")
@router.get("/v2/models/{name}/stats", summary="Statistics of a model")
@router.get("/v2/models/{name}/versions/{version}/stats", summary="Statistics of a model version")
async def model_statistics(request: Request, name: str = "", version: str = "") -> Response:
    stats = await data_plane(request).statistics(name, version)
    return json_response({"model_stats": [_statistics_json(s) for s in stats]})


def _statistics_json(stats: VersionStatistics) -> dict[str, Any]:
    def duration(d: Any) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    inference = {field: duration(stats.requests[field]) for field in REQUEST_DURATIONS}
    # Triton's response cache: never used here, always zero (clients read the fields).
    inference.setdefault("cache_hit", {"count": 0, "ns": 0})
    inference.setdefault("cache_miss", {"count": 0, "ns": 0})
    return {
        "name": stats.name, "version": stats.version, "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count, "execution_count": stats.execution_count,
        "inference_stats": inference,
        "batch_stats": [
            {"batch_size": size, **{field: duration(durations[field]) for field in BATCH_DURATIONS}}
            for size, durations in sorted(stats.batches.items())
        ],
    }


@router.get("/v2/models/{name}", summary="Model metadata")
@router.get("/v2/models/{name}/versions/{version}", summary="Model version metadata")
async def model_metadata(request: Request, name: str, version: str = "") -> Response:
    return json_response(_metadata_json(data_plane(request).model_metadata(name, version)))


def _metadata_json(meta: ModelMetadata) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
        "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs),
    }


@router.get("/v2/models/{name}/ready", summary="Model readiness (200 ready, 400 not)")
@router.get("/v2/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_ready(request: Request, name: str, version: str = "") -> Response:
    return _flag(data_plane(request).model_ready(name, version))


@router.get("/v2/models/{name}/config", summary="Model configuration (Triton's ModelConfig as JSON)")
@router.get("/v2/models/{name}/versions/{version}/config", summary="Model version configuration")
async def model_config(request: Request, name: str, version: str = "") -> Response:
    config = data_plane(request).model_config(name, version)
    return json_response(config_to_dict(config))


# Inference.


@router.post("/v2/models/{name}/infer", summary="Inference (JSON tensors, or Triton's binary tensor extension)")
@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on a model version")
async def model_infer(request: Request, name: str, version: str = "") -> Response:
    plane = data_plane(request)
    plane.check_accepting()
    body = await request.body()
    decoded = binary.decode_infer_request(body, request.headers.get(binary.HEADER_LENGTH), name, version)
    response = await until_disconnect(request, plane.infer(decoded.request))
    content, header_length = binary.encode_infer_response(response, decoded.binary_default, decoded.binary_outputs)
    if header_length is None:
        return Response(content, media_type=JSON)
    return Response(
        content, media_type="application/octet-stream", headers={binary.HEADER_LENGTH: str(header_length)}
    )


# Triton's generate extension.


@router.post("/v2/models/{name}/generate", summary="Text generation, one JSON answer")
@router.post("/v2/models/{name}/versions/{version}/generate", summary="Text generation on a model version")
async def model_generate(request: Request, name: str, version: str = "") -> Response:
    plane = data_plane(request)
    plane.check_accepting()
    infer_request = _generate_request(request, await _json_body(request), name, version)

    async def answer() -> TextResponse:
        texts = plane.generate_text(infer_request, decoupled=False)
        return [text async for text in texts][-1]

    return json_response(_generate_json(await until_disconnect(request, answer())))


@router.post("/v2/models/{name}/generate_stream", summary="Text generation as server-sent events")
@router.post("/v2/models/{name}/versions/{version}/generate_stream", summary="Streamed generation on a version")
async def model_generate_stream(request: Request, name: str, version: str = "") -> Response:
    plane = data_plane(request)
    plane.check_accepting()
    infer_request = _generate_request(request, await _json_body(request), name, version)

    async def events() -> AsyncIterator[dict[str, Any]]:
        async for text in plane.generate_text(infer_request, decoupled=True):
            yield _generate_json(text)

    # The first event is awaited here, so that a refusal (bad settings, full queue) is a status.
    first = await until_disconnect(request, prefetch(events()))
    return EventStream(first, error_event=_stream_error)


def _stream_error(exc: Exception) -> dict[str, str]:
    log_error(exc, "generate_stream")
    return error_body(status_for(exc)[1])


def _generate_json(text: TextResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": text.model_name, "model_version": text.model_version}
    if text.id:
        out["id"] = text.id
    if text.text is not None:
        out["text_output"] = text.text
    return out


def _generate_request(request: Request, body: dict[str, Any], name: str, version: str) -> InferRequest:
    """Triton's mapping: each top-level field is an input tensor of one element; `parameters` are parameters.

    A number takes the datatype of the model's input of that name (INT32 for max_tokens).
    """
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInputError("'id' must be a string")
    adopt_request_id(request_id)  # first: a request refused below is logged under its id
    declared = {t.name: t.datatype for t in data_plane(request).model_metadata(name, version).inputs}
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' must be a JSON object")
    for key, value in parameters.items():
        # `stop` may be a list of strings, as in the JSON sampling_parameters.
        if not isinstance(value, (bool, int, float, str)) and not (key == "stop" and isinstance(value, list)):
            raise InvalidInputError(f"parameter {quoted(key)} must be a bool, a number or a string")
    inputs = []
    element: Any
    for key, value in body.items():
        if key in ("id", "parameters"):
            continue
        if isinstance(value, str):
            datatype, element = "BYTES", value.encode("utf-8")
        elif isinstance(value, bool):
            datatype, element = "BOOL", value
        elif isinstance(value, (int, float)):
            datatype, element = declared.get(key, "INT64" if isinstance(value, int) else "FP64"), value
            if datatype not in datatypes.BY_NAME or datatype in ("BYTES", "BOOL"):
                raise InvalidInputError(f"field {quoted(key)} must be a {datatype.lower()} value")
        else:
            raise InvalidInputError(f"field {quoted(key)} must be a string, a bool or a number")
        try:
            data = np.array([element], dtype=datatypes.BY_NAME[datatype].numpy_dtype)
        except (OverflowError, ValueError) as exc:
            raise InvalidInputError(f"field {quoted(key)} is out of the {datatype} range") from exc
        inputs.append(InputTensor(key, datatype, (1,), data))
    params: dict[str, ParamValue] = parameters
    return InferRequest(name, version, request_id, inputs, [], params)


# The model repository extension.


@router.post("/v2/repository/index", summary="Every model in the repository, with its state")
async def repository_index(request: Request) -> Response:
    body = await _json_body(request, optional=True)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInputError("'ready' must be true or false")
    rows = data_plane(request).repository_index(ready_only=ready)
    return json_response([
        {"name": r.name, **({"version": r.version} if r.version else {}), "state": r.state, "reason": r.reason}
        for r in rows
    ])


@router.post("/v2/repository/models/{name}/load", summary="Load or reload a model (explicit control mode)")
async def repository_load(request: Request, name: str) -> Response:
    body = await _json_body(request, optional=True)
    parameters = binary.parameters_from_json(body.get("parameters"), "parameters")
    await data_plane(request).load(name, _config_override(parameters))
    return Response(status_code=200)


@router.post("/v2/repository/models/{name}/unload", summary="Unload a model (explicit control mode)")
async def repository_unload(request: Request, name: str) -> Response:
    body = await _json_body(request, optional=True)
    binary.parameters_from_json(body.get("parameters"), "parameters")
    await data_plane(request).unload(name)
    return Response(status_code=200)


def _config_override(parameters: dict[str, ParamValue]) -> mc.ModelConfig | None:
    """The load's `config` parameter (a JSON ModelConfig), if given."""
    if any(key.startswith("file:") for key in parameters):
        raise UnsupportedError("loading model files sent in the request (file: parameters) is not supported")
    if "config" not in parameters:
        return None
    text = parameters["config"]
    if not isinstance(text, str):
        raise InvalidInputError("the 'config' parameter must be a JSON string")
    return config_from_json(text)
