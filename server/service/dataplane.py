"""The data plane: everything a front end serves, written once and known to no transport.

A front end (rpc/ for gRPC; an HTTP one alike) converts its request into the plain types
here (core/types.py, the dataclasses below, the schema's ModelConfig), awaits one method,
and converts the answer back. Errors are the domain exceptions of core/errors.py; each
front end maps them to its own status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson

from server import workers as workers_module
from server.core.ensemble import EnsembleModel
from server.core.errors import (
    InvalidInputError,
    PermissionDeniedError,
    ServerError,
    ServerUnavailableError,
    first_line,
    quoted,
)
from server.core.generation import TokenChunk
from server.core.model import Model
from server.core.sampling import SamplingParams
from server.core.types import FINAL_PARAMETER, InferRequest, InferResponse, TextResponse
from server.logs import audit
from server.repository.ensembles import ServedModel
from server.repository.registry import IndexEntry, ModelRegistry
from server.schema import model_config_pb2 as mc
from server.service import access
from server.service.control import ModelControl, Peers
from server.service.metrics import (
    Family,
    carried_over,
    families_from_json,
    families_to_json,
    grpc_counter,
    http_counter,
    merge,
    model_families,
)
from server.service.statistics import VersionStatistics, merge_statistics
from server.service.system_metrics import SystemGauges

SERVER_NAME = "ortserve"
# Only what is true of this server: perf_analyzer reads statistics only when "statistics"
# is listed, and clients probe "classification" and "model_repository".
# How deep the access check follows ensembles inside ensembles (loading bounds the nesting anyway).
MAX_STEP_DEPTH = 8
_Item = TypeVar("_Item")
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics", "parameters")


@dataclass
class ServerState:
    """Whether the server has started and whether it still takes new work."""

    strict_readiness: bool
    started: bool = False
    draining: bool = False


@dataclass(frozen=True)
class ServerMetadata:
    """What the server says of itself."""

    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class TensorMetadata:
    """A model input or output as metadata shows it: -1 for a variable dimension, batch included."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """A model's served versions and the signature of the highest."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class WorkerPeers:
    """This worker's siblings (--workers): how to call them, where they are, the shared directory."""

    peers: Peers
    addresses: tuple[str, ...]
    peer_dir: Path
    worker_index: int


class DataPlane:
    """Readiness, metadata, inference, text generation, statistics and model control over a registry.

    Args:
        registry: The loaded models.
        state: Server readiness and draining, shared with the app.
        version: Server version reported in the metadata.
        control_mode: --model-control-mode; loads and unloads are refused unless "explicit".
    """

    def __init__(self, registry: ModelRegistry, state: ServerState, version: str, control_mode: str = "none") -> None:
        self.registry = registry
        self.state = state
        self._version = version
        self._control_mode = control_mode
        self._workers: WorkerPeers | None = None
        self._control: ModelControl | None = None
        # Counted by the front ends, exported by metrics().
        self.http_requests = http_counter()
        self.grpc_requests = grpc_counter()
        self._system = SystemGauges()
        self._inherited: list[Family] = []  # a dead predecessor's counters (attach_workers)
        # Concurrent generation streams per principal (--auth-config's max_streams).
        self.streams = access.StreamSlots()

    def attach_workers(self, workers: WorkerPeers) -> None:
        """Makes statistics add up the siblings' and loads/unloads apply to every worker."""
        self._workers = workers
        try:
            self._inherited = families_from_json(
                orjson.loads(workers_module.metrics_file(workers.peer_dir, workers.worker_index).read_bytes())
            )
        except (OSError, ValueError, KeyError, TypeError):
            self._inherited = []  # the first of this slot, or an unreadable record: start from zero
        self._control = ModelControl(
            self.registry, workers.peers, list(workers.addresses), workers.peer_dir, workers.worker_index
        )

    @property
    def worker_index(self) -> int | None:
        """This worker's index when the server runs several, else None."""
        return self._workers.worker_index if self._workers is not None else None

    async def close(self) -> None:
        """Releases the connections to sibling workers."""
        if self._workers is not None:
            await self._workers.peers.close()

    # Health and metadata.

    def live(self) -> bool:
        """The process answers: always true while it runs."""
        return True

    def ready(self) -> bool:
        """Ready: started, not draining, and (strict readiness) every known model ready."""
        if not self.state.started or self.state.draining:
            return False
        if self.state.strict_readiness:
            # Models unloaded on purpose (explicit mode) do not make the server unready.
            return all(self.registry.is_ready(e.name) or e.reason == "unloaded" for e in self.registry.entries())
        return True

    def check_accepting(self) -> None:
        """Refuses new work once the server is draining.

        Raises:
            ServerUnavailableError: the server is shutting down.
        """
        if self.state.draining:
            raise ServerUnavailableError("server is shutting down")

    def metadata(self) -> ServerMetadata:
        """The server's name, version and protocol extensions."""
        return ServerMetadata(SERVER_NAME, self._version, EXTENSIONS)

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether the model version serves (false while the server drains).

        Raises:
            PermissionDeniedError: the caller may not use the model (--auth-config).
        """
        access.check_model(name)
        return not self.state.draining and self.registry.is_ready(name, version)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """The served versions of a model and the signature of the highest (or the one named).

        Raises:
            InvalidInputError, ModelNotFoundError, ModelNotReadyError: as ModelRegistry.get.
            PermissionDeniedError: the caller may not use the model (--auth-config).
        """
        access.check_model(name)
        self.registry.get(name, version)  # refuses empty, unknown, unready
        models = self.registry.models(name, version)
        newest = models[-1]
        batch = (-1,) if newest.signature.max_batch_size > 0 else ()
        return ModelMetadata(
            name=name,
            versions=tuple(str(m.version) for m in models),
            platform=newest.platform,
            inputs=tuple(TensorMetadata(s.name, s.datatype, batch + tuple(s.dims)) for s in newest.signature.inputs),
            outputs=tuple(TensorMetadata(s.name, s.datatype, batch + tuple(s.dims)) for s in newest.signature.outputs),
        )

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        """The completed configuration of a served model version (shared: do not modify it)."""
        access.check_model(name)
        config: mc.ModelConfig = self.registry.get(name, version).config
        return config

    # Inference.

    async def infer(self, request: InferRequest, deadline_s: float | None = None) -> InferResponse:
        """One request, one response: a tensor model's outputs, or a generation model's whole text.

        Args:
            request: The decoded request.
            deadline_s: Seconds left before the client's deadline, if it set one.

        Raises:
            ServerUnavailableError: the server is draining.
            ServerError: the model's or the scheduler's refusal (see Model.infer).
        """
        self.check_accepting()
        model = self._allowed(request.model_name, request.model_version)
        # A generation model answers with its whole text (Model.text_responses, unary).
        if _generation_model(model) is None:
            return await model.infer(request, deadline_s)
        with self.streams.stream(access.current_principal.get()):
            return await model.infer(request, deadline_s)

    async def infer_decoupled(
        self, request: InferRequest, deadline_s: float | None = None
    ) -> AsyncIterator[InferResponse]:
        """The responses of one request in a stream, each flagged `triton_final_response`.

        A tensor model answers once; a generation model answers with Triton's decoupled
        text responses (Model.text_responses). The caller checks draining when the
        request arrives (check_accepting), so that an admitted request runs to the end.
        """
        model = self._allowed(request.model_name, request.model_version)
        generating = _generation_model(model)
        if generating is None:
            response = await model.infer(request)
            response.parameters[FINAL_PARAMETER] = True
            yield response
            return
        async for text in self._one_stream(generating.text_responses(request, deadline_s, decoupled=True)):
            yield text.to_infer_response()

    def generate_text(
        self, request: InferRequest, deadline_s: float | None = None, decoupled: bool = False
    ) -> AsyncIterator[TextResponse]:
        """A text-generation request in Triton's convention, answered as plain text responses.

        Args:
            decoupled: A series of responses (deltas when `stream`), else one with the whole text.

        Raises:
            InvalidInputError: the model is not a text-generation model, or the request is malformed.
        """
        self.check_accepting()
        model = self._generation_model(request.model_name, request.model_version)
        return self._one_stream(model.text_responses(request, deadline_s, decoupled))

    def generate(
        self, name: str, version: str, prompt: str, params: SamplingParams, deadline_s: float | None = None
    ) -> AsyncIterator[TokenChunk]:
        """Typed text generation: the model's token chunks for a prompt (ortserve.v1.TextGeneration).

        Raises:
            InvalidInputError: the model is not a text-generation model.
        """
        return self._one_stream(self._generation_model(name, version).token_chunks(prompt, params, deadline_s))

    async def _one_stream(self, source: AsyncIterator[_Item]) -> AsyncIterator[_Item]:
        """`source`, holding one of the caller's generation streams while it runs (refused at the first item
        when the caller is at its max_streams)."""
        with self.streams.stream(access.current_principal.get()):
            async for item in source:
                yield item

    def _allowed(self, name: str, version: str) -> ServedModel:
        """The model, when the caller may use it and, for an ensemble, every model its steps call.

        Raises:
            PermissionDeniedError: the caller may not use the model or one of its step models.
            InvalidInputError, ModelNotFoundError, ModelNotReadyError: as ModelRegistry.get.
        """
        access.check_model(name)
        model = self.registry.get(name, version)
        if access.current_principal.get() is not None and isinstance(model, EnsembleModel):
            self._check_steps(model, depth=0)
        return model

    def _check_steps(self, ensemble: EnsembleModel, depth: int) -> None:
        for step in ensemble.steps:
            access.check_model(step.model_name)
            if depth < MAX_STEP_DEPTH:
                try:
                    inner = self.registry.get(step.model_name)
                except ServerError:
                    continue  # the ensemble answers that itself when it runs
                if isinstance(inner, EnsembleModel):
                    self._check_steps(inner, depth + 1)

    def _generation_model(self, name: str, version: str) -> Model:
        model = _generation_model(self._allowed(name, version))
        if model is None:
            raise InvalidInputError(f"model {quoted(name)} is not a text-generation model")
        return model

    # Statistics and the repository.

    async def statistics(self, name: str = "", version: str = "", local_only: bool = False) -> list[VersionStatistics]:
        """Per model version statistics, added up over every worker unless `local_only`.

        Raises:
            InvalidInputError, ModelNotFoundError, ModelNotReadyError: for a named model, as ModelRegistry.get.
            PermissionDeniedError: the caller may not use the named model (--auth-config).
        """
        if name:
            access.check_model(name)
        stats = [VersionStatistics.of(model) for model in self.registry.models(name, version)]
        if self._workers is not None and not local_only:
            peers = self._workers.peers
            replies = await asyncio.gather(*(peers.statistics(a, name, version) for a in self._workers.addresses))
            for reply in replies:
                if reply is not None:
                    merge_statistics(stats, reply)
        return [s for s in stats if access.visible(s.name)]

    # Metrics.

    def local_metrics(self) -> list[Family]:
        """This worker's own metric families (no server-wide gauges): its models and its front ends' counts.

        A worker that replaced one that died adds its predecessor's last counters, so the
        server's sums never go down when a worker restarts (Prometheus would read a drop as a
        counter reset); each call records the result for a successor in turn.
        """
        return self._local_metrics()[0]

    def local_metrics_json(self) -> bytes:
        """local_metrics() as JSON (families_to_json), for a sibling's scrape: encoded once, for the
        answer and for the successor's record."""
        return self._local_metrics()[1]

    def _local_metrics(self) -> tuple[list[Family], bytes]:
        models = self.registry.models()
        families = model_families(models)
        families += [self.http_requests.family(), self.grpc_requests.family()]
        encoded = b""
        if self._workers is not None:
            served = {(m.name, str(m.version)) for m in models}
            merge(families, carried_over(self._inherited, served))
            encoded = orjson.dumps(families_to_json(families))
            path = workers_module.metrics_file(self._workers.peer_dir, self._workers.worker_index)
            workers_module.write_json_atomically(path, encoded)
        return families, encoded

    async def metrics(self) -> list[Family]:
        """The whole server's metric families: every worker's added up, then the server-wide gauges.

        A sibling that does not answer (restarting) is left out of this scrape.
        """
        families = self.local_metrics()
        if self._workers is not None:
            peers = self._workers.peers
            for reply in await asyncio.gather(*(peers.metrics(a) for a in self._workers.addresses)):
                if reply is not None:
                    merge(families, reply)
        on_gpu = any("CUDAExecutionProvider" in getattr(m, "providers", ()) for m in self.registry.models())
        return families + self._system.families(gpu=on_gpu)

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model on disk or known that the caller may use, with its state and the reason when not ready."""
        return [e for e in self.registry.index(ready_only=ready_only) if access.visible(e.name)]

    def _check_explicit(self, action: str) -> None:
        if self._control_mode != "explicit":
            raise PermissionDeniedError(
                f"model {action} through the API needs --model-control-mode explicit (this server runs "
                f"'{self._control_mode}')"
            )

    async def load(self, name: str, config: mc.ModelConfig | None = None, local_only: bool = False) -> None:
        """Loads (or reloads) a model, on every worker unless `local_only` (a sibling's own call).

        Args:
            config: A config override that replaces the model's config file.

        Raises:
            PermissionDeniedError: the server does not run in explicit model-control mode.
            InvalidInputError: the name is invalid or escapes the repository.
            ServerError: the load failed (on the first failing worker, with its error).
        """
        self._check_explicit("loading")
        access.check_model(name)
        self.registry.repository.model_dir(name)  # refuses bad names before any worker acts
        action = "model_load_override" if config is not None else "model_load"
        with _audited(action, name, local_only):
            if self._control is None or local_only:
                await self.registry.load(name, config)
            else:
                await self._control.load(name, config)

    async def unload(self, name: str, local_only: bool = False) -> None:
        """Unloads a model, on every worker unless `local_only`.

        Raises:
            PermissionDeniedError: the server does not run in explicit model-control mode.
            ModelNotFoundError: no worker had the model loaded.
        """
        self._check_explicit("unloading")
        access.check_model(name)
        with _audited("model_unload", name, local_only):
            if self._control is None or local_only:
                await self.registry.unload(name)
            else:
                await self._control.unload(name)


def _generation_model(model: object) -> Model | None:
    """The model as a text-generation model, or None when it serves tensors (ensembles included)."""
    return model if isinstance(model, Model) and model.generator is not None else None


@contextlib.contextmanager
def _audited(action: str, model: str, local_only: bool) -> Iterator[None]:
    """An audit line for an admin action and its outcome (a sibling's share of a fan-out is not repeated)."""
    if local_only:
        yield
        return
    principal = access.current_principal.get()
    name = principal.name if principal is not None else "-"
    try:
        yield
    except BaseException as exc:
        audit(action, name, model=model, outcome="failed", reason=first_line(exc, empty=type(exc).__name__))
        raise
    audit(action, name, model=model, outcome="ok")
