"""Completes a model config from the ONNX graph and turns it into runtime settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from server.core import datatypes
from server.core.batcher import HARD_QUEUE_LIMIT, QueuePolicy, SchedulerConfig
from server.core.errors import InvalidInputError, ModelLoadError, quoted
from server.core.types import TensorSpec
from server.runtime import cpus
from server.runtime import onnx as ort_runtime
from server.runtime.base import GraphTensor
from server.schema import model_config_pb2 as mc

ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"

# Bounds on what a config may ask for. Configs also arrive over the network
# (RepositoryModelLoad's `config`), so each value that makes the server build,
# allocate or wait in proportion to it is capped; beyond, the load is refused.
MAX_BATCH_SIZE = 1 << 20
MAX_QUEUE_SIZE = HARD_QUEUE_LIMIT  # the scheduler's hard limit per model version
MAX_QUEUE_DELAY_US = 60_000_000  # 60 s
MAX_QUEUE_TIMEOUT_US = 3_600_000_000  # 1 h
MAX_PRIORITY_LEVELS = 256  # one queue each
MAX_PREFERRED_BATCH_SIZES = 64
MAX_WARMUP_SAMPLES = 64
MAX_WARMUP_COUNT = 1_000  # runs of one sample per instance
MAX_WARMUP_ELEMENTS = 1 << 24  # elements of one warm-up input, batch included
MAX_GENERATION_SEQS = 1_024


def max_instances() -> int:
    """Most instances (sessions, each a copy of the model) one model version may have."""
    return max(4 * cpus.usable_cpus(), 16)


def max_threads() -> int:
    """Most intra-/inter-op threads one session may ask for."""
    return max(4 * cpus.usable_cpus(), 64)
# Triton's ORT backend meaning of optimization.graph.level.
_TRITON_GRAPH_LEVELS = {-1: "basic", 0: "all", 1: "extended"}


def config_type(datatype: str) -> int:
    """The model-config enum value of a protocol datatype."""
    return int(mc.DataType.Value(datatypes.BY_NAME[datatype].config_name))


def _protocol_type(data_type: mc.DataType.ValueType) -> str:
    name = mc.DataType.Name(data_type)
    dtype = datatypes.BY_CONFIG_NAME.get(name)
    if dtype is None:
        raise ModelLoadError(f"datatype {name} is not supported")
    return dtype.name


def complete_config(
    config: mc.ModelConfig,
    graph_inputs: Sequence[GraphTensor],
    graph_outputs: Sequence[GraphTensor],
    default_max_batch_size: int,
) -> None:
    """Fills what the config leaves out from the graph, and checks what it states.

    Rules: a config with no inputs and outputs is completed entirely; its
    max_batch_size becomes `default_max_batch_size` when every graph tensor has a
    dynamic first dimension (0 otherwise). A config that lists tensors keeps its
    max_batch_size as written, and graph tensors it leaves out are appended.

    Raises:
        ModelLoadError: the config contradicts the graph (names, types, ranks, dims).
    """
    config.platform = config.platform or ONNX_PLATFORM
    config.backend = config.backend or ONNX_BACKEND
    for tensor in [*graph_inputs, *graph_outputs]:
        if not tensor.datatype:
            raise ModelLoadError(f"tensor '{tensor.name}' has type {tensor.type_name}, which the protocol cannot carry")
    everything_dynamic = all(t.shape and t.shape[0] == -1 for t in [*graph_inputs, *graph_outputs])
    if not config.input and not config.output and config.max_batch_size == 0 and everything_dynamic:
        config.max_batch_size = default_max_batch_size
    if config.max_batch_size < 0:
        raise ModelLoadError(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    batching = config.max_batch_size > 0
    _complete_tensors(config.input, graph_inputs, batching, "input")
    _complete_tensors(config.output, graph_outputs, batching, "output")


def _complete_tensors(declared: Any, graph: Sequence[GraphTensor], batching: bool, kind: str) -> None:
    by_name = {t.name: t for t in graph}
    for entry in declared:
        tensor = by_name.get(entry.name)
        if tensor is None:
            raise ModelLoadError(f"config {kind} '{entry.name}' is not in the model; it has {', '.join(by_name)}")
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = config_type(tensor.datatype)
        elif _protocol_type(entry.data_type) != tensor.datatype:
            raise ModelLoadError(
                f"config {kind} '{entry.name}' is {mc.DataType.Name(entry.data_type)} "
                f"but the model has {tensor.type_name}"
            )
        graph_dims = _graph_dims(tensor, batching, kind)
        if entry.HasField("reshape"):
            _check_reshape(entry, graph_dims, kind)
            continue
        if not entry.dims:
            entry.dims.extend(graph_dims)
        elif len(entry.dims) != len(graph_dims):
            raise ModelLoadError(
                f"config {kind} '{entry.name}' has dims {list(entry.dims)} but the model's shape is "
                f"{list(graph_dims)}{' (after the batch dimension)' if batching else ''}"
            )
        else:
            for declared_dim, graph_dim in zip(entry.dims, graph_dims, strict=True):
                if declared_dim != -1 and graph_dim != -1 and declared_dim != graph_dim:
                    raise ModelLoadError(
                        f"config {kind} '{entry.name}' has dims {list(entry.dims)}; the model has {list(graph_dims)}"
                    )
    named = {e.name for e in declared}
    for tensor in graph:
        if tensor.name not in named:
            entry = declared.add()
            entry.name = tensor.name
            entry.data_type = config_type(tensor.datatype)
            entry.dims.extend(_graph_dims(tensor, batching, kind))


def _check_reshape(entry: Any, graph_dims: Sequence[int], kind: str) -> None:
    """Checks a tensor's `reshape` (the model's shape) against its `dims` (the wire shape) and the graph.

    Triton's rule: the model sees `reshape.shape`, requests and responses carry
    `dims`, both after the batch dimension. Variable dimensions (-1) pair up in
    order, so both must have as many, and the fixed dimensions must hold the same
    number of elements: then every wire shape maps to exactly one model shape.
    """
    dims, shape = list(entry.dims), list(entry.reshape.shape)
    where = f"config {kind} '{entry.name}'"
    if not dims:
        raise ModelLoadError(f"{where} has a reshape but no dims; dims is the shape requests carry")
    for name, values in (("dims", dims), ("reshape.shape", shape)):
        if any(d < -1 or d == 0 for d in values):
            raise ModelLoadError(f"{where} {name} {values[:8]} must be -1 or >= 1")
    if dims.count(-1) != shape.count(-1):
        raise ModelLoadError(
            f"{where} has dims {dims[:8]} and reshape.shape {shape[:8]} with different numbers of variable (-1) dims"
        )
    if math.prod(d for d in dims if d != -1) != math.prod(d for d in shape if d != -1):
        raise ModelLoadError(f"{where} reshape.shape {shape[:8]} does not hold the same elements as dims {dims[:8]}")
    if len(shape) != len(graph_dims) or any(
        r != -1 and g != -1 and r != g for r, g in zip(shape, graph_dims, strict=True)
    ):
        raise ModelLoadError(f"{where} has reshape.shape {shape[:8]} but the model's shape is {list(graph_dims)[:8]}")


def _graph_dims(tensor: GraphTensor, batching: bool, kind: str) -> list[int]:
    if not batching:
        return list(tensor.shape)
    if not tensor.shape or tensor.shape[0] != -1:
        raise ModelLoadError(
            f"max_batch_size > 0 needs a dynamic first dimension, but {kind} '{tensor.name}' has shape "
            f"{list(tensor.shape)}"
        )
    return list(tensor.shape[1:])


def _flag(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "no", "off")


def tensor_specs(config: mc.ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The completed config's inputs and outputs as plain specs."""
    inputs = [
        TensorSpec(i.name, _protocol_type(i.data_type), tuple(i.dims), optional=i.optional, reshape=_reshape(i))
        for i in config.input
    ]
    outputs = [
        TensorSpec(
            o.name, _protocol_type(o.data_type), tuple(o.dims), label_filename=o.label_filename, reshape=_reshape(o)
        )
        for o in config.output
    ]
    return inputs, outputs


def _reshape(tensor: mc.ModelInput | mc.ModelOutput) -> tuple[int, ...] | None:
    return tuple(tensor.reshape.shape) if tensor.HasField("reshape") else None


def instance_count(config: mc.ModelConfig) -> int:
    """Total instances over every instance group (at least 1)."""
    total = sum(max(g.count, 1) for g in config.instance_group)
    return max(total, 1)


def session_options(config: mc.ModelConfig, device: str, share_with_workers: bool = True) -> ort_runtime.SessionOptions:
    """ONNX Runtime settings from the config and the server's --device (auto, cpu, cuda).

    An instance group of KIND_GPU or KIND_CPU overrides the server's device. `share_with_workers`: the default
    intra-op threads divide this process's CPUs with the other workers (cpus.share_among); else (a text model)
    the session's threads use every CPU of the process, also in a pinned worker (cpus.pin_worker).

    Raises ModelLoadError for parameter values that do not parse.
    """
    kind = config.instance_group[0].kind if config.instance_group else mc.ModelInstanceGroup.KIND_AUTO
    if kind == mc.ModelInstanceGroup.KIND_GPU:
        device = "cuda"
    elif kind == mc.ModelInstanceGroup.KIND_CPU:
        device = "cpu"
    options = ort_runtime.SessionOptions()
    options.quiet_fallback, options.all_cpus = device == "auto", not share_with_workers
    auto_cuda = ort_runtime.CUDA in ort_runtime.available_providers() and ort_runtime.nvidia_driver_present()
    if device == "cuda" or (device == "auto" and auto_cuda):
        providers = [ort_runtime.CUDA]
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        if any(a.name == "tensorrt" for a in accelerators):
            providers.insert(0, ort_runtime.TENSORRT)
        gpus = config.instance_group[0].gpus if config.instance_group else []
        if gpus:
            options.provider_options[ort_runtime.CUDA] = {"device_id": str(gpus[0])}
        options.providers = providers + [ort_runtime.CPU]
    options.cuda_graphs, options.max_batch_size = config.optimization.cuda.graphs, config.max_batch_size
    params = {k: v.string_value for k, v in config.parameters.items()}
    try:
        if "intra_op_thread_count" in params:
            options.intra_op_threads = int(params["intra_op_thread_count"])
        else:
            # N instances each using every CPU would oversubscribe the machine. One instance with the
            # whole machine keeps ONNX Runtime's own choice (its physical cores); under an affinity mask,
            # a cgroup quota or beside other workers ORT would size its pool for CPUs it cannot use.
            count = instance_count(config)
            share = cpus.process_cpus() if share_with_workers else cpus.usable_cpus()
            options.intra_op_threads = max(1, share // count) if count > 1 or share < cpus.machine_cpus() else 0
        options.inter_op_threads = int(params.get("inter_op_thread_count", "0"))
        options.parallel_execution = int(params.get("execution_mode", "0")) == 1
        options.enable_mem_arena = _flag(params.get("enable_mem_arena", "true"))
        options.allow_spinning = _flag(params.get("allow_spinning", "false"))
        if "arena_shrink_threshold_bytes" in params:
            options.arena_shrink_above_bytes = int(params["arena_shrink_threshold_bytes"])
    except ValueError as exc:
        raise ModelLoadError(f"bad session parameter: {exc}") from exc
    level = params.get("graph_optimization_level")
    if level is None:
        level = _TRITON_GRAPH_LEVELS.get(config.optimization.graph.level, "all")
    if level not in ("disable", "basic", "extended", "all"):
        raise ModelLoadError(f"graph_optimization_level must be disable, basic, extended or all; got {level!r}")
    options.graph_optimization = level
    if options.intra_op_threads < 0 or options.inter_op_threads < 0:
        raise ModelLoadError("thread counts must be >= 0")
    return options


def _queue_policy(policy: mc.ModelQueuePolicy) -> QueuePolicy:
    if policy.timeout_action == mc.ModelQueuePolicy.DELAY:
        raise ModelLoadError("queue policy timeout_action DELAY is not supported; use REJECT")
    return QueuePolicy(
        max_queue_size=policy.max_queue_size,
        default_timeout_us=policy.default_timeout_microseconds,
        allow_timeout_override=policy.allow_timeout_override,
    )


def scheduler_config(config: mc.ModelConfig, hard_queue_limit: int) -> SchedulerConfig:
    """Queueing and batching settings from a completed config (Triton's dynamic_batching fields).

    Raises:
        ModelLoadError: for inconsistent values (naming them).
    """
    if not config.HasField("dynamic_batching"):
        return SchedulerConfig(max_batch_size=config.max_batch_size, hard_queue_limit=hard_queue_limit)
    batching = config.dynamic_batching
    preferred = tuple(sorted(batching.preferred_batch_size))
    if config.max_batch_size == 0:
        raise ModelLoadError("dynamic_batching needs max_batch_size > 0")
    bad = [p for p in preferred if p < 1 or p > config.max_batch_size]
    if bad:
        raise ModelLoadError(f"preferred_batch_size {bad} must be between 1 and max_batch_size {config.max_batch_size}")
    levels = int(batching.priority_levels)
    default_level = batching.default_priority_level
    if default_level > max(levels, 1) or (levels and default_level == 0 and levels > 1):
        raise ModelLoadError(
            f"default_priority_level {batching.default_priority_level} must be between 1 and priority_levels {levels}"
        )
    unknown = [level for level in batching.priority_queue_policy if level < 1 or level > max(levels, 1)]
    if unknown:
        raise ModelLoadError(f"priority_queue_policy names level(s) {unknown} outside 1..{max(levels, 1)}")
    return SchedulerConfig(
        max_batch_size=config.max_batch_size,
        dynamic_batching=True,
        max_queue_delay_us=int(batching.max_queue_delay_microseconds),
        preferred_batch_sizes=preferred,
        priority_levels=levels,
        default_priority_level=int(batching.default_priority_level),
        default_policy=_queue_policy(batching.default_queue_policy),
        priority_policies={int(k) - 1: _queue_policy(v) for k, v in batching.priority_queue_policy.items()},
        hard_queue_limit=hard_queue_limit,
        # Ours, on unless a parameter says "false" (Triton always waits the delay out). get(): indexing adds the key.
        adaptive_delay=_flag(getattr(config.parameters.get("adaptive_queue_delay"), "string_value", "true")),
    )


# Fields accepted although they change nothing in ortserve, and why (everything
# else a config sets is either implemented or refused by check_supported):
# - input.format: describes the layout to clients (it is returned by ModelConfig); ONNX Runtime needs no hint.
# - optimization.input_pinned_memory / output_pinned_memory: Triton's staging buffers for GPU copies;
#   ortserve hands host arrays to ONNX Runtime, which makes its own copies.
# - optimization.gather_kernel_buffer_threshold: tunes Triton's GPU input-gather kernel, which ortserve has not.
# - dynamic_batching.preserve_ordering: each request gets its own response, and a stream answers in order anyway.
# - instance_group.name: a label.
# - cc_model_filenames: picks TensorRT plans per compute capability; ONNX models have one file for every device.
# - metric_tags: labels for Triton's metrics endpoint, which ortserve has not (statistics come from the RPC).
_MAX_REFUSALS_NAMED = 5


def check_supported(config: mc.ModelConfig, generation: bool = False) -> None:
    """Refuses features ortserve does not implement, and values beyond its bounds.

    Every field of Triton's ModelConfig parses; this decides which may be set. A
    refused feature may still appear with its disabled value (false, empty, 0,
    the default enum), as Triton's own configs often spell them out. Runs on the
    config as written, before any session is built.

    Args:
        config: The model's config (file or override), not yet completed from the graph.
        generation: Whether the model is a text-generation model (served decoupled).

    Raises:
        ModelLoadError: naming the field path (and, for a bound, the value and the bound).
    """
    refused = _unsupported_fields(config, generation)
    if refused:
        named = ", ".join(refused[:_MAX_REFUSALS_NAMED])
        more = f" (and {len(refused) - _MAX_REFUSALS_NAMED} more)" if len(refused) > _MAX_REFUSALS_NAMED else ""
        verb = "is" if len(refused) == 1 else "are"
        raise ModelLoadError(f"{named}{more} {verb} not supported by ortserve")
    _check_bounds(config)


def _unsupported_fields(config: mc.ModelConfig, generation: bool) -> list[str]:
    found: list[str] = []
    if config.runtime:
        found.append("runtime")
    tensors: list[tuple[str, mc.ModelInput | mc.ModelOutput]] = [(f"input[{i}]", t) for i, t in enumerate(config.input)]
    tensors += [(f"output[{i}]", t) for i, t in enumerate(config.output)]
    for path, tensor in tensors:
        if tensor.is_shape_tensor:
            found.append(f"{path}.is_shape_tensor")
        if tensor.is_non_linear_format_io:
            found.append(f"{path}.is_non_linear_format_io")
    found += [f"input[{i}].allow_ragged_batch" for i, t in enumerate(config.input) if t.allow_ragged_batch]
    if config.batch_input:
        found.append("batch_input")
    if config.batch_output:
        found.append("batch_output")
    optimization = config.optimization
    if optimization.priority != mc.ModelOptimizationPolicy.PRIORITY_DEFAULT:
        found.append("optimization.priority")
    cuda = optimization.cuda
    for flag in ("busy_wait_events", "output_copy_stream"):  # graphs: runtime/device_io.py
        if getattr(cuda, flag):
            found.append(f"optimization.cuda.{flag}")
    if cuda.graph_spec:
        found.append("optimization.cuda.graph_spec")
    accelerators = optimization.execution_accelerators
    for i, accelerator in enumerate(accelerators.gpu_execution_accelerator):
        path = f"optimization.execution_accelerators.gpu_execution_accelerator[{i}]"
        if accelerator.name != "tensorrt":
            found.append(f"{path}.name {quoted(accelerator.name)} (only 'tensorrt')")
        if accelerator.parameters:
            found.append(f"{path}.parameters")
    if accelerators.cpu_execution_accelerator:
        found.append("optimization.execution_accelerators.cpu_execution_accelerator")
    if optimization.eager_batching:
        found.append("optimization.eager_batching")
    if config.HasField("sequence_batching"):
        found.append("sequence_batching")
    if config.ensemble_scheduling.max_inflight_requests:
        found.append("ensemble_scheduling.max_inflight_requests")
    found += _unsupported_instance_fields(config)
    if config.model_operations.op_library_filename:
        found.append("model_operations.op_library_filename")
    if config.model_transaction_policy.decoupled and not generation:
        found.append("model_transaction_policy.decoupled (only text-generation models are decoupled)")
    if config.model_repository_agents.agents:
        found.append("model_repository_agents")
    if config.response_cache.enable:
        found.append("response_cache.enable")
    if config.model_metrics.metric_control:
        found.append("model_metrics.metric_control")
    return found


def _unsupported_instance_fields(config: mc.ModelConfig) -> list[str]:
    found: list[str] = []
    groups = config.instance_group
    for i, group in enumerate(groups):
        path = f"instance_group[{i}]"
        if group.rate_limiter.resources or group.rate_limiter.priority > 1:
            found.append(f"{path}.rate_limiter")
        if group.secondary_devices:
            found.append(f"{path}.secondary_devices")
        if group.profile:
            found.append(f"{path}.profile (TensorRT plans only)")
        if group.passive:
            found.append(f"{path}.passive")
        if group.host_policy:
            found.append(f"{path}.host_policy")
        if len(group.gpus) > 1:
            found.append(f"{path}.gpus with more than one GPU")
        # Every instance of a version runs with the first group's session options.
        if i > 0 and (group.kind != groups[0].kind or list(group.gpus) != list(groups[0].gpus)):
            found.append(f"{path} on another device than instance_group[0]")
    return found


def _refuse_above(path: str, value: int, bound: int, why: str = "") -> None:
    if value > bound:
        raise ModelLoadError(f"{path} is {value}; ortserve allows at most {bound}{f' ({why})' if why else ''}")


def _int_parameter(params: dict[str, str], key: str) -> int | None:
    if key not in params:
        return None
    try:
        return int(params[key])
    except ValueError:
        raise ModelLoadError(f"bad session parameter {key}: not an integer: {quoted(params[key])}") from None


def _check_bounds(config: mc.ModelConfig) -> None:
    """Refuses values that would make the server build, allocate or wait without limit."""
    _refuse_above("max_batch_size", config.max_batch_size, MAX_BATCH_SIZE)
    total = 0
    for i, group in enumerate(config.instance_group):
        if group.count < 0:
            raise ModelLoadError(f"instance_group[{i}].count must be >= 0, got {group.count}")
        total += max(group.count, 1)
    _refuse_above("instance_group count (all groups)", total, max_instances(), "4 per CPU core, at least 16")
    params = {k: v.string_value for k, v in config.parameters.items()}
    for key in ("intra_op_thread_count", "inter_op_thread_count"):
        threads = _int_parameter(params, key)
        if threads is not None:
            if threads < 0:
                raise ModelLoadError(f"parameters {key} must be >= 0, got {threads}")
            _refuse_above(f"parameters {key}", threads, max_threads(), "4 per CPU core, at least 64")
    for key, bound in (("max_num_seqs", MAX_GENERATION_SEQS), ("max_queued_generations", MAX_QUEUE_SIZE)):
        value = _int_parameter(params, key)
        if value is not None:
            if value < 1:
                raise ModelLoadError(f"parameters {key} must be >= 1, got {value}")
            _refuse_above(f"parameters {key}", value, bound)
    batching = config.dynamic_batching
    _refuse_above(
        "dynamic_batching.max_queue_delay_microseconds", batching.max_queue_delay_microseconds, MAX_QUEUE_DELAY_US
    )
    _refuse_above(
        "dynamic_batching.preferred_batch_size entries", len(batching.preferred_batch_size), MAX_PREFERRED_BATCH_SIZES
    )
    _refuse_above("dynamic_batching.priority_levels", batching.priority_levels, MAX_PRIORITY_LEVELS)
    policies = [("dynamic_batching.default_queue_policy", batching.default_queue_policy)]
    policies += [(f"dynamic_batching.priority_queue_policy[{k}]", v) for k, v in batching.priority_queue_policy.items()]
    for path, policy in policies:
        hard_limit = "the hard limit per model version"
        _refuse_above(f"{path}.max_queue_size", policy.max_queue_size, MAX_QUEUE_SIZE, hard_limit)
        _refuse_above(f"{path}.default_timeout_microseconds", policy.default_timeout_microseconds, MAX_QUEUE_TIMEOUT_US)
    _refuse_above("model_warmup entries", len(config.model_warmup), MAX_WARMUP_SAMPLES)
    for i, sample in enumerate(config.model_warmup):
        path = f"model_warmup[{i}]"
        _refuse_above(f"{path}.batch_size", sample.batch_size, MAX_BATCH_SIZE)
        _refuse_above(f"{path}.count", sample.count, MAX_WARMUP_COUNT)
        for name, entry in sample.inputs.items():
            if any(d < 1 for d in entry.dims):
                raise ModelLoadError(f"{path} input {quoted(name)} dims {list(entry.dims)[:8]} must all be >= 1")
            elements = max(sample.batch_size, 1)
            for dim in entry.dims:
                elements *= dim
                _refuse_above(f"{path} input {quoted(name)} elements", elements, MAX_WARMUP_ELEMENTS)


def config_from_json(text: str) -> mc.ModelConfig:
    """A model config sent as JSON by a client (RepositoryModelLoad's `config` parameter, either front end).

    Raises:
        InvalidInputError: the text is not a JSON ModelConfig (the parser's reason, bounded).
    """
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise InvalidInputError(f"the 'config' parameter is not a valid model config: {quoted(exc, 300)}") from exc
    return config


def config_to_dict(config: mc.ModelConfig) -> dict[str, Any]:
    """A model config as Triton's JSON shape (field names as in the proto)."""
    return json_format.MessageToDict(config, preserving_proto_field_name=True)
