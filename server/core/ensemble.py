"""Pipelines of models (Triton's ensemble platform): steps run through each model's own scheduler."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.errors import ModelLoadError, ModelNotReadyError, ServerError
from server.core.model import Model, ModelSignature, SignatureValidator, classify
from server.core.statistics import ModelStats, failure_reason
from server.core.types import InferRequest, InferResponse, InputTensor, OutputTensor, RequestedOutput

ENSEMBLE_PLATFORM = "ensemble"
# Ensembles may use ensembles as steps up to this many levels (the outermost counts as one).
# Loads refuse deeper nestings and cycles; requests check it too, so even ensembles that
# two concurrent loads made refer to each other can never recurse without bound.
MAX_ENSEMBLE_DEPTH = 8
# How many ensembles deep the current request is (a context variable: each step task has its own copy).
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("ensemble_depth", default=0)


@dataclass(frozen=True)
class EnsembleStep:
    """One step: a model, and how its tensors map to the ensemble's.

    Attributes:
        model_name: The step's model.
        model_version: Version to use; -1 or 0 means the highest ready one.
        input_map: Step input name -> ensemble tensor name.
        output_map: Step output name -> ensemble tensor name.
    """

    model_name: str
    model_version: int
    input_map: dict[str, str]
    output_map: dict[str, str]


def check_graph(inputs: list[str], outputs: list[str], steps: list[EnsembleStep]) -> None:
    """Every step input is produced before it is needed, every output is produced, no tensor twice.

    Raises:
        ModelLoadError: naming the tensor or step at fault.
    """
    if not steps:
        raise ModelLoadError("ensemble_scheduling has no steps")
    producers: dict[str, str] = {name: "the request" for name in inputs}
    for step in steps:
        for produced in step.output_map.values():
            if produced in producers:
                raise ModelLoadError(f"ensemble tensor '{produced}' is produced twice")
            producers[produced] = step.model_name
    for step in steps:
        missing = [t for t in step.input_map.values() if t not in producers]
        if missing:
            raise ModelLoadError(f"step '{step.model_name}' reads {missing}, which nothing produces")
    unproduced = [o for o in outputs if o not in producers]
    if unproduced:
        raise ModelLoadError(f"ensemble output(s) {unproduced} are produced by no step")
    # Cycles: repeatedly run whatever is runnable; anything left over waits on itself.
    available, remaining = set(inputs), list(steps)
    while remaining:
        runnable = [s for s in remaining if set(s.input_map.values()) <= available]
        if not runnable:
            raise ModelLoadError(f"steps {[s.model_name for s in remaining]} depend on each other in a cycle")
        for step in runnable:
            available |= set(step.output_map.values())
            remaining.remove(step)


class EnsembleModel:
    """An ensemble version that serves like a model: inputs in, outputs out, steps in between.

    Independent steps run concurrently; each goes through its model's scheduler, so
    batching applies; intermediate tensors stay in memory.

    Args:
        name: Ensemble name.
        version: Ensemble version.
        signature: The ensemble's own inputs and outputs (from its config).
        steps: The steps.
        lookup: Finds a step's served model by name and version (raises if not ready).
        config: The ensemble's configuration message.
    """

    platform = ENSEMBLE_PLATFORM

    def __init__(
        self,
        name: str,
        version: int,
        signature: ModelSignature,
        steps: list[EnsembleStep],
        lookup: Callable[[str, str], Model | EnsembleModel],
        config: Any,
    ) -> None:
        self.name = name
        self.version = version
        self.signature = signature
        self.steps = steps
        self.config = config
        self.stats = ModelStats()
        self._lookup = lookup
        self._validator = SignatureValidator(name, signature)

    @property
    def providers(self) -> list[str]:
        return []

    async def infer(self, request: InferRequest, deadline_s: float | None = None) -> InferResponse:
        """Runs the steps as their inputs become available and returns the requested outputs."""
        start = time.perf_counter_ns()
        failure: str | None = None
        depth = _depth.get() + 1
        token = _depth.set(depth)
        try:
            if depth > MAX_ENSEMBLE_DEPTH:
                raise ModelNotReadyError(
                    f"ensemble '{self.name}' is nested more than {MAX_ENSEMBLE_DEPTH} ensembles deep (a cycle?)"
                )
            self._validator.validate(request)
            requested = self._validator.requested_outputs(request.outputs)
            tensors: dict[str, InputTensor] = {t.name: t for t in request.inputs}
            remaining = list(self.steps)
            while remaining:
                runnable = [s for s in remaining if all(t in tensors for t in s.input_map.values())]
                for produced in await self._run_steps(runnable, tensors, request, deadline_s):
                    tensors.update(produced)
                for step in runnable:
                    remaining.remove(step)
            outputs = []
            for output in requested:
                tensor = tensors[output.name]
                data = tensor.data
                if output.classification_count:
                    labels = self.signature.labels.get(output.name, [])
                    data = classify(data, output.classification_count, labels, self.signature.max_batch_size > 0)
                    outputs.append(OutputTensor(output.name, "BYTES", tuple(data.shape), data))
                else:
                    outputs.append(OutputTensor(output.name, tensor.datatype, tuple(data.shape), data))
            return InferResponse(self.name, str(self.version), request.id, outputs)
        except BaseException as exc:
            failure = failure_reason(exc)
            raise
        finally:
            _depth.reset(token)
            self.stats.record_request(failure, time.perf_counter_ns() - start)

    async def _run_steps(
        self,
        steps: list[EnsembleStep],
        tensors: dict[str, InputTensor],
        request: InferRequest,
        deadline_s: float | None,
    ) -> list[dict[str, InputTensor]]:
        """Runs independent steps concurrently; the first failure, or a cancelled request, cancels the rest."""
        tasks = [asyncio.ensure_future(self._run_step(s, tensors, request, deadline_s)) for s in steps]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return [task.result() for task in tasks]
        finally:
            # A cancelled client request (or a failed step) leaves no step running or queued:
            # a step cancelled while queued leaves its model's queue at once.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_step(
        self, step: EnsembleStep, tensors: dict[str, InputTensor], request: InferRequest, deadline_s: float | None
    ) -> dict[str, InputTensor]:
        version = str(step.model_version) if step.model_version > 0 else ""
        try:
            model = self._lookup(step.model_name, version)
            step_request = InferRequest(
                model_name=step.model_name,
                model_version=version,
                id=request.id,
                inputs=[
                    InputTensor(name, tensors[source].datatype, tensors[source].shape, tensors[source].data)
                    for name, source in step.input_map.items()
                ],
                outputs=[RequestedOutput(name) for name in step.output_map],
                parameters={k: v for k, v in request.parameters.items() if k in ("priority", "timeout")},
            )
            response = await model.infer(step_request, deadline_s)
        except ServerError as exc:
            # Keep the class (so the status code) and say which step failed.
            raise type(exc)(f"ensemble '{self.name}' step '{step.model_name}': {exc}") from exc
        produced = {}
        for output in response.outputs:
            target = step.output_map[output.name]
            produced[target] = InputTensor(target, output.datatype, tuple(output.data.shape), np.asarray(output.data))
        return produced

    async def stop(self) -> None:
        """Nothing of its own to stop: the step models have their own schedulers."""

    def close(self) -> None:
        """Nothing of its own to release."""


__all__ = ["EnsembleModel", "EnsembleStep", "MAX_ENSEMBLE_DEPTH", "check_graph"]
