"""A generation stream's own state and what it yields: token chunks, log-probabilities, delivery.

The model thread (generation.py) owns a Stream after admission and hands its chunks to the
stream's event loop with send(); these types are also what the front ends read.
"""

from __future__ import annotations

import asyncio
import codecs
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.core.sampling import SamplingParams, StopMatcher
from server.core.tokenizer import Detokenizer, Tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one chosen token under the model, and the most likely alternatives.

    Attributes:
        token_id: The chosen id.
        text: Its text on its own (a part of a character decodes to U+FFFD).
        logprob: Its natural log-probability (from the model's logits, before sampling settings).
        top: The `logprobs` most likely ids at that step as (id, text, log-probability), most likely first.
    """

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class TokenChunk:
    """What a stream yields: new text, and at the end a finish reason and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per id of token_ids, when the request asked


Delivery = TokenChunk | BaseException


@dataclass(eq=False)
class Stream:
    """One generation request while it is queued or in the batch.

    `cancelled` is written by the event loop and read by the model thread; everything
    else after admission belongs to the model thread.
    """

    prompt_ids: list[int]
    prompt_tokens: int  # as reported in usage (the byte-level tokenizer does not count its BOS)
    params: SamplingParams
    rng: random.Random
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delivery]
    stops: StopMatcher
    max_output: int  # tokens this stream may write: max_tokens, or less where the context ends first
    detokenizer: Detokenizer
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    output_ids: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)
    unsent_text: str = ""
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # set by the model thread when the stream gets a place in the batch


LOGPROB_FLOOR = -9999.0


def token_logprobs(
    tokenizer: Tokenizer, logits: np.ndarray, rows: list[int], tokens: list[int], counts: list[int]
) -> list[TokenLogprob]:
    """The chosen tokens' log-probabilities, and `counts[i]` alternatives each, for some rows of a step.

    Only rows that asked are computed (a log-softmax over the vocabulary costs about as much
    as sampling the row).
    """
    scores = logits[rows].astype(np.float64)
    peak = scores.max(axis=1, keepdims=True)
    logs = scores - peak - np.log(np.exp(scores - peak).sum(axis=1, keepdims=True))
    # Tokens the step ruled out (-inf) report OpenAI's floor, which JSON can carry.
    np.maximum(logs, LOGPROB_FLOOR, out=logs)
    out = []
    for i, (token, count) in enumerate(zip(tokens, counts, strict=True)):
        top: tuple[tuple[int, str, float], ...] = ()
        if count > 0:
            best = np.argpartition(-logs[i], min(count, logs.shape[1] - 1))[:count]
            best = best[np.argsort(-logs[i][best], kind="stable")]
            top = tuple((int(t), tokenizer.decode([int(t)]), float(logs[i, t])) for t in best)
        out.append(TokenLogprob(token, tokenizer.decode([token]), float(logs[i, token]), top))
    return out


def send(outbox: list[tuple[Stream, Delivery]]) -> None:
    """Hands one step's chunks to the streams' event loops, one wake-up per loop."""
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Delivery]]] = {}
    for stream, item in outbox:
        per_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, items in per_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, items)
        except RuntimeError:
            pass  # the loop has closed: nobody is reading these streams any more


def deliver(items: list[tuple[Stream, Delivery]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)
