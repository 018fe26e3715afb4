"""Running an ONNX Runtime session through I/O binding: the GPU path.

With the CUDA provider a plain `session.run` copies every input from pageable host memory
and allocates every output afresh. Here, once per batch:

- inputs are staged in pinned (page-locked) host memory, so the copy to the device is a DMA
  transfer, and bound to the session (one binding per batch, never per request);
- outputs are bound to the device and copied back once;
- with CUDA graphs (`optimization { cuda { graphs: true } }` in the model config, Triton's
  field), each batch size is padded up to a bucket (powers of two up to max_batch_size) whose
  inputs and outputs live at fixed device addresses: ONNX Runtime captures one graph per bucket
  at load (`gpu_graph_id`) and replays it, so a batch costs one graph launch instead of one
  launch per kernel. Padding rows are zeros; their results are dropped.

The same code runs on the CPU provider (device "cpu", no graph capture), which is how the
test suite checks the binding, the buckets and the padding without a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from server.core import datatypes
from server.core.errors import InvalidInputError, ModelLoadError
from server.runtime.base import GraphTensor

logger = logging.getLogger(__name__)

GRAPH_ID = "gpu_graph_id"  # ONNX Runtime's run option: which captured graph to replay (-1: none)


@dataclass(frozen=True)
class BindingPlan:
    """How one session binds its inputs and outputs.

    Attributes:
        device: "cuda" (the GPU path) or "cpu" (the same path on the CPU provider, for tests).
        device_id: The GPU the session runs on.
        graphs: Capture and replay one CUDA graph per batch-size bucket (needs the provider option
            enable_cuda_graph, which the session sets when this is true on CUDA).
        max_batch_size: The model's max_batch_size (0: no batch dimension, one fixed-shape bucket).
    """

    device: str
    device_id: int = 0
    graphs: bool = False
    max_batch_size: int = 0


def buckets(max_batch_size: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two below max_batch_size, and max_batch_size."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max(1, max_batch_size)]


def bucket_for(rows: int, sizes: Sequence[int]) -> int:
    """The smallest bucket that holds `rows`."""
    for size in sizes:
        if rows <= size:
            return size
    raise ValueError(f"batch of {rows} is over the largest bucket {sizes[-1]}")


class PinnedStaging:
    """Host buffers for merged batches, page-locked through the CUDA runtime when there is one.

    cudaHostAlloc is called through ctypes on the libcudart the CUDA provider has already loaded
    (ONNX Runtime's Python API allocates no pinned host memory itself). Without it (the CPU, or a
    runtime library that cannot be found) the buffers are ordinary memory: slower copies, same results.
    """

    def __init__(self, pinned: bool) -> None:
        self._cudart = _cudart() if pinned else None  # kept to free what it allocated
        self._pinning = self._cudart is not None
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}  # name -> (bytes, pointer or 0)

    @property
    def pinned(self) -> bool:
        """Whether new buffers are page-locked (False from the first failed cudaHostAlloc on)."""
        return self._pinning

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host array of `shape` for input `name`; reused (grown when too small) from batch to batch."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        held = self._buffers.get(name)
        if held is None or held[0].nbytes < nbytes:
            # At least doubled: pinning memory is slow (page-locking), so batches that grow a row at a
            # time must not reallocate every time.
            size = max(nbytes, 64, 2 * held[0].nbytes if held is not None else 0)
            self._release(name)
            self._buffers[name] = held = self._allocate(size)
        return held[0][:nbytes].view(dtype).reshape(shape)

    def _allocate(self, nbytes: int) -> tuple[np.ndarray, int]:
        if self._cudart is not None and self._pinning:
            pointer = ctypes.c_void_p()
            if self._cudart.cudaHostAlloc(ctypes.byref(pointer), ctypes.c_size_t(nbytes), 0) == 0 and pointer.value:
                raw = (ctypes.c_uint8 * nbytes).from_address(pointer.value)
                return np.ctypeslib.as_array(raw), pointer.value
            logger.warning("cudaHostAlloc of %d bytes failed: staging batches in pageable memory", nbytes)
            self._pinning = False
        return np.empty(nbytes, dtype=np.uint8), 0

    def _release(self, name: str) -> None:
        held = self._buffers.pop(name, None)
        if held is not None and held[1] and self._cudart is not None:
            self._cudart.cudaFreeHost(ctypes.c_void_p(held[1]))

    def close(self) -> None:
        for name in list(self._buffers):
            self._release(name)


def _cudart() -> ctypes.CDLL | None:
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        library.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        library.cudaFreeHost.argtypes = [ctypes.c_void_p]
        return library
    logger.info("no CUDA runtime library found: batches are staged in pageable host memory")
    return None


@dataclass
class _Bucket:
    """One captured batch size: device inputs and outputs at fixed addresses, and its binding."""

    rows: int
    inputs: dict[str, ort.OrtValue]
    outputs: dict[str, ort.OrtValue]
    binding: ort.IOBinding
    options: ort.RunOptions


class BoundRunner:
    """Runs batches on one session through I/O binding (see the module's docstring).

    Args:
        session: The InferenceSession (created with enable_cuda_graph when plan.graphs on CUDA).
        inputs, outputs: The graph's tensors (their shapes size the graph buckets).
        plan: Device, graphs and batch size.

    Raises:
        ModelLoadError: graphs asked for a model whose shapes are not fixed apart from the batch
            dimension, or a graph could not be captured.
    """

    def __init__(
        self, session: ort.InferenceSession, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor],
        plan: BindingPlan,
    ) -> None:
        self._session = session
        self._plan = plan
        self._inputs = {t.name: t for t in inputs}
        self._staging = PinnedStaging(pinned=plan.device == "cuda")
        self._buckets: dict[int, _Bucket] = {}
        self._sizes: list[int] = []
        if plan.graphs:
            self._sizes = buckets(plan.max_batch_size) if plan.max_batch_size > 0 else [1]
            for rows in self._sizes:
                self._buckets[rows] = self._capture(rows, inputs, outputs)

    @property
    def pinned(self) -> bool:
        """Whether batches are staged in page-locked memory."""
        return self._staging.pinned

    def run(self, feed: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """One batch: the same results as session.run(output_names, feed)."""
        if self._buckets:
            return self._replay(feed, output_names)
        binding = self._session.io_binding()
        for name, array in feed.items():
            staged = self._staging.array(name, array.shape, array.dtype)
            staged[...] = array
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), staged.ctypes.data)
        for name in output_names:
            binding.bind_output(name, self._plan.device, self._plan.device_id)
        self._session.run_with_iobinding(binding)
        results: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return results

    def _replay(self, feed: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        batched = self._plan.max_batch_size > 0
        rows = next(iter(feed.values())).shape[0] if batched and feed else 1
        bucket = self._buckets[bucket_for(rows, self._sizes)]
        for name, array in feed.items():
            target = bucket.inputs[name]
            captured = tuple(target.shape())
            fits = captured[1:] == array.shape[1:] if batched else captured == array.shape
            if not fits:
                raise InvalidInputError(
                    f"input '{name}' of shape {list(array.shape)} does not fit the model's CUDA graph {list(captured)}"
                )
            staged = self._staging.array(name, captured, array.dtype)
            staged[:rows] = array
            staged[rows:] = 0
            target.update_inplace(staged)
        self._session.run_with_iobinding(bucket.binding, bucket.options)
        return [bucket.outputs[name].numpy()[:rows] if batched else bucket.outputs[name].numpy()
                for name in output_names]

    def _capture(self, rows: int, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> _Bucket:
        """Allocates the bucket's device tensors and runs it twice (ONNX Runtime warms up, then captures)."""
        device, device_id = self._plan.device, self._plan.device_id
        binding = self._session.io_binding()
        values: dict[str, dict[str, ort.OrtValue]] = {"inputs": {}, "outputs": {}}
        for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
            for tensor in tensors:
                shape = self._fixed_shape(tensor, rows)
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, _numpy_type(tensor), device, device_id)
                values[kind][tensor.name] = value
                if kind == "inputs":
                    value.update_inplace(np.zeros(shape, dtype=_numpy_type(tensor)))
                    binding.bind_ortvalue_input(tensor.name, value)
                else:
                    binding.bind_ortvalue_output(tensor.name, value)
        options = ort.RunOptions()
        options.add_run_config_entry(GRAPH_ID, str(len(self._buckets) + 1))  # ids from 1; -1 means none
        try:
            for _ in range(2):
                self._session.run_with_iobinding(binding, options)
        except Exception as exc:  # ORT's own exception types
            raise ModelLoadError(f"CUDA graph for batch size {rows} could not be captured: {exc}") from exc
        return _Bucket(rows, values["inputs"], values["outputs"], binding, options)

    def _fixed_shape(self, tensor: GraphTensor, rows: int) -> list[int]:
        dims = list(tensor.shape)
        if self._plan.max_batch_size > 0:
            if not dims:
                raise ModelLoadError(f"optimization.cuda.graphs: '{tensor.name}' has no batch dimension")
            dims[0] = rows
        rest = dims[1:] if self._plan.max_batch_size > 0 else dims
        if any(d < 0 for d in rest):
            raise ModelLoadError(
                f"optimization.cuda.graphs needs fixed shapes apart from the batch dimension; '{tensor.name}' is "
                f"{list(tensor.shape)} in the model (export it with fixed dimensions, or leave graphs off)"
            )
        return dims

    def close(self) -> None:
        self._buckets.clear()
        self._staging.close()


def disagreement(
    session: ort.InferenceSession, runner: BoundRunner, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]
) -> str | None:
    """Why `runner` cannot be trusted with this model, or None: one probe batch (zeros, 1 for every dynamic
    dimension) through the bound path and through a plain run must give the same outputs.

    The binding path is the default on a GPU; a model or driver it does not suit then keeps running, the
    plain way, with a warning, instead of failing or answering differently. A model the plain run refuses
    the probe for (zeros it cannot take) cannot be checked, so it runs the plain way too.
    """
    feed = {t.name: np.zeros([d if d >= 0 else 1 for d in t.shape], _numpy_type(t)) for t in inputs}
    names = [t.name for t in outputs]
    try:
        expected = session.run(names, feed)
    except Exception as exc:  # ORT's own exception types
        return f"the probe batch does not run ({str(exc).splitlines()[0][:200]})"
    try:
        got = runner.run(feed, names)
    except Exception as exc:
        return f"the bound run failed ({str(exc).splitlines()[0][:200]})"
    for name, want, have in zip(names, expected, got, strict=True):
        if want.shape != have.shape or not np.allclose(want, have, rtol=1e-3, atol=1e-5, equal_nan=True):
            return f"output '{name}' differs from a plain run"
    return None


def _numpy_type(tensor: GraphTensor) -> np.dtype:
    """The numpy type of a graph tensor (binding covers numeric and boolean tensors, not strings)."""
    dtype = datatypes.BY_ONNX_NAME.get(tensor.type_name)
    if dtype is None or dtype.numpy_dtype == np.dtype(object):
        raise ModelLoadError(f"'{tensor.name}' ({tensor.type_name}) cannot be bound to a device")
    return dtype.numpy_dtype


def bindable(tensors: Sequence[GraphTensor]) -> bool:
    """Whether every tensor can go through I/O binding (string tensors cannot)."""
    return all(t.type_name in datatypes.BY_ONNX_NAME and t.datatype != "BYTES" for t in tensors)
