"""A loaded model version: request validation, instance scheduling and output building."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.core.batcher import Scheduler, SchedulerConfig
from server.core.errors import InvalidInputError, ModelRunError, quoted
from server.core.generation import GenerationScheduler, TokenChunk
from server.core.generation_args import request_args
from server.core.sampling import SamplingParams
from server.core.statistics import ModelStats, failure_reason
from server.core.types import (
    InferRequest,
    InferResponse,
    OutputTensor,
    ParamValue,
    RequestedOutput,
    TensorSpec,
    TextResponse,
)
from server.runtime.base import Runtime

logger = logging.getLogger(__name__)

# How many valid input layouts a validator remembers (SignatureValidator.validate).
VALID_LAYOUTS_KEPT = 256


@dataclass
class ModelSignature:
    """What a model accepts and returns, as its (completed) configuration says.

    Attributes:
        inputs: Input specs in config order.
        outputs: Output specs in config order.
        max_batch_size: 0 when the model does not batch; else the largest batch a
            request may carry (the first dimension of every tensor).
        labels: Class labels per output name, from the outputs' label files.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    labels: dict[str, list[str]] = field(default_factory=dict)


class SignatureValidator:
    """Checks requests against a model signature (shared by models and ensembles)."""

    def __init__(self, name: str, signature: ModelSignature) -> None:
        self.name = name
        self.signature = signature
        self.inputs = {s.name: s for s in signature.inputs}
        self.outputs = {s.name: s for s in signature.outputs}
        # The batch size of each input layout (names, datatypes, shapes) found valid: clients send the same few
        # layouts over and over, and the checks below were the largest piece of our Python per request.
        self._valid_layouts: dict[tuple[tuple[str, str, tuple[int, ...]], ...], int] = {}
        self._all_outputs = [RequestedOutput(s.name) for s in signature.outputs]
        self._reshaped = any(s.reshape is not None for s in signature.inputs)

    def validate(self, request: InferRequest) -> int:
        """Checks inputs against the signature and returns the request's batch size (0 if none)."""
        layout = tuple([(t.name, t.datatype, t.shape) for t in request.inputs])
        try:
            return self._valid_layouts[layout]
        except KeyError:
            pass
        except TypeError:  # a shape given as a list: checked, not remembered
            return self._check(request)
        batch_size = self._check(request)  # raises for an invalid layout, which is never remembered
        if len(self._valid_layouts) >= VALID_LAYOUTS_KEPT:
            self._valid_layouts.clear()  # a client cycling through shapes: start again rather than grow
        self._valid_layouts[layout] = batch_size
        return batch_size

    def _check(self, request: InferRequest) -> int:
        seen: set[str] = set()
        batch_sizes: set[int] = set()
        max_batch = self.signature.max_batch_size
        for tensor in request.inputs:
            spec = self.inputs.get(tensor.name)
            if spec is None:
                raise InvalidInputError(
                    f"unexpected input {quoted(tensor.name)} for model '{self.name}'; "
                    f"expected: {', '.join(self.inputs) or 'none'}"
                )
            if tensor.name in seen:
                raise InvalidInputError(f"input {quoted(tensor.name)} is given more than once")
            seen.add(tensor.name)
            if tensor.datatype != spec.datatype:
                raise InvalidInputError(
                    f"input {quoted(tensor.name)} has datatype {quoted(tensor.datatype)}; "
                    f"model '{self.name}' expects {spec.datatype}"
                )
            dims = tensor.shape
            if max_batch > 0:
                if len(dims) < 1 or dims[0] < 1:
                    raise InvalidInputError(
                        f"input {quoted(tensor.name)} needs a batch dimension of at least 1 first; "
                        f"got shape {list(dims)}"
                    )
                if dims[0] > max_batch:
                    raise InvalidInputError(
                        f"input {quoted(tensor.name)} has batch size {dims[0]}, over model '{self.name}''s "
                        f"max_batch_size {max_batch}"
                    )
                batch_sizes.add(dims[0])
                dims = dims[1:]
            if not _dims_match(dims, spec.dims):
                expected = ([-1] if max_batch > 0 else []) + list(spec.dims)
                raise InvalidInputError(
                    f"input {quoted(tensor.name)} has shape {list(tensor.shape)}; "
                    f"model '{self.name}' expects {expected}"
                )
        missing = [s.name for s in self.signature.inputs if not s.optional and s.name not in seen]
        if missing:
            raise InvalidInputError(f"missing input(s) {', '.join(missing)} for model '{self.name}'")
        if len(batch_sizes) > 1:
            raise InvalidInputError(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
        return batch_sizes.pop() if batch_sizes else 0

    def model_inputs(self, request: InferRequest) -> dict[str, np.ndarray]:
        """A validated request's inputs in the shapes the model has (each input's `reshape` applied)."""
        if not self._reshaped:
            return {t.name: t.data for t in request.inputs}
        batched = self.signature.max_batch_size > 0
        return {t.name: to_model_shape(self.inputs[t.name], t.data, batched) for t in request.inputs}

    def wire_output(self, name: str, data: np.ndarray) -> np.ndarray:
        """A model output in the shape the config's `dims` give it (its `reshape` undone).

        Raises:
            ModelRunError: the model's output does not have the shape the config's reshape states.
        """
        spec = self.outputs[name]
        if spec.reshape is None:
            return data
        lead = data.shape[:1] if self.signature.max_batch_size > 0 else ()
        inner = tuple(data.shape[len(lead):])
        if not _dims_match(inner, spec.reshape):
            raise ModelRunError(
                f"output '{name}' of model '{self.name}' has shape {list(data.shape)}, not the config's "
                f"reshape {list(spec.reshape)}"
            )
        return data.reshape(lead + map_shape(inner, spec.reshape, spec.dims))

    def requested_outputs(self, requested: list[RequestedOutput]) -> list[RequestedOutput]:
        if not requested:
            return self._all_outputs  # shared: callers only read it
        names: set[str] = set()
        for output in requested:
            spec = self.outputs.get(output.name)
            if spec is None:
                raise InvalidInputError(
                    f"unknown output {quoted(output.name)} for model '{self.name}'; "
                    f"outputs: {', '.join(self.outputs)}"
                )
            if output.name in names:
                raise InvalidInputError(f"output {quoted(output.name)} is requested more than once")
            names.add(output.name)
            if output.classification_count and spec.datatype == "BYTES":
                raise InvalidInputError(f"output {quoted(output.name)} is BYTES and cannot be classified")
        return requested



class Model:
    """One version of one model, with its instances and scheduler, ready to serve.

    Args:
        name: Model name.
        version: Version number.
        platform: Platform string reported in metadata ("onnxruntime_onnx").
        signature: Inputs, outputs, batching and labels.
        instances: One runtime per model instance; each runs one batch at a time.
        scheduler_config: Queueing and batching settings.
        config: The completed model configuration message (returned by ModelConfig).
        generator: For text-generation models, the continuous-batching scheduler.
    """

    def __init__(
        self,
        name: str,
        version: int,
        platform: str,
        signature: ModelSignature,
        instances: Sequence[Runtime],
        scheduler_config: SchedulerConfig,
        config: Any,
        generator: GenerationScheduler | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.platform = platform
        self.signature = signature
        self.config = config
        self.stats = ModelStats()
        self._instances = list(instances)
        self.validator = SignatureValidator(name, signature)
        self.scheduler = Scheduler(name, self._instances, scheduler_config, self.stats)
        self.generator = generator

    @property
    def busy(self) -> bool:
        """Whether requests this version admitted are still queued or running, generation streams included."""
        return self.scheduler.busy or (self.generator is not None and self.generator.busy)

    @property
    def providers(self) -> Sequence[str]:
        """Execution providers the instances actually run on."""
        return self._instances[0].providers

    async def infer(self, request: InferRequest, deadline_s: float | None = None) -> InferResponse:
        """Validates a request, queues it, and builds its response.

        Args:
            request: The decoded request.
            deadline_s: Seconds left before the client's deadline, if it set one.

        Raises:
            InvalidInputError: the request does not match the model's signature.
            QueueFullError, DeadlineExceededError: from the scheduler.
        """
        if self.generator is not None:
            # The whole completion in one `text_output` (an ensemble step, or a unary call).
            (answer,) = [r async for r in self.text_responses(request, deadline_s, decoupled=False)]
            return answer.to_infer_response()
        start = time.perf_counter_ns()
        failure: str | None = None
        try:
            batch_size = self.validator.validate(request)
            outputs = self.validator.requested_outputs(request.outputs)
            priority, timeout_us = _scheduling_parameters(request.parameters)
            results = await self.scheduler.submit(
                self.validator.model_inputs(request),
                batch_size,
                [o.name for o in outputs],
                priority=priority,
                timeout_us=timeout_us,
                deadline_s=deadline_s,
            )
            response = InferResponse(
                model_name=self.name,
                model_version=str(self.version),
                id=request.id,
                outputs=[self._build_output(o, r) for o, r in zip(outputs, results, strict=True)],
            )
            return response
        except BaseException as exc:
            failure = failure_reason(exc)
            raise
        finally:
            self.stats.record_request(failure, time.perf_counter_ns() - start)

    async def text_responses(
        self, request: InferRequest, deadline_s: float | None, decoupled: bool
    ) -> AsyncIterator[TextResponse]:
        """Triton's text-generation convention: the one place that assembles its responses.

        The request carries `text_input` and the optional settings of GenerationArgs. Unary
        (ModelInfer, an HTTP generate), it gets one response whose `text_output` is the prompt
        followed by the completion, or the completion alone with `exclude_input_in_output`.
        Decoupled (ModelStreamInfer, an HTTP generate_stream), it gets a series: with `stream`
        (the default there) one delta per chunk, else the whole text once at the end; each
        is flagged final or not; with `triton_enable_empty_final_response` the last is an
        extra, empty one. The request counts once in the statistics, success or failure.

        Raises:
            InvalidInputError: not a text-generation model; malformed tensors or settings.
            ServerError: from the generation scheduler (queue full, deadline, model stopping).
        """
        started = time.perf_counter_ns()
        failure: str | None = None
        try:
            async for response in self._assemble_text(request, deadline_s, decoupled):
                yield response
        except BaseException as exc:
            failure = failure_reason(exc)
            raise
        finally:
            if self.generator is not None:
                self.record_generation(failure, time.perf_counter_ns() - started)

    async def _assemble_text(
        self, request: InferRequest, deadline_s: float | None, decoupled: bool
    ) -> AsyncIterator[TextResponse]:
        if self.generator is None:
            raise InvalidInputError(f"model '{self.name}' is not a text-generation model")
        args = request_args(request, self.validator.validate, default_stream=decoupled)
        version = str(self.version)
        prefix = "" if args.exclude_input else args.prompt.decode("utf-8", "replace")
        chunks = self.generator.generate(args.prompt, args.params, deadline_s)
        if not decoupled:
            pieces = [prefix] + [chunk.text async for chunk in chunks]
            yield TextResponse(self.name, version, request.id, "".join(pieces), None)
            return
        pieces = []
        async for chunk in chunks:
            last = chunk.finish_reason is not None
            if args.stream:
                text = chunk.text
            else:
                pieces.append(chunk.text)
                if not last:
                    continue
                text = prefix + "".join(pieces)
            if last and args.empty_final and not text:
                break
            yield TextResponse(self.name, version, request.id, text, last and not args.empty_final)
        if args.empty_final:
            yield TextResponse(self.name, version, request.id, None, True)

    async def token_chunks(
        self, prompt: str, params: SamplingParams, deadline_s: float | None
    ) -> AsyncIterator[TokenChunk]:
        """Typed text generation (ortserve.v1.TextGeneration): token chunks as the model makes them.

        Raises:
            InvalidInputError: not a text-generation model.
        """
        if self.generator is None:
            raise InvalidInputError(f"model '{self.name}' is not a text-generation model")
        started = time.perf_counter_ns()
        failure: str | None = None
        try:
            async for chunk in self.generator.generate(prompt.encode("utf-8"), params, deadline_s):
                yield chunk
        except BaseException as exc:
            failure = failure_reason(exc)
            raise
        finally:
            self.record_generation(failure, time.perf_counter_ns() - started)

    def record_generation(self, failure: str | None, total_ns: int) -> None:
        """Counts one finished text-generation request (one inference; its decode steps run batched).

        Args:
            failure: None for a success, else its reason (statistics.FAILURE_REASONS).
        """
        if failure is None:
            self.stats.record_execution(1, 1, 0, total_ns, 0)
        self.stats.record_request(failure, total_ns)

    def _build_output(self, requested: RequestedOutput, data: np.ndarray) -> OutputTensor:
        spec = self.validator.outputs[requested.name]
        data = self.validator.wire_output(requested.name, data)
        if requested.classification_count > 0:
            labels = self.signature.labels.get(spec.name, [])
            data = classify(data, requested.classification_count, labels, self.signature.max_batch_size > 0)
            return OutputTensor(spec.name, "BYTES", tuple(data.shape), data)
        return OutputTensor(spec.name, spec.datatype, tuple(data.shape), data)

    async def stop(self) -> None:
        """Stops the scheduler's workers (requests still queued fail)."""
        await self.scheduler.close()

    def close(self) -> None:
        """Waits for running work, then releases the instances."""
        self.scheduler.stop_threads()
        if self.generator is not None:
            self.generator.close()
        for instance in self._instances:
            instance.close()


def _scheduling_parameters(parameters: dict[str, ParamValue]) -> tuple[int, int]:
    """The request's `priority` and `timeout` (microseconds) parameters, checked."""
    if "priority" not in parameters and "timeout" not in parameters:
        return 0, 0  # most requests: no lookups, no checks
    values = []
    for key in ("priority", "timeout"):
        value = parameters.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(
                f"request parameter {quoted(key)} must be a non-negative integer, got {quoted(value)}"
            )
        values.append(value)
    return values[0], values[1]


def map_shape(shape: tuple[int, ...], source: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...]:
    """`target` with its variable (-1) dims filled in order from `shape`'s dims where `source` is -1.

    `shape` must match the `source` pattern; the config check (one -1 in
    `target` per -1 in `source`, equal fixed element counts) makes the result
    hold exactly the elements of `shape`.
    """
    variable = iter([d for d, pattern in zip(shape, source, strict=True) if pattern == -1])
    return tuple(next(variable) if d == -1 else d for d in target)


def to_model_shape(spec: TensorSpec, data: np.ndarray, batched: bool) -> np.ndarray:
    """A validated input (wire shape `spec.dims`) as the model takes it (`spec.reshape`), batch dim kept."""
    if spec.reshape is None:
        return data
    lead = data.shape[:1] if batched else ()
    return data.reshape(lead + map_shape(tuple(data.shape[len(lead):]), spec.dims, spec.reshape))


def _dims_match(actual: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    if len(actual) != len(declared):
        return False
    return all(d == -1 or a == d for a, d in zip(actual, declared, strict=True))


def classify(data: np.ndarray, k: int, labels: list[str], batched: bool) -> np.ndarray:
    """Triton's classification extension: top-k "value:index[:label]" strings per batch element.

    Args:
        data: The output tensor (scores).
        k: How many classes to return; capped at the number of scores.
        labels: Label per class index, if the output has a label file.
        batched: Whether the first dimension is the batch.

    Returns:
        A BYTES object array of shape [batch, k] (batched) or [k].
    """
    rows = data.reshape(data.shape[0], -1) if batched and data.ndim > 0 else data.reshape(1, -1)
    k = min(k, rows.shape[1])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r, row in enumerate(rows):
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        for c, index in enumerate(order):
            text = f"{float(row[index]):f}:{int(index)}"
            if index < len(labels):
                text += f":{labels[index]}"
            out[r, c] = text.encode("utf-8")
    return out if batched else out.reshape(k)


__all__ = ["Model", "ModelSignature", "SignatureValidator", "classify"]
