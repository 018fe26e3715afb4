"""A tokenizer as a model: BYTES text in, INT64 token tensors out (Hugging Face `tokenizers`).

It lets an ensemble take text: `text -> tokenizer step -> encoder`. A batch is padded to its
longest row (the attention mask marks the padding, which the encoder's pooling ignores) and
each row is truncated to `max_length`, as sentence-transformers does, so over-long text is
cut rather than refused. Rows of one dynamic batch share one padded length, which is also
what lets their encoder steps batch together afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from server.core.errors import InvalidInputError, ModelLoadError, first_line
from server.runtime.base import GraphTensor, Runtime

TEXT_INPUT = "text"
# Every output the runtime can make; an ensemble maps the ones its encoder takes.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"
# Tokens per row, special tokens included (the OpenAI route's usage.prompt_tokens).
TOKEN_COUNT = "token_count"
PROVIDER = "tokenizers"
# Used when neither the config nor tokenizer.json bounds the length: BERT's position table.
DEFAULT_MAX_LENGTH = 512


class TokenizerRuntime(Runtime):
    """One tokenizer instance, read from a `tokenizer.json`.

    Args:
        path: The tokenizer.json file.
        max_length: Tokens per row at most (special tokens included); 0 takes the file's
            own truncation length, else DEFAULT_MAX_LENGTH.
        pad_to_multiple_of: Round the padded length up to a multiple of this (0: no rounding);
            batches of similar lengths then share a shape and batch together downstream.

    Raises:
        ModelLoadError: the file is not a tokenizer the library reads, or bad settings.
    """

    def __init__(self, path: Path, max_length: int = 0, pad_to_multiple_of: int = 0) -> None:
        try:
            text = path.read_text(encoding="utf-8")
            self._tokenizer = Tokenizer.from_str(text)
            saved = json.loads(text)
        except Exception as exc:  # OSError, JSON errors, and the library's own plain Exception
            reason = first_line(exc)
            raise ModelLoadError(f"{path.name} is not a tokenizer the tokenizers library reads: {reason}") from exc
        if max_length < 0 or pad_to_multiple_of < 0:
            raise ModelLoadError("max_length and pad_to_multiple_of must be >= 0")
        saved_truncation = saved.get("truncation") or {}
        saved_padding = saved.get("padding") or {}
        self.max_length = max_length or int(saved_truncation.get("max_length") or DEFAULT_MAX_LENGTH)
        # The file's own padding (often a fixed length) and truncation are replaced by ours.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._tokenizer.enable_truncation(self.max_length)
        self._tokenizer.enable_padding(
            pad_id=int(saved_padding.get("pad_id", 0)),
            pad_type_id=int(saved_padding.get("pad_type_id", 0)),
            pad_token=str(saved_padding.get("pad_token", "[PAD]")),
            pad_to_multiple_of=pad_to_multiple_of or None,
        )
        tokens = [GraphTensor(n, "INT64", "int64", (-1, -1)) for n in (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)]
        self.inputs = [GraphTensor(TEXT_INPUT, "BYTES", "string", (-1, 1))]
        self.outputs = [*tokens, GraphTensor(TOKEN_COUNT, "INT64", "int64", (-1, 1))]
        self.providers = (PROVIDER,)

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        texts = _texts(inputs[TEXT_INPUT])
        encodings = self._tokenizer.encode_batch(texts) if texts else []
        length = len(encodings[0].ids) if encodings else 0
        results = []
        for name in output_names:
            if name == TOKEN_COUNT:
                counts = [sum(e.attention_mask) for e in encodings]
                results.append(np.asarray(counts, dtype=np.int64).reshape(len(texts), 1))
                continue
            rows = [getattr(e, _ENCODING_FIELDS[name]) for e in encodings]
            results.append(np.asarray(rows, dtype=np.int64).reshape(len(texts), length))
        return results


_ENCODING_FIELDS = {INPUT_IDS: "ids", ATTENTION_MASK: "attention_mask", TOKEN_TYPE_IDS: "type_ids"}


def _texts(array: np.ndarray) -> list[str]:
    """The batch's texts ([batch, 1] BYTES). Requests are checked for UTF-8 before they are queued
    (repository/tokenizer_models.py), so that one bad request never fails the batch it would share."""
    texts = []
    for i, item in enumerate(array.reshape(-1)):
        try:
            texts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError:
            raise InvalidInputError(f"input '{TEXT_INPUT}' element {i} is not valid UTF-8 text") from None
    return texts
