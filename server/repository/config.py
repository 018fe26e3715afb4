"""Completes a model config from the ONNX graph and turns it into runtime settings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from server.core import datatypes
from server.core.batcher import QueuePolicy, SchedulerConfig
from server.core.errors import ModelLoadError
from server.core.types import TensorSpec
from server.runtime import onnx as ort_runtime
from server.runtime.base import GraphTensor
from server.rpc.pb import model_config_pb2 as mc

ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
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
                f"config {kind} '{entry.name}' is {mc.DataType.Name(entry.data_type)} but the model has {tensor.type_name}"
            )
        graph_dims = _graph_dims(tensor, batching, kind)
        if not entry.dims:
            entry.dims.extend(graph_dims)
        elif len(entry.dims) != len(graph_dims):
            raise ModelLoadError(
                f"config {kind} '{entry.name}' has dims {list(entry.dims)} but the model's shape is "
                f"{list(graph_dims)}{' (after the batch dimension)' if batching else ''}"
            )
        else:
            for declared_dim, graph_dim in zip(entry.dims, graph_dims):
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
    inputs = [TensorSpec(i.name, _protocol_type(i.data_type), tuple(i.dims), optional=i.optional) for i in config.input]
    outputs = [
        TensorSpec(o.name, _protocol_type(o.data_type), tuple(o.dims), label_filename=o.label_filename)
        for o in config.output
    ]
    return inputs, outputs


def instance_count(config: mc.ModelConfig) -> int:
    """Total instances over every instance group (at least 1)."""
    total = sum(max(g.count, 1) for g in config.instance_group)
    return max(total, 1)


def session_options(config: mc.ModelConfig, device: str) -> ort_runtime.SessionOptions:
    """ONNX Runtime settings from the config and the server's --device (auto, cpu, cuda).

    An instance group of KIND_GPU or KIND_CPU overrides the server's device.

    Raises:
        ModelLoadError: for parameter values that do not parse.
    """
    kind = config.instance_group[0].kind if config.instance_group else mc.ModelInstanceGroup.KIND_AUTO
    if kind == mc.ModelInstanceGroup.KIND_GPU:
        device = "cuda"
    elif kind == mc.ModelInstanceGroup.KIND_CPU:
        device = "cpu"
    options = ort_runtime.SessionOptions()
    options.quiet_fallback = device == "auto"
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
    params = {k: v.string_value for k, v in config.parameters.items()}
    try:
        if "intra_op_thread_count" in params:
            options.intra_op_threads = int(params["intra_op_thread_count"])
        else:
            # N instances each using every core would oversubscribe the machine.
            count = instance_count(config)
            options.intra_op_threads = max(1, (os.cpu_count() or 1) // count) if count > 1 else 0
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
    if batching.default_priority_level > max(levels, 1) or (levels and batching.default_priority_level == 0 and levels > 1):
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
    )
