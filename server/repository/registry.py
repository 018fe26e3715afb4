"""The loaded models, their states and the reasons they are not ready."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from server.core.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerError,
)
from server.core.model import Model
from server.repository.loader import load_model
from server.repository.repository import ModelRepository, _VALID_NAME

logger = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"


@dataclass
class ModelEntry:
    """A model the server knows of: its served versions, or why it has none."""

    name: str
    state: str
    reason: str = ""
    versions: dict[int, Model] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexEntry:
    """One row of RepositoryIndex."""

    name: str
    version: str
    state: str
    reason: str


class ModelRegistry:
    """Loads models from a repository and finds the version a request asks for.

    Args:
        repository: Where models are read from.
        device: The server's --device (auto, cpu, cuda).
        default_max_batch_size: max_batch_size given to fully auto-completed models
            whose graph batches.
    """

    def __init__(self, repository: ModelRepository, device: str, default_max_batch_size: int) -> None:
        self.repository = repository
        self._device = device
        self._default_max_batch_size = default_max_batch_size
        self._entries: dict[str, ModelEntry] = {}
        # Loads run on worker threads; lookups on the event loop read a consistent dict.
        self._lock = threading.Lock()

    def load_all(self) -> None:
        """Loads every model in the repository; a failure is recorded and the rest still load."""
        for name in self.repository.model_names():
            self.load(name)

    def load(self, name: str) -> ModelEntry:
        """(Re)loads one model; its state says whether it worked and why not."""
        self.repository.model_dir(name)  # refuses invalid or escaping names first
        with self._lock:
            previous = self._entries.get(name)
            self._entries[name] = ModelEntry(name, LOADING, versions=previous.versions if previous else {})
        try:
            models = load_model(self.repository, name, self._device, self._default_max_batch_size)
        except ServerError as exc:
            entry = ModelEntry(name, UNAVAILABLE, reason=str(exc))
            logger.error("model '%s' failed to load: %s", name, exc)
        except Exception as exc:  # a loader bug must not stop the other models
            logger.exception("model '%s' failed to load", name)
            entry = ModelEntry(name, UNAVAILABLE, reason=f"internal error while loading: {type(exc).__name__}")
        else:
            entry = ModelEntry(name, READY, versions={m.version: m for m in models})
        with self._lock:
            self._entries[name] = entry
        if previous:
            for model in previous.versions.values():
                if entry.versions.get(model.version) is not model:
                    model.close()
        return entry

    def unload(self, name: str) -> None:
        """Stops serving a model and releases it."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFoundError(f"model '{name}' is not loaded")
            self._entries[name] = ModelEntry(name, UNAVAILABLE, reason="unloaded")
        for model in entry.versions.values():
            model.close()

    def get(self, name: str, version: str = "") -> Model:
        """The model version a request names; an empty version means the highest ready one.

        Raises:
            InvalidInputError: the name or version is malformed.
            ModelNotFoundError: no such model or version.
            ModelNotReadyError: the model exists but is not serving.
        """
        if not _VALID_NAME.match(name or ""):
            raise InvalidInputError(f"invalid model name {name!r}") if name else InvalidInputError("model name is empty")
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model '{name}'")
        if entry.state != READY:
            reason = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReadyError(f"model '{name}' is not ready ({entry.state.lower()}){reason}")
        if not version:
            return entry.versions[max(entry.versions)]
        if not version.isdigit():
            raise InvalidInputError(f"model version must be a number, got {version!r}")
        model = entry.versions.get(int(version))
        if model is None:
            served = ", ".join(str(v) for v in sorted(entry.versions))
            raise ModelNotFoundError(f"model '{name}' has no version {version}; serving: {served}")
        return model

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether get(name, version) would succeed."""
        try:
            self.get(name, version)
        except ServerError:
            return False
        return True

    def entries(self) -> list[ModelEntry]:
        """Every known model, sorted by name."""
        return [self._entries[n] for n in sorted(self._entries)]

    def models(self, name: str = "", version: str = "") -> list[Model]:
        """Ready model versions, all of them or those of one name (and version)."""
        if name:
            if version:
                return [self.get(name, version)]
            self.get(name)
            return [self._entries[name].versions[v] for v in sorted(self._entries[name].versions)]
        return [m for e in self.entries() for _, m in sorted(e.versions.items())]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """RepositoryIndex rows: every model on disk or loaded, with state and reason."""
        names = set(self.repository.model_names()) | set(self._entries)
        rows = []
        for name in sorted(names):
            entry = self._entries.get(name)
            if entry is None:
                if not ready_only:
                    rows.append(IndexEntry(name, "", UNAVAILABLE, "not loaded"))
                continue
            if entry.state == READY:
                rows.extend(IndexEntry(name, str(v), READY, "") for v in sorted(entry.versions))
            elif not ready_only:
                rows.append(IndexEntry(name, "", entry.state, entry.reason))
        return rows

    def close(self) -> None:
        """Releases every model."""
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            for model in entry.versions.values():
                model.close()


__all__ = ["ModelRegistry", "ModelEntry", "IndexEntry", "ModelLoadError"]
