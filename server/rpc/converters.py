"""Protobuf <-> core type conversion: one pair of functions per message."""

from __future__ import annotations

from typing import Any

from server.core import bytes_codec, datatypes
from server.core.errors import InvalidInputError, UnsupportedError, quoted
from server.core.generation import TokenChunk
from server.core.sampling import SamplingParams
from server.core.statistics import Duration
from server.core.types import InferRequest, InferResponse, InputTensor, ParamValue, RequestedOutput
from server.repository import config as model_config
from server.repository.registry import IndexEntry
from server.rpc import tensor_codec
from server.rpc.pb import grpc_service_pb2 as pb
from server.rpc.pb import text_generation_pb2 as gen_pb
from server.schema import model_config_pb2 as mc
from server.service.dataplane import ModelMetadata, ServerMetadata
from server.service.statistics import BATCH_DURATIONS, REQUEST_DURATIONS, VersionStatistics

MAX_DIMS = 32


def params_from_pb(params: Any) -> dict[str, ParamValue]:
    """An InferParameter map as plain values (unset oneofs are left out)."""
    out: dict[str, ParamValue] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(param, choice)
    return out


def params_to_pb(values: dict[str, ParamValue], target: Any) -> None:
    """Writes plain values into an InferParameter map."""
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = str(value)


def infer_request_from_pb(request: pb.ModelInferRequest) -> InferRequest:
    """Decodes and checks the protocol-level rules of a ModelInferRequest.

    Model-level checks (names, shapes against the model) happen in the model.

    Raises:
        InvalidInputError: unknown datatype, bad shape, raw/typed misuse, wrong byte counts.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input(s); it needs one per input"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidInputError(f"input {index} has no name")
        if tensor.datatype not in datatypes.BY_NAME:
            raise InvalidInputError(
                f"input {quoted(name)} has unknown datatype {quoted(tensor.datatype)}; "
                f"expected one of {', '.join(datatypes.BY_NAME)}"
            )
        if len(tensor.shape) > MAX_DIMS:
            raise InvalidInputError(f"input {quoted(name)} has {len(tensor.shape)} dimensions; the most is {MAX_DIMS}")
        shape = tuple(tensor.shape)
        # Negative and absurd dimensions are refused by the codec before it allocates anything.
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError(f"input {quoted(name)} sets contents while the request uses raw_input_contents")
            data = bytes_codec.decode_raw(raw[index], tensor.datatype, shape, name)
        else:
            data = tensor_codec.decode_typed(tensor.contents, tensor.datatype, shape, name)
        inputs.append(InputTensor(name, tensor.datatype, shape, data))
    outputs = []
    for requested in request.outputs:
        params = params_from_pb(requested.parameters)
        count = params.get("classification", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidInputError(f"output {quoted(requested.name)} classification must be a non-negative int64")
        outputs.append(RequestedOutput(requested.name, count))
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=outputs,
        parameters=params_from_pb(request.parameters),
    )


def infer_response_to_pb(response: InferResponse) -> pb.ModelInferResponse:
    """Encodes a response with raw output contents, as Triton's gRPC endpoint does."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    params_to_pb(response.parameters, message.parameters)
    for output in response.outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        message.raw_output_contents.append(bytes_codec.encode_raw(output.data, output.datatype))
    return message


def model_metadata_to_pb(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    """ModelMetadata for the served versions of one model."""
    message = pb.ModelMetadataResponse(name=metadata.name, versions=metadata.versions, platform=metadata.platform)
    for tensor in metadata.inputs:
        message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    for tensor in metadata.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    return message


def server_metadata_to_pb(metadata: ServerMetadata) -> pb.ServerMetadataResponse:
    """The server's name, version and extensions."""
    return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version, extensions=metadata.extensions)


def statistics_to_pb(stats: list[VersionStatistics]) -> pb.ModelStatisticsResponse:
    """ModelStatistics entries, one per model version, in the order given."""
    message = pb.ModelStatisticsResponse()
    for version_stats in stats:
        target = message.model_stats.add(
            name=version_stats.name,
            version=version_stats.version,
            last_inference=version_stats.last_inference_ms,
            inference_count=version_stats.inference_count,
            execution_count=version_stats.execution_count,
        )
        for field_name in REQUEST_DURATIONS:
            duration = version_stats.requests[field_name]
            getattr(target.inference_stats, field_name).count = duration.count
            getattr(target.inference_stats, field_name).ns = duration.ns
        for batch_size, durations in sorted(version_stats.batches.items()):
            entry = target.batch_stats.add(batch_size=batch_size)
            for field_name in BATCH_DURATIONS:
                getattr(entry, field_name).count = durations[field_name].count
                getattr(entry, field_name).ns = durations[field_name].ns
    return message


def statistics_from_pb(message: pb.ModelStatisticsResponse) -> list[VersionStatistics]:
    """A sibling worker's ModelStatistics back into plain values (the fields ortserve fills)."""
    out = []
    for entry in message.model_stats:
        stats = VersionStatistics(
            name=entry.name,
            version=entry.version,
            last_inference_ms=entry.last_inference,
            inference_count=entry.inference_count,
            execution_count=entry.execution_count,
        )
        for field_name in REQUEST_DURATIONS:
            duration = getattr(entry.inference_stats, field_name)
            stats.requests[field_name] = Duration(duration.count, duration.ns)
        for batch in entry.batch_stats:
            stats.batches[batch.batch_size] = {
                name: Duration(getattr(batch, name).count, getattr(batch, name).ns) for name in BATCH_DURATIONS
            }
        out.append(stats)
    return out


def repository_index_to_pb(rows: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    """RepositoryIndex rows as the response message."""
    message = pb.RepositoryIndexResponse()
    for row in rows:
        message.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
    return message


def config_override_from_pb(parameters: Any) -> mc.ModelConfig | None:
    """RepositoryModelLoad's `config` parameter (a JSON ModelConfig), if given.

    Raises:
        InvalidInputError: the JSON does not parse as a ModelConfig.
        UnsupportedError: `file:` parameters (model files sent in the request).
    """
    files = [key for key in parameters if key.startswith("file:")]
    if files:
        raise UnsupportedError("loading model files sent in the request (file: parameters) is not supported")
    if "config" not in parameters:
        return None
    param = parameters["config"]
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInputError("the 'config' parameter must be a JSON string")
    return model_config.config_from_json(param.string_param)


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


def token_chunk_to_pb(chunk: TokenChunk) -> gen_pb.GenerateResponse:
    """One streamed piece of a typed text generation."""
    return gen_pb.GenerateResponse(
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=chunk.finish_reason or "",
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
    )
