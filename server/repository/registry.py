"""The served models: loading, atomic reloads, unloading, states and reasons, lookups."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.core.ensemble import MAX_ENSEMBLE_DEPTH, EnsembleModel
from server.core.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerError,
    quoted,
)
from server.core.model import Model
from server.repository.ensembles import ServedModel, StepNotReadyError, build_ensemble, check_steps, is_ensemble
from server.repository.loader import load_model
from server.repository.repository import (
    MAX_VERSION,
    VALID_MODEL_NAME,
    ModelRepository,
    VersionLoadError,
    parse_version,
)
from server.schema import model_config_pb2 as mc

logger = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"

# What a model's files looked like at a load (ModelRepository.fingerprint); poll mode reloads on a change.
Fingerprint = tuple[tuple[str, str, int, int], ...]
# How long a replaced version may take to finish the requests it admitted.
DRAIN_TIMEOUT_S = 120.0


@dataclass
class ModelEntry:
    """A model the server knows of: its served versions, or why it has none.

    Attributes:
        name: Model name.
        state: READY, LOADING (first load), UNLOADING or UNAVAILABLE.
        reason: Why the model is not READY.
        versions: Served versions.
        reloading: A new version set is being loaded while these versions serve.
        reload_error: Why the last reload failed (the old versions kept serving).
        failed_version: The version that the failure in `reason` or `reload_error` is about, if one.
        fingerprint: What the files looked like at the last load (for poll mode).
        waits_for: For an ensemble refused because a step's model was not ready: those
            models (poll mode retries it once they are ready).
    """

    name: str
    state: str
    reason: str = ""
    versions: dict[int, ServedModel] = field(default_factory=dict)
    reloading: bool = False
    reload_error: str = ""
    failed_version: int | None = None
    fingerprint: Fingerprint = ()
    waits_for: tuple[str, ...] = ()

    @property
    def serving(self) -> bool:
        """Whether requests can get one of its versions now."""
        return self.state == READY and bool(self.versions)


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex."""

    name: str
    version: str
    state: str
    reason: str


def fingerprint(repository: ModelRepository, name: str) -> Fingerprint:
    """What a model's files look like (ModelRepository.fingerprint): changes mean reload."""
    return repository.fingerprint(name)


class ModelRegistry:
    """Loads models from a repository, swaps new versions in atomically, finds what requests name.

    A reload loads and warms the new versions while the old ones serve, swaps them in
    one step on the event loop, then lets the old ones finish the requests they
    admitted before releasing them. A reload that fails leaves the old versions serving.

    Args:
        repository: Where models are read from.
        device: The server's --device (auto, cpu, cuda).
        default_max_batch_size: max_batch_size given to fully auto-completed models.
        on_change: Called after any state change (to update health statuses).
    """

    def __init__(
        self,
        repository: ModelRepository,
        device: str,
        default_max_batch_size: int,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.repository = repository
        self._device = device
        self._default_max_batch_size = default_max_batch_size
        self._entries: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        # One event per load in progress: set to make its build stop (see load()).
        self._building: set[threading.Event] = set()
        self._on_change = on_change

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def load_all(self, names: list[str] | None = None) -> None:
        """Loads the named models (default: every model in the repository); failures are recorded.

        Plain models load first, then ensembles after the models their steps name, so an
        ensemble finds its steps ready.
        """
        for name in self._ordered(names if names is not None else self.repository.model_names()):
            try:
                await self.load(name)
            except ServerError as exc:
                logger.error("model '%s' not loaded: %s", name, exc)

    def _ordered(self, names: list[str]) -> list[str]:
        """`names` with plain models first, then ensembles, each after the ensembles it uses."""
        steps: dict[str, set[str]] = {}
        plain = []
        for name in names:
            try:
                config = self.repository.read_config(name)
            except ServerError:
                config = None
            if config is not None and is_ensemble(config):
                steps[name] = {s.model_name for s in config.ensemble_scheduling.step}
            else:
                plain.append(name)
        ordered = list(plain)
        pending = [n for n in names if n in steps]
        while pending:
            ready = [n for n in pending if not (steps[n] & set(pending)) - {n}]
            # Whatever waits on itself (a cycle) goes last and is refused by the load.
            ready = ready or list(pending)
            ordered += ready
            pending = [n for n in pending if n not in ready]
        return ordered

    async def load(self, name: str, config_override: mc.ModelConfig | None = None) -> ModelEntry:
        """Loads or reloads one model; while a reload runs, the current versions keep serving.

        A load whose caller is cancelled (client gone, server stopping) is abandoned: the
        build stops at its next instance and what it built is released.

        Raises:
            InvalidInputError / ModelNotFoundError: bad name, or no such directory.
            ModelLoadError: the (re)load failed; the reason is also kept for RepositoryIndex.
        """
        self.repository.model_dir(name)  # refuses invalid or escaping names first
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            previous = self._entries.get(name)
            serving = previous if previous is not None and previous.serving else None
            if serving is not None:
                serving.reloading = True
            else:
                self._entries[name] = ModelEntry(name, LOADING)
            self._changed()
            stamp = fingerprint(self.repository, name)
            abandoned = threading.Event()
            self._building.add(abandoned)
            load_started = time.perf_counter()
            build = asyncio.ensure_future(asyncio.to_thread(self._build, name, config_override, abandoned))
            try:
                # Shielded: on cancellation the thread cannot be interrupted, so it is told to
                # stop (abandoned) and whatever it still returns is closed when it ends.
                models = await asyncio.shield(build)
                for model in models:
                    model.stats.load_seconds = time.perf_counter() - load_started  # nv_model_load_duration_secs
                try:
                    for model in models:
                        if isinstance(model, EnsembleModel):
                            # On the event loop with no await before the swap below: no other
                            # load can change the ensembles between this check and the swap.
                            check_steps(model, self._entries)
                except BaseException:
                    await asyncio.to_thread(_close_all, models)
                    raise
            except asyncio.CancelledError:
                abandoned.set()
                build.add_done_callback(_close_abandoned)
                if serving is not None:
                    serving.reloading = False
                elif previous is not None:
                    self._entries[name] = previous
                else:
                    del self._entries[name]
                logger.warning(
                    "load of model '%s' abandoned: the request was cancelled or the server is stopping", name
                )
                self._changed()
                raise
            except Exception as exc:
                internal = f"internal error while loading: {type(exc).__name__}"
                reason = str(exc) if isinstance(exc, ServerError) else internal
                if not isinstance(exc, ServerError):
                    logger.exception("model '%s' failed to load", name)
                else:
                    logger.error("model '%s' failed to load: %s", name, reason)
                failed_version = exc.version if isinstance(exc, VersionLoadError) else None
                if serving is not None:
                    serving.reloading = False
                    serving.reload_error = reason
                    serving.failed_version = failed_version
                    serving.fingerprint = stamp  # do not retry the same files on every poll
                else:
                    waits_for = exc.models if isinstance(exc, StepNotReadyError) else ()
                    self._entries[name] = ModelEntry(
                        name, UNAVAILABLE, reason=reason, failed_version=failed_version, fingerprint=stamp,
                        waits_for=waits_for,
                    )
                self._changed()
                if isinstance(exc, ServerError) and not isinstance(exc, ModelLoadError):
                    raise
                raise ModelLoadError(f"failed to load '{name}': {reason}") from exc
            finally:
                self._building.discard(abandoned)
            # The swap: one assignment on the event loop; requests that already hold an
            # old version finish on it.
            entry = ModelEntry(name, READY, versions={m.version: m for m in models}, fingerprint=stamp)
            self._entries[name] = entry
            if previous is not None:
                self._retire(list(previous.versions.values()))
            logger.info("model '%s' ready (version(s) %s)", name, ", ".join(str(v) for v in sorted(entry.versions)))
            self._changed()
            return entry

    def _build(
        self, name: str, config_override: mc.ModelConfig | None, abandoned: threading.Event
    ) -> list[ServedModel]:
        self.repository.check_links(name)
        config = config_override if config_override is not None else self.repository.read_config(name)
        if is_ensemble(config):
            return [build_ensemble(self.repository, name, config, self.get)]
        return list(load_model(
            self.repository, name, self._device, self._default_max_batch_size, config_override, abandoned,
        ))

    def _steps_ready(self, model: EnsembleModel, depth: int = 0) -> str:
        """Why an ensemble cannot serve now (a step's model is not ready), or "" when it can."""
        for step in model.steps:
            version = str(step.model_version) if step.model_version > 0 else ""
            try:
                served = self.get(step.model_name, version)
            except ServerError as exc:
                return f"step model {quoted(step.model_name)} is not ready: {exc}"
            if isinstance(served, EnsembleModel) and depth < MAX_ENSEMBLE_DEPTH:
                why = self._steps_ready(served, depth + 1)
                if why:
                    return why
        return ""

    def _retire(self, models: list[ServedModel]) -> None:
        if models:
            task = asyncio.get_running_loop().create_task(self._drain_and_close(models))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _drain_and_close(self, models: list[ServedModel]) -> None:
        for model in models:
            if isinstance(model, Model):
                waited = 0.0
                while model.busy and waited < DRAIN_TIMEOUT_S:
                    await asyncio.sleep(0.01)
                    waited += 0.01
            await model.stop()
            await asyncio.to_thread(model.close)
            logger.info("released model '%s' version %d", model.name, model.version)

    async def unload(self, name: str) -> None:
        """Stops serving a model: new requests are refused, admitted ones finish, then it is released.

        Raises:
            ModelNotFoundError: the model is not loaded.
        """
        if not VALID_MODEL_NAME.match(name or ""):
            raise InvalidInputError(f"invalid model name {quoted(name)}")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = self._entries.get(name)
            if entry is None or entry.state not in (READY, LOADING):
                raise ModelNotFoundError(f"model '{name}' is not loaded")
            self._entries[name] = ModelEntry(name, UNLOADING, reason="unloading")
            self._changed()
            self._retire(list(entry.versions.values()))
            self._entries[name] = ModelEntry(name, UNAVAILABLE, reason="unloaded", fingerprint=entry.fingerprint)
            self._changed()

    async def poll(self) -> None:
        """One pass of poll mode: load new models, reload changed ones, unload removed ones."""
        on_disk = set(self.repository.model_names())
        changed = []
        for name in sorted(on_disk):
            entry = self._entries.get(name)
            if entry is None or (entry.fingerprint != fingerprint(self.repository, name) and not entry.reloading):
                changed.append(name)
        for name in self._ordered(changed):
            try:
                await self.load(name)
            except ServerError as exc:
                logger.warning("poll: %s", exc)
        # Ensembles refused because a step's model was not ready yet: retry once it is.
        for name in sorted(on_disk):
            entry = self._entries.get(name)
            if entry is not None and entry.state == UNAVAILABLE and entry.waits_for and all(
                (step := self._entries.get(n)) is not None and step.state == READY for n in entry.waits_for
            ):
                try:
                    await self.load(name)
                except ServerError as exc:
                    logger.warning("poll: %s", exc)
        for name in sorted(set(self._entries) - on_disk):
            if self._entries[name].state == READY:
                await self.unload(name)

    def get(self, name: str, version: str = "") -> ServedModel:
        """The model version a request names; an empty version means the highest ready one.

        Raises:
            InvalidInputError: the name or version is malformed.
            ModelNotFoundError: no such model or version.
            ModelNotReadyError: the model exists but is not serving.
        """
        entry = self._entries.get(name)
        if entry is None:
            # Only valid names are ever registered, so a name found needs no check (this runs per request).
            if not VALID_MODEL_NAME.match(name or ""):
                if not name:
                    raise InvalidInputError("model name is empty")
                raise InvalidInputError(f"invalid model name {quoted(name)}")
            raise ModelNotFoundError(f"unknown model '{name}'")
        if entry.state != READY:
            reason = f": {entry.reason}" if entry.reason and entry.reason != entry.state.lower() else ""
            raise ModelNotReadyError(f"model '{name}' is not ready ({entry.state.lower()}){reason}")
        if not version:
            return entry.versions[max(entry.versions)]
        number = parse_version(version)
        if number is None:
            # As Triton: a version that is not a number is the client's mistake (INVALID_ARGUMENT);
            # a well-formed number that is not served is NOT_FOUND.
            raise InvalidInputError(
                f"model version must be a number (ASCII digits, at most {MAX_VERSION}), got {quoted(version)}"
            )
        model = entry.versions.get(number)
        if model is None:
            served = ", ".join(str(v) for v in sorted(entry.versions))
            raise ModelNotFoundError(f"model '{name}' has no version {version}; serving: {served}")
        return model

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether get(name, version) would succeed (and, for an ensemble, every step's model is ready)."""
        try:
            model = self.get(name, version)
        except ServerError:
            return False
        return not (isinstance(model, EnsembleModel) and self._steps_ready(model))

    def entries(self) -> list[ModelEntry]:
        """Every known model, sorted by name."""
        return [self._entries[n] for n in sorted(self._entries)]

    def models(self, name: str = "", version: str = "") -> list[ServedModel]:
        """Ready model versions, all of them or those of one name (and version)."""
        if name:
            if version:
                return [self.get(name, version)]
            self.get(name)
            return [self._entries[name].versions[v] for v in sorted(self._entries[name].versions)]
        return [m for e in self.entries() for _, m in sorted(e.versions.items())]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """RepositoryIndex rows: every model on disk or known, with state and reason."""
        names = set(self.repository.model_names()) | set(self._entries)
        rows = []
        for name in sorted(names):
            entry = self._entries.get(name)
            if entry is None:
                if not ready_only:
                    rows.append(IndexEntry(name, "", UNAVAILABLE, "not loaded"))
                continue
            if entry.state == READY:
                for version, model in sorted(entry.versions.items()):
                    why = self._steps_ready(model) if isinstance(model, EnsembleModel) else ""
                    if not why:
                        rows.append(IndexEntry(name, str(version), READY, ""))
                    elif not ready_only:
                        rows.append(IndexEntry(name, str(version), UNAVAILABLE, why))
                if not ready_only and entry.reloading:
                    rows.append(IndexEntry(name, "", LOADING, "a new version is loading; the current one serves"))
                elif not ready_only and entry.reload_error:
                    served = ", ".join(str(v) for v in sorted(entry.versions))
                    failed = entry.failed_version
                    # The failed version's own row, as Triton reports it; "" when that version
                    # number is also the one still serving (its READY row stays).
                    row_version = str(failed) if failed is not None and failed not in entry.versions else ""
                    rows.append(IndexEntry(
                        name, row_version, UNAVAILABLE,
                        f"reload failed, still serving version(s) {served}: {entry.reload_error}",
                    ))
            elif not ready_only:
                failed_row = str(entry.failed_version) if entry.failed_version is not None else ""
                rows.append(IndexEntry(name, failed_row, entry.state, entry.reason))
        if not ready_only:
            for name in self.repository.invalid_names():
                shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                rows.append(IndexEntry(
                    shown, "", UNAVAILABLE,
                    f"not loaded: invalid model name {quoted(shown)} (a name is 1-128 ASCII letters, digits, '_', '.'"
                    " or '-', not starting with '.' or '-')",
                ))
        return rows

    async def close(self) -> None:
        """Releases every model (after the requests they admitted)."""
        for abandoned in self._building:
            abandoned.set()
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            self._retire(list(entry.versions.values()))
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)


def _close_all(models: list[ServedModel]) -> None:
    for model in models:
        model.close()


def _close_abandoned(build: asyncio.Future[list[ServedModel]]) -> None:
    """Done-callback of an abandoned build: releases what it built anyway (off the event loop)."""
    if build.cancelled() or build.exception() is not None:
        return  # the build stopped early and closed what it had built itself
    models = build.result()
    logger.info("closing %d version(s) built by an abandoned load", len(models))
    asyncio.get_running_loop().run_in_executor(None, _close_all, models)


__all__ = ["ModelRegistry", "ModelEntry", "IndexEntry", "ServedModel"]
