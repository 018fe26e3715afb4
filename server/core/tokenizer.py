"""Tokenizers of text-generation models: text to ids, and ids back to text as a stream grows.

Two implementations share one interface:
  * ByteTokenizer: the bundled decoder's, one id per UTF-8 byte plus BOS and EOS.
  * HfTokenizer: a Hugging Face `tokenizer.json` run by the `tokenizers` library, with the
    special tokens of `tokenizer_config.json` and the EOS ids of `generation_config.json`.

Streams are detokenized incrementally (Detokenizer): each new token yields the UTF-8 bytes
of the text it completes, never part of a character, and the bytes of a whole stream decode
to exactly what decoding all its ids at once gives. The scheduler feeds those bytes through
the stop-string matcher, so stop strings match across token boundaries whatever the tokenizer.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from server.core.errors import InvalidInputError, ModelLoadError
from server.core.model_files import read_inside
from server.core.sampling import MODEL_DEFAULTED

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# A real tokenizer.json is a few MiB (large vocabularies reach ~20 MiB); the configs are small.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 8 * 1024 * 1024
# The Unicode replacement character, as decoding writes it for an incomplete UTF-8 sequence.
_REPLACEMENT = "\ufffd"


class Detokenizer(ABC):
    """Turns one stream's token ids into text, a token at a time."""

    @abstractmethod
    def add(self, token: int) -> bytes:
        """Takes the next id; returns the UTF-8 bytes it makes final (maybe none)."""

    @abstractmethod
    def flush(self) -> bytes:
        """The bytes still held back at the end of the stream (an unfinished character's replacement)."""


class Tokenizer(ABC):
    """A model's tokenizer, as the generation scheduler uses it.

    Attributes:
        bos_id: The id put before a prompt that does not start with it, or None.
        eos_ids: Ids that end a stream (unless ignore_eos).
        vocab_size: Ids below this have text; the scheduler never chooses others.
        counts_bos_apart: Usage counts leave out the BOS that encode() puts first (the
            byte-level tokenizer reports a prompt's bytes; others count every id).
        generation_defaults: Sampling settings of the model's generation_config.json (raw),
            for requests that leave them out.
    """

    bos_id: int | None
    eos_ids: frozenset[int]
    vocab_size: int
    counts_bos_apart: bool = False
    generation_defaults: Mapping[str, Any] = MappingProxyType({})

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of a prompt, with the special tokens the model expects (BOS)."""

    def encode_bytes(self, prompt: bytes) -> list[int]:
        """The ids of a prompt given as UTF-8 bytes (the KServe text input).

        Raises:
            InvalidInputError: the bytes are not UTF-8 (a byte-level tokenizer takes any bytes).
        """
        try:
            text = prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"the prompt is not valid UTF-8 (byte {exc.start})") from exc
        return self.encode(text)

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` as a whole (special tokens skipped)."""

    @abstractmethod
    def detokenizer(self) -> Detokenizer:
        """A fresh incremental decoder for one stream."""


class _ByteDetokenizer(Detokenizer):
    def add(self, token: int) -> bytes:
        return _BYTE_TEXT[token] if token < 256 else b""

    def flush(self) -> bytes:
        return b""


_BYTE_TEXT = tuple(bytes([i]) for i in range(256))


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte (0-255), then BOS and EOS: the bundled byte-level decoder's tokenizer.

    Its detokenizer hands out raw bytes; the scheduler's UTF-8 decoder joins split characters.
    """

    counts_bos_apart = True

    def __init__(self, bos_id: int, eos_id: int, vocab_size: int) -> None:
        self.bos_id = bos_id
        self.eos_ids = frozenset([eos_id])
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, prompt: bytes) -> list[int]:
        return [self.bos_id, *prompt] if self.bos_id is not None else list(prompt)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def detokenizer(self) -> Detokenizer:
        return _ByteDetokenizer()


class _WindowDetokenizer(Detokenizer):
    """Incremental decoding by re-decoding a short window of recent ids.

    Decoding ids one by one is wrong for most tokenizers (a byte-level BPE token may hold
    half a character; SentencePiece-style decoders drop the space before a first word), so
    each step decodes the ids from `_start` twice: up to the last emitted token, and up to
    the new one. The difference is the new text, emitted once it does not end in an
    unfinished character. Both decodes start at the same id, so whatever the decoder does at
    a window's start cancels out; the window then moves up, keeping each step's cost small.
    """

    def __init__(self, tokenizer: HfTokenizer) -> None:
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._start = 0  # first id of the window
        self._read = 0  # ids before this have had their text emitted

    def add(self, token: int) -> bytes:
        self._ids.append(token)
        window = self._ids[self._start :]
        before = self._decode(self._ids[self._start : self._read])
        text = self._decode(window)
        if len(text) <= len(before) or text.endswith(_REPLACEMENT):
            return b""  # nothing yet, or a character still incomplete
        self._start, self._read = self._read, len(self._ids)
        return text[len(before) :].encode("utf-8", "surrogatepass")

    def flush(self) -> bytes:
        before = self._decode(self._ids[self._start : self._read])
        text = self._decode(self._ids[self._start :])
        self._start = self._read = len(self._ids)
        return text[len(before) :].encode("utf-8", "surrogatepass") if len(text) > len(before) else b""


class HfTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory: tokenizer.json plus its optional configs.

    Args:
        model_dir: The directory holding tokenizer.json (and tokenizer_config.json,
            generation_config.json, config.json when the model has them).
        fallback_eos: EOS ids to use when none of the files name one (from generation.json).
    """

    def __init__(self, model_dir: Path, fallback_eos: Sequence[int] = ()) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        raw = read_inside(model_dir, TOKENIZER_FILE, MAX_TOKENIZER_BYTES)
        if raw is None:
            raise ModelLoadError(f"{TOKENIZER_FILE} is missing from the model directory")
        try:
            self._tokenizer = RustTokenizer.from_str(raw)
        except Exception as exc:  # the library raises its own exception type for any malformed file
            raise ModelLoadError(f"{TOKENIZER_FILE} cannot be loaded: {exc}") from exc
        config = _read_json(model_dir, TOKENIZER_CONFIG_FILE)
        generation = _read_json(model_dir, GENERATION_CONFIG_FILE)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        bos = self._special_id(config.get("bos_token")) if "bos_token" in config else None
        if bos is None:
            bos = _int_or_none(generation.get("bos_token_id"))
        # Whether encode adds BOS itself: tokenizer.json's post-processor may already do it.
        self._add_bos = bool(config.get("add_bos_token", False)) and bos is not None
        self.bos_id = bos
        eos = _id_list(generation.get("eos_token_id"))
        if not eos and "eos_token" in config:
            found = self._special_id(config.get("eos_token"))
            eos = [found] if found is not None else []
        eos = eos or [int(i) for i in fallback_eos]
        if not eos:
            raise ModelLoadError(
                f"no end-of-sequence token: set eos_token_id in {GENERATION_CONFIG_FILE} or eos_token in "
                f"{TOKENIZER_CONFIG_FILE}"
            )
        bad = [i for i in eos if not 0 <= i < self.vocab_size]
        if bad:
            raise ModelLoadError(f"end-of-sequence id(s) {bad} are outside the vocabulary of {self.vocab_size}")
        self.eos_ids = frozenset(eos)
        self.generation_defaults = {k: generation[k] for k in MODEL_DEFAULTED if k in generation}

    def _special_id(self, value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        if not isinstance(value, str) or not value:
            return None
        found = self._tokenizer.token_to_id(value)
        return int(found) if found is not None else None

    def encode(self, text: str) -> list[int]:
        ids = list(self._tokenizer.encode(text, add_special_tokens=True).ids)
        if self._add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)  # type: ignore[arg-type]
        if not ids:
            if self.bos_id is None:
                raise InvalidInputError("the prompt is empty and the model has no beginning-of-sequence token")
            ids = [self.bos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def detokenizer(self) -> Detokenizer:
        return _WindowDetokenizer(self)


def load_tokenizer(model_dir: Path, info: dict[str, Any]) -> Tokenizer:
    """The tokenizer that a model's generation.json names.

    `"tokenizer": "bytes"` (the default) is the byte-level one, with generation.json's
    bos_token_id, eos_token_id and vocab_size; `"tokenizer": "tokenizer.json"` (or "hf") reads
    the Hugging Face files in the model directory.

    Raises:
        ModelLoadError: an unknown tokenizer kind, missing or malformed files.
    """
    kind = info.get("tokenizer", "bytes")
    if kind == "bytes":
        try:
            return ByteTokenizer(int(info["bos_token_id"]), int(info["eos_token_id"]), int(info.get("vocab_size", 258)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"a byte-level tokenizer needs integer bos_token_id and eos_token_id: {exc}") from exc
    if kind in (TOKENIZER_FILE, "hf"):
        return HfTokenizer(model_dir, _id_list(info.get("eos_token_id")))
    raise ModelLoadError(f"unknown tokenizer {str(kind)[:100]!r}; expected \"bytes\" or \"{TOKENIZER_FILE}\"")


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, list):
        return [v for v in value if _int_or_none(v) is not None]
    one = _int_or_none(value)
    return [] if one is None else [one]


def _read_json(model_dir: Path, name: str) -> dict[str, Any]:
    raw = read_inside(model_dir, name, MAX_CONFIG_BYTES)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ModelLoadError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{name} must hold a JSON object")
    return value
