"""OpenAI's two shapes of token log-probabilities, from the generation stream's TokenLogprob entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.core.generation_stream import TokenLogprob


def completion(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """/v1/completions' `logprobs`: parallel lists, with each token's character offset in the text.

    Args:
        offset: Characters of the choice's text before these tokens' (an echoed prompt, earlier chunks).
    """
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text: logprob for _, text, logprob in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """/v1/chat/completions' `logprobs`: one object per token, with its UTF-8 bytes and alternatives."""
    return {
        "content": [
            {
                "token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode("utf-8")),
                "top_logprobs": [
                    {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
                    for _, text, logprob in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }
