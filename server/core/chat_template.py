"""Chat prompts: a model's own chat template (Jinja, sandboxed) or a plain default.

Where a template comes from, first found wins, in the model's directory (beside config.pbtxt):
  1. `chat_template.jinja`;
  2. `tokenizer_config.json`'s `chat_template` (a string, or Hugging Face's list of
     {"name", "template"} entries, of which "default" or else the first is used), with its
     `bos_token`/`eos_token` passed to the template.
Both must resolve inside the model directory (no symlink out of it) and stay under the size
bounds below. The template sees `messages` (a list of {"role", "content"}), `add_generation_prompt`
(true), `bos_token`, `eos_token` and `raise_exception(message)`, as Hugging Face templates expect.

Without a template, the default prompt is one "role: content" line per message, then
"assistant:" (for example "system: Be brief.\\nuser: Hi\\nassistant:").

Templates are rendered in jinja2's ImmutableSandboxedEnvironment: a template cannot reach
Python internals or change the messages it is given.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.core.errors import InvalidInputError, ModelLoadError, quoted
from server.core.model_files import read_inside

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Bounds on what is read from the model directory: real chat templates are a few KiB, and
# tokenizer configs with their added-token tables a few hundred KiB.
MAX_TEMPLATE_BYTES = 256 * 1024
MAX_TOKENIZER_CONFIG_BYTES = 8 * 1024 * 1024

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat: a role among ROLES and its text."""

    role: str
    content: str


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """Refuses an empty chat or a message with an unknown role.

    Raises:
        InvalidInputError: naming the first offending message.
    """
    if not messages:
        raise InvalidInputError("messages must hold at least one message")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidInputError(
                f"messages[{i}].role is {quoted(message.role)}; expected one of {', '.join(ROLES)}"
            )


def default_prompt(messages: Sequence[ChatMessage]) -> str:
    """The prompt for a model without a template: "role: content" lines, then "assistant:"."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def _raise_exception(message: str) -> NoReturn:
    raise InvalidInputError(f"the chat template refused the messages: {quoted(message, 200)}")


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    source: str
    render_fn: Callable[..., str]
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for `messages`, ending with the assistant's turn.

        Raises:
            InvalidInputError: the template refused the messages (raise_exception) or failed on them.
        """
        try:
            return self.render_fn(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except InvalidInputError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise InvalidInputError(f"the chat template ({self.source}) failed on these messages: {exc}") from exc


def compile_template(text: str, source: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """Compiles `text` in the sandboxed environment.

    Raises:
        ModelLoadError: the template does not parse.
    """
    # trim_blocks/lstrip_blocks: Hugging Face renders with these, and templates are written for them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    try:
        template = env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"the chat template ({source}) does not parse: {exc}") from exc
    return ChatTemplate(source, template.render, bos_token, eos_token)


def _token_text(value: Any) -> str:
    """A special token as tokenizer configs write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The model directory's chat template (see the module docstring), or None when it has none.

    Raises:
        ModelLoadError: a template file or tokenizer config that is malformed, too large or outside the directory.
    """
    text = read_inside(model_dir, TEMPLATE_FILE, MAX_TEMPLATE_BYTES)
    bos = eos = ""
    source = TEMPLATE_FILE
    raw_config = read_inside(model_dir, TOKENIZER_CONFIG_FILE, MAX_TOKENIZER_CONFIG_BYTES)
    if raw_config is not None:
        try:
            config = json.loads(raw_config)
        except ValueError as exc:
            raise ModelLoadError(f"{TOKENIZER_CONFIG_FILE} is not valid JSON: {exc}") from exc
        if isinstance(config, dict):
            bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
            if text is None:
                text, source = _template_from_config(config.get("chat_template")), TOKENIZER_CONFIG_FILE
    if text is None:
        return None
    if len(text) > MAX_TEMPLATE_BYTES:
        raise ModelLoadError(f"the chat template in {source} is {len(text)} characters; at most {MAX_TEMPLATE_BYTES}")
    return compile_template(text, source, bos, eos)


def _template_from_config(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        if isinstance(chosen, str):
            return chosen
    raise ModelLoadError(f"{TOKENIZER_CONFIG_FILE}'s chat_template must be a string or a list of named templates")
