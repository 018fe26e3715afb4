"""Text-generation pieces the OpenAI-style routes need, known to no transport: chat prompts, model list, admission."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from server.core.chat_template import (
    TEMPLATE_FILE,
    TOKENIZER_CONFIG_FILE,
    ChatMessage,
    ChatTemplate,
    check_messages,
    default_prompt,
    load_chat_template,
)
from server.core.errors import InvalidInputError, quoted
from server.core.generation import TokenChunk
from server.core.model import Model
from server.core.sampling import MAX_TOKENS_LIMIT, SamplingParams
from server.service.dataplane import DataPlane

_Signature = tuple[tuple[int, int] | None, ...]


class ChatPrompts:
    """Builds chat prompts from each model directory's template, re-read only when its files change.

    A template is looked up per request by the files' (mtime, size), so a template added or
    edited beside a loaded model is used without a reload, and an unchanged one costs two stats.
    """

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[_Signature, ChatTemplate | None]] = {}

    def template(self, model_dir: Path) -> ChatTemplate | None:
        """The directory's template, or None for the default prompt.

        Raises:
            ModelLoadError: a malformed template file or tokenizer config.
        """
        signature = tuple(_stat(model_dir / name) for name in (TEMPLATE_FILE, TOKENIZER_CONFIG_FILE))
        cached = self._cache.get(model_dir)
        if cached is not None and cached[0] == signature:
            return cached[1]
        template = load_chat_template(model_dir)
        self._cache[model_dir] = (signature, template)
        return template

    def prompt(self, dataplane: DataPlane, name: str, messages: Sequence[ChatMessage]) -> str:
        """The prompt for a chat with model `name` (its template, else the plain default).

        Raises:
            InvalidInputError: empty messages, an unknown role, or messages the template refuses.
            ModelNotFoundError, ModelNotReadyError: as ModelRegistry.get.
        """
        check_messages(messages)
        dataplane.registry.get(name, "")  # unknown or unready models are refused before any file is read
        template = self.template(dataplane.registry.repository.model_dir(name))
        return default_prompt(messages) if template is None else template.render(messages)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def generation_models(dataplane: DataPlane) -> list[str]:
    """Names of the ready text-generation models, sorted."""
    names = set()
    for entry in dataplane.repository_index(ready_only=True):
        if dataplane.registry.is_ready(entry.name):
            model = dataplane.registry.get(entry.name)
            if isinstance(model, Model) and model.generator is not None:
                names.add(entry.name)
    return sorted(names)


def generate(
    dataplane: DataPlane, name: str, prompt: str, params: SamplingParams, deadline_s: float | None = None
) -> AsyncIterator[TokenChunk]:
    """Token chunks of a new generation request, refused while the server drains.

    Raises:
        ServerUnavailableError: the server is draining.
        InvalidInputError: no model name, or the model is not a text-generation model.
    """
    dataplane.check_accepting()
    if not name:
        raise InvalidInputError("model is required")
    if len(name) > 128:
        raise InvalidInputError(f"model name {quoted(name)} is too long")
    return dataplane.generate(name, "", prompt, params, deadline_s)


def context_length(dataplane: DataPlane, name: str) -> int:
    """The most tokens a request to model `name` may ask for: its context (within the sampling bound).

    Raises:
        InvalidInputError: the model is not a text-generation model.
        ModelNotFoundError, ModelNotReadyError: as ModelRegistry.get.
    """
    model = dataplane.registry.get(name, "")
    if not isinstance(model, Model) or model.generator is None:
        raise InvalidInputError(f"model {quoted(name)} is not a text-generation model")
    return min(model.generator.context_length, MAX_TOKENS_LIMIT)
