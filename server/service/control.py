"""Model control across worker processes: loads and unloads that apply to every worker or to none.

With --workers, each worker holds its own copy of every model. A load or unload asked of
one worker runs under the supervisor's exclusive control lock, here and on every sibling
at once; the set of models all workers agree on is recorded in the supervisor's private
directory so that a restarted worker loads the same (server/workers.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from server import workers
from server.core.errors import ModelNotFoundError
from server.repository.registry import ModelRegistry
from server.schema import model_config_pb2 as mc
from server.service.metrics import Family
from server.service.statistics import VersionStatistics

logger = logging.getLogger(__name__)


class Peers(Protocol):
    """Calls to sibling workers (implemented by a front end's client; rpc/peers.py for gRPC).

    Each call acts on that sibling alone (it does not fan out again).
    """

    async def statistics(self, address: str, name: str, version: str) -> list[VersionStatistics] | None:
        """The sibling's own statistics; None when it did not answer (it is then left out)."""

    async def load(self, address: str, name: str, config: mc.ModelConfig | None) -> bool:
        """Loads a model on the sibling; False when the sibling is not serving (down or restarting).

        Raises:
            ServerError: the sibling refused the load (the error it answered with).
        """

    async def unload(self, address: str, name: str) -> bool:
        """Unloads a model on the sibling; False when the sibling is not serving.

        Raises:
            ServerError: the sibling refused (ModelNotFoundError when it did not have the model).
        """

    async def metrics(self, address: str) -> list[Family] | None:
        """The sibling's own metric families (service.metrics); None when it did not answer."""

    async def close(self) -> None:
        """Releases connections to the siblings."""


def encode_override(config: mc.ModelConfig | None) -> bytes | None:
    """A load's config override as recorded in the model set (None: the model's own config)."""
    return None if config is None else config.SerializeToString()


def decode_override(data: bytes | None) -> mc.ModelConfig | None:
    """The config override of a recorded load."""
    return None if data is None else mc.ModelConfig.FromString(data)


class ModelControl:
    """Runs loads and unloads on this worker and every sibling, one operation at a time.

    Args:
        registry: This worker's models.
        peers: How to reach the siblings.
        addresses: The siblings' private addresses.
        peer_dir: The supervisor's private directory (control lock, recorded model set).
        worker_index: This worker's index (for log lines).
    """

    def __init__(
        self, registry: ModelRegistry, peers: Peers, addresses: list[str], peer_dir: Path, worker_index: int | None
    ) -> None:
        self._registry = registry
        self._peers = peers
        self._addresses = list(addresses)
        self._peer_dir = peer_dir
        self._worker_index = worker_index
        # Operations run to the end even when their caller leaves (every worker or none).
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self, name: str, config: mc.ModelConfig | None) -> None:
        """Loads everywhere; a load that succeeds on some workers and fails on others is rolled back.

        Raises:
            ServerError: the first failing worker's error.
        """
        await self._locked(lambda: self._load_everywhere(name, config))

    async def unload(self, name: str) -> None:
        """Unloads everywhere: success if any worker had the model loaded, NOT_FOUND if none had."""
        await self._locked(lambda: self._unload_everywhere(name))

    async def _locked(self, operation: Callable[[], Awaitable[None]]) -> None:
        """Runs an operation under the workers' exclusive lock, to the end even if the caller leaves."""

        async def locked() -> None:
            fd = await workers.lock_control(self._peer_dir, exclusive=True)
            try:
                await operation()
            finally:
                workers.unlock_control(fd)

        task = asyncio.get_running_loop().create_task(locked())
        self._tasks.add(task)
        task.add_done_callback(_finish_control)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    def _recorded_models(self) -> dict[str, bytes | None]:
        """The model set all workers agree on: the last recorded one, else what each loaded at start."""
        models = workers.read_models(self._peer_dir)
        if models is None:
            # Nothing changed since start: every worker loaded the same start-up set.
            models = {e.name: None for e in self._registry.entries() if e.reason != "unloaded"}
        return models

    async def _everywhere(
        self, local: Callable[[], Awaitable[object]], remote: Callable[[str], Awaitable[bool]]
    ) -> list[BaseException | bool]:
        """Runs an operation here and on every sibling at once; per worker, True, False (down) or the error."""

        async def here() -> bool:
            await local()
            return True

        calls = [here(), *(remote(address) for address in self._addresses)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    async def _load_everywhere(self, name: str, config: mc.ModelConfig | None) -> None:
        models = self._recorded_models()
        was_ready = self._registry.is_ready(name)
        results = await self._everywhere(
            lambda: self._registry.load(name, config), lambda a: self._peers.load(a, name, config)
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            models[name] = encode_override(config)
            workers.write_models(self._peer_dir, models)
            return
        if any(r is True for r in results):
            # A model that served before, as the model set records it, is loaded again as it was.
            reload = was_ready and name in models
            previous = decode_override(models[name]) if reload else None
            await self._roll_back_load(name, results, reload, previous)
        elif not was_ready:
            # Failed everywhere: a restarted worker tries the same and reports the same reason.
            models[name] = encode_override(config)
            workers.write_models(self._peer_dir, models)
        raise errors[0]

    async def _roll_back_load(
        self, name: str, results: list[BaseException | bool], reload: bool, previous: mc.ModelConfig | None
    ) -> None:
        """Brings the workers where a load succeeded back to the state of the others.

        Args:
            reload: The model served before: load it again with `previous` (its config
                override, None for its own config). Otherwise unload it again.
        """
        logger.error("load of '%s' failed on some workers; rolling it back on the others", name)
        for address, result in zip([None, *self._addresses], results, strict=True):
            if result is not True:
                continue
            try:
                if address is None:
                    await (self._registry.load(name, previous) if reload else self._registry.unload(name))
                elif reload:
                    await self._peers.load(address, name, previous)
                else:
                    await self._peers.unload(address, name)
            except Exception:
                logger.exception("rolling back '%s' on worker %s failed", name, address or self._worker_index)

    async def _unload_everywhere(self, name: str) -> None:
        models = self._recorded_models()
        results = await self._everywhere(lambda: self._registry.unload(name), lambda a: self._peers.unload(a, name))
        models.pop(name, None)
        workers.write_models(self._peer_dir, models)
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, ModelNotFoundError)]
        if errors:
            raise errors[0]
        if not any(r is True for r in results):
            raise next(r for r in results if isinstance(r, ModelNotFoundError))


def _finish_control(task: asyncio.Task[None]) -> None:
    """Retrieves the outcome of a control task whose caller left, so it is not reported as unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("model-control operation ended with: %s", task.exception())
