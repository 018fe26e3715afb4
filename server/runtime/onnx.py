"""ONNX Runtime sessions: provider choice, session options and the run call."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.core import datatypes
from server.core.errors import InvalidInputError, ModelLoadError, first_line
from server.runtime import cpus
from server.runtime.base import GraphTensor, Runtime
from server.runtime.device_io import BindingPlan, BoundRunner, bindable, disagreement

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class SessionOptions:
    """What the model config and server settings say about one session.

    Attributes:
        providers: Execution providers to ask for, best first (CPU is always added last).
        quiet_fallback: Log a fall-back to fewer providers at info, not warning
            (for --device auto, where the CPU is an expected outcome).
        intra_op_threads: Threads inside one operator; 0 lets ONNX Runtime choose.
        inter_op_threads: Threads across operators (parallel execution mode only).
        parallel_execution: Run independent graph branches in parallel.
        graph_optimization: One of disable, basic, extended, all.
        enable_mem_arena: Use ONNX Runtime's CPU memory arena.
        arena_shrink_above_bytes: After a run whose inputs exceed this many bytes, the
            CPU memory arena gives its unused memory back (otherwise one large request
            keeps the process's memory high for good).
        allow_spinning: Let idle intra-op threads spin-wait for work. Off by default: in
            a server the spinning threads take the cores that gRPC and the event loop need.
        provider_options: Per-provider options, keyed by provider name.
        io_binding: "auto" (I/O binding with pinned staging when CUDA runs the session: device_io.py),
            "on" (also on the CPU provider: how the tests reach that path) or "off".
        cuda_graphs: One captured CUDA graph per batch-size bucket (the config's optimization.cuda.graphs);
            only with I/O binding, ignored on the CPU unless io_binding is "on".
        max_batch_size: The model's max_batch_size, for the graph buckets.
        all_cpus: The session's threads may use every CPU of the process even in a worker pinned to its share
            (cpus.pin_worker): set for a text-generation model, whose intra-op threads are sized that way.
    """

    providers: list[str] = field(default_factory=lambda: [CPU])
    quiet_fallback: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    parallel_execution: bool = False
    graph_optimization: str = "all"
    enable_mem_arena: bool = True
    allow_spinning: bool = False
    arena_shrink_above_bytes: int = 8 << 20
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    io_binding: str = "auto"
    cuda_graphs: bool = False
    max_batch_size: int = 0
    all_cpus: bool = False


def available_providers() -> list[str]:
    """Providers this ONNX Runtime build offers (offered is not the same as working)."""
    return list(ort.get_available_providers())


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver loaded.

    onnxruntime-gpu offers the CUDA provider on any machine; trying it where no
    driver exists only prints library-load errors, so --device auto asks this first.
    """
    return Path("/proc/driver/nvidia/version").exists()


def _graph_tensor(arg: ort.NodeArg) -> GraphTensor:
    dtype = datatypes.BY_ONNX_NAME.get(arg.type)
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return GraphTensor(arg.name, dtype.name if dtype else "", arg.type, shape)


class OnnxRuntimeSession(Runtime):
    """One ONNX Runtime InferenceSession, created from bytes held in memory.

    The model is read into memory once at load, so files changed on disk later do
    not affect a loaded model.
    """

    def __init__(self, model_bytes: bytes, model_dir: Path, options: SessionOptions) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if options.parallel_execution else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        so.graph_optimization_level = _GRAPH_LEVELS[options.graph_optimization]
        so.enable_cpu_mem_arena = options.enable_mem_arena
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if options.allow_spinning else "0")
        so.log_severity_level = 3  # errors only: provider fallbacks are logged by us
        # A model given as bytes has no path; tell ORT where its external data lives.
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
        requested = [p for p in options.providers if p != CPU] + [CPU]
        provider_options = [dict(options.provider_options.get(p, {})) for p in requested]
        if options.cuda_graphs and CUDA in requested:
            provider_options[requested.index(CUDA)]["enable_cuda_graph"] = "1"
        if options.cuda_graphs and TENSORRT in requested:
            provider_options[requested.index(TENSORRT)]["trt_cuda_graph_enable"] = "1"
        try:
            # ONNX Runtime's pool threads take the affinity of the thread that creates the session.
            with cpus.unpinned() if options.all_cpus else contextlib.nullcontext():
                self._session = ort.InferenceSession(
                    model_bytes, sess_options=so, providers=requested, provider_options=provider_options
                )
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise ModelLoadError(f"ONNX Runtime could not create a session: {first_line(exc)}") from exc
        self.providers = list(self._session.get_providers())
        missing = [p for p in requested if p not in self.providers]
        if missing:
            log = logger.info if options.quiet_fallback else logger.warning
            log(
                "execution provider(s) %s requested but not usable here (no device, or its libraries "
                "are missing); running on %s",
                ", ".join(missing),
                ", ".join(self.providers),
            )
        self.inputs = [_graph_tensor(a) for a in self._session.get_inputs()]
        self.outputs = [_graph_tensor(a) for a in self._session.get_outputs()]
        # On a GPU the run waits on the device, and the loop has better things to do meanwhile.
        self.may_run_on_loop = self.providers[0] == CPU
        self._string_inputs = {t.name for t in self.inputs if t.datatype == "BYTES"}
        self._string_outputs = any(t.datatype == "BYTES" for t in self.outputs)
        self._shrink_above = options.arena_shrink_above_bytes if options.enable_mem_arena else 0
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._bound = self._binding(options)

    def _binding(self, options: SessionOptions) -> BoundRunner | None:
        """The I/O-binding runner when this session uses one (CUDA, or asked for), else None."""
        on_cuda = self.providers[0] in (CUDA, TENSORRT)
        if options.io_binding == "off" or (options.io_binding == "auto" and not on_cuda):
            if options.cuda_graphs:
                logger.info("optimization.cuda.graphs: not running on CUDA, so no graphs")
            return None
        if not bindable([*self.inputs, *self.outputs]):
            logger.info("string tensors: this model runs without I/O binding")
            return None
        device_id = int(options.provider_options.get(CUDA, {}).get("device_id", "0")) if on_cuda else 0
        plan = BindingPlan("cuda" if on_cuda else "cpu", device_id, options.cuda_graphs, options.max_batch_size)
        runner = BoundRunner(self._session, self.inputs, self.outputs, plan)
        # Graphs are asked for by the config and fail the load when they cannot be captured; plain binding is
        # the default on a GPU, so it is checked against a plain run first and dropped (warned) if it differs.
        reason = None if plan.graphs else disagreement(self._session, runner, self.inputs, self.outputs)
        if reason is not None:
            logger.warning("I/O binding not used for this model, it runs without: %s", reason)
            runner.close()
            return None
        logger.info("I/O binding on %s (graphs %s, pinned staging %s)", plan.device,
                    "on" if plan.graphs else "off", "on" if runner.pinned else "off")
        return runner

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        if self._bound is not None:
            return self._bound.run(inputs, output_names)
        # Most models have no string tensors: skip the per-tensor conversions then (this runs
        # once per decode step of a generation model, where tens of microseconds show).
        feed = inputs
        if self._string_inputs:
            strings = self._string_inputs
            feed = {name: (_bytes_to_str(name, arr) if name in strings else arr) for name, arr in inputs.items()}
        large = self._shrink_above and sum(a.nbytes for a in feed.values()) > self._shrink_above
        results: list[np.ndarray] = self._session.run(list(output_names), feed, self._shrink if large else None)
        if self._string_outputs:
            results = [_str_to_bytes(r) if r.dtype == object else r for r in results]
        return results

    def close(self) -> None:
        if self._bound is not None:
            self._bound.close()
            self._bound = None
        del self._session


def _bytes_to_str(name: str, arr: np.ndarray) -> np.ndarray:
    """ONNX Runtime's Python binding takes text for string tensors, so bytes must be UTF-8."""
    out = np.empty(arr.shape, dtype=object)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        try:
            flat_out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"input '{name}' element {i} is not valid UTF-8; ONNX string tensors hold text"
            ) from exc
    return out


def _str_to_bytes(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=object)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        flat_out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out
