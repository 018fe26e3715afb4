"""Protobuf <-> core type conversion: one pair of functions per message."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from server.core import datatypes
from server.core.errors import InvalidInputError, UnsupportedError, quoted
from server.core.types import InferRequest, InferResponse, InputTensor, ParamValue, RequestedOutput
from server.repository.registry import IndexEntry, ServedModel
from server.core import bytes_codec
from server.rpc import tensor_codec
from server.rpc.pb import grpc_service_pb2 as pb
from server.schema import model_config_pb2 as mc

MAX_DIMS = 32
# InferStatistics fields that ortserve fills, and the per-batch-size ones.
REQUEST_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


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
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version, id=response.id)
    params_to_pb(response.parameters, message.parameters)
    for output in response.outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        message.raw_output_contents.append(bytes_codec.encode_raw(output.data, output.datatype))
    return message


def model_metadata_to_pb(name: str, models: list[ServedModel]) -> pb.ModelMetadataResponse:
    """ModelMetadata for the served versions of one model (signature of the highest)."""
    newest = models[-1]
    batch = [-1] if newest.signature.max_batch_size > 0 else []
    message = pb.ModelMetadataResponse(name=name, versions=[str(m.version) for m in models], platform=newest.platform)
    for spec in newest.signature.inputs:
        message.inputs.add(name=spec.name, datatype=spec.datatype, shape=batch + list(spec.dims))
    for spec in newest.signature.outputs:
        message.outputs.add(name=spec.name, datatype=spec.datatype, shape=batch + list(spec.dims))
    return message


def model_statistics_to_pb(model: ServedModel, target: pb.ModelStatistics) -> None:
    """Fills one ModelStatistics entry from a model's counters."""
    stats = model.stats
    target.name = model.name
    target.version = str(model.version)
    target.last_inference = stats.last_inference_ms
    target.inference_count = stats.inference_count
    target.execution_count = stats.execution_count
    inference = target.inference_stats
    for field_name in REQUEST_DURATIONS:
        duration = getattr(stats, field_name)
        getattr(inference, field_name).count = duration.count
        getattr(inference, field_name).ns = duration.ns
    for batch_size in sorted(stats.batch_stats):
        per_batch = stats.batch_stats[batch_size]
        entry = target.batch_stats.add(batch_size=batch_size)
        for field_name in BATCH_DURATIONS:
            duration = getattr(per_batch, field_name)
            getattr(entry, field_name).count = duration.count
            getattr(entry, field_name).ns = duration.ns


def repository_index_to_pb(rows: list[IndexEntry]) -> pb.RepositoryIndexResponse:
    """RepositoryIndex rows as the response message."""
    message = pb.RepositoryIndexResponse()
    for row in rows:
        message.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
    return message


def _add_duration(target: Any, source: Any) -> None:
    target.count += source.count
    target.ns += source.ns


def merge_statistics(target: pb.ModelStatisticsResponse, other: pb.ModelStatisticsResponse) -> None:
    """Adds another worker's statistics into `target`, model version by model version."""
    by_key = {(s.name, s.version): s for s in target.model_stats}
    for stats in other.model_stats:
        mine = by_key.get((stats.name, stats.version))
        if mine is None:
            target.model_stats.add().CopyFrom(stats)
            continue
        mine.last_inference = max(mine.last_inference, stats.last_inference)
        mine.inference_count += stats.inference_count
        mine.execution_count += stats.execution_count
        for field_name in REQUEST_DURATIONS:
            _add_duration(getattr(mine.inference_stats, field_name), getattr(stats.inference_stats, field_name))
        batches = {b.batch_size: b for b in mine.batch_stats}
        for batch in stats.batch_stats:
            if batch.batch_size not in batches:
                batches[batch.batch_size] = mine.batch_stats.add(batch_size=batch.batch_size)
            for field_name in BATCH_DURATIONS:
                _add_duration(getattr(batches[batch.batch_size], field_name), getattr(batch, field_name))
        ordered = sorted(mine.batch_stats, key=lambda b: b.batch_size)
        copies = [pb.InferBatchStatistics() for _ in ordered]
        for copy, batch in zip(copies, ordered):
            copy.CopyFrom(batch)
        del mine.batch_stats[:]
        mine.batch_stats.extend(copies)


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
    config = mc.ModelConfig()
    try:
        json_format.Parse(param.string_param, config)
    except json_format.ParseError as exc:
        raise InvalidInputError(f"the 'config' parameter is not a valid model config: {quoted(exc, 300)}") from exc
    return config


def text_response_to_pb(model: ServedModel, request_id: str, text: str | None, final: bool) -> pb.ModelInferResponse:
    """One decoupled text-generation response; `text` None makes the empty final response."""
    message = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request_id)
    message.parameters["triton_final_response"].bool_param = final
    if text is not None:
        data = text.encode("utf-8")
        message.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        message.raw_output_contents.append(len(data).to_bytes(4, "little") + data)
    return message
