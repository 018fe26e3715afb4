"""Continuous batching for exported decoders: streams join and leave the batch between decode steps.

The model is any ONNX decoder exported with `input_ids`, `attention_mask`, `position_ids`
and per-layer `past_key_values.{i}.key|value` inputs (outputs `logits`, `present.*`),
described by a generation.json. One model thread owns the batch state (caches padded on
the left to a common length, an attention mask, next positions) and runs step after step
without waiting for the event loop: it prefills and merges new streams between steps,
drops finished and cancelled ones, samples every row in one vectorised pass, and hands
each step's text to the event loop in one call. The event loop only queues streams and
writes responses, so gRPC work overlaps the next decode step instead of delaying it.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import json
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from server.core.batcher import run_instance
from server.core.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    QueueFullError,
    ServerError,
    quoted,
)
from server.core.sampling import MAX_STOP_STRINGS, SamplingColumns, SamplingParams, StopMatcher, draw
from server.core.statistics import GenerationStats
from server.core.types import InferRequest, ParamValue
from server.runtime.base import Runtime

logger = logging.getLogger(__name__)


@dataclass
class TokenChunk:
    """What a stream yields: new text, and at the end a finish reason and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


Delivery = Union[TokenChunk, BaseException]


@dataclass(eq=False)
class Stream:
    """One generation request while it is queued or in the batch.

    `cancelled` is written by the event loop and read by the model thread; everything
    else after admission belongs to the model thread.
    """

    prompt_ids: list[int]
    params: SamplingParams
    rng: random.Random
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delivery]
    stops: StopMatcher
    max_output: int  # tokens this stream may write: max_tokens, or less where the context ends first
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    output_ids: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)
    unsent_text: str = ""
    done: bool = False
    cancelled: bool = False
    steps_after_cancel: int = 0
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # set by the model thread when the stream gets a place in the batch


class GenerationScheduler:
    """Runs every active stream of one decoder model in one batch, step after step.

    Args:
        runtime: The exported decoder.
        info: Its generation.json (eos_token_id, bos_token_id, context_length, num_layers, ...).
        max_num_seqs: Most streams in the batch at once.
        max_queued: Most streams waiting for a place; more are refused (RESOURCE_EXHAUSTED).
        max_batch_tokens: Token budget of the batch: a stream is admitted only while the
            prompts plus the requested output tokens of every active stream fit in it
            (bounds cache memory); 0 means max_num_seqs * context_length.
        stream_interval: Tokens per streamed message. 0 adapts to load: one token per
            message up to 15 active streams, then one more per 16 streams (each message
            costs the server a gRPC write; clients see the same text, in fewer pieces).
            A stream's first token is always sent at once, alone.
    """

    def __init__(
        self,
        runtime: Runtime,
        info: dict[str, Any],
        max_num_seqs: int = 32,
        max_queued: int = 256,
        max_batch_tokens: int = 0,
        stream_interval: int = 0,
    ) -> None:
        self.runtime = runtime
        self.eos = int(info["eos_token_id"])
        self.bos = int(info["bos_token_id"])
        self.context_length = int(info["context_length"])
        self.layers = int(info["num_layers"])
        self.heads = int(info["num_heads"])
        self.head_dim = int(info["head_dim"])
        self.max_num_seqs = max_num_seqs
        self.max_queued = max_queued
        self.max_batch_tokens = max_batch_tokens or max_num_seqs * self.context_length
        self.stream_interval = stream_interval
        self.output_names = ["logits"] + [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        # Shared between the event loop and the model thread, under _wakeup's lock.
        self._wakeup = threading.Condition()
        self._waiting: collections.deque[Stream] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # generate() calls between admission and their end (queued or in the batch)
        # The model thread's own batch state.
        self._active: list[Stream] = []
        self._caches: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)
        self._positions = np.zeros(0, np.int64)
        self._columns: SamplingColumns | None = None  # of _active; rebuilt when rows come or go
        self.steps = 0
        self.stats = GenerationStats()

    @property
    def active(self) -> int:
        """Streams in the batch now."""
        return len(self._active)

    def load(self) -> tuple[int, int, float]:
        """Streams in the batch, streams waiting for a place, and the share of the token budget
        (the cache) the batch holds, for the metrics gauges.

        Read on the event loop while the model thread changes the batch: a copy of the list is
        taken first (one operation under the GIL), so the values are a consistent moment's.
        """
        active = list(self._active)
        reserved = sum(self._reserved(s) for s in active)
        return len(active), len(self._waiting), reserved / self.max_batch_tokens if self.max_batch_tokens else 0.0

    @property
    def busy(self) -> bool:
        """Whether any admitted stream has not ended yet (waiting, prefilling or decoding).

        A retiring model version waits on this before close(), so streams it admitted end on
        it normally instead of being cut off.
        """
        with self._wakeup:
            return self._in_flight > 0

    async def generate(self, prompt: bytes, params: SamplingParams, deadline_s: float | None = None) -> AsyncIterator[TokenChunk]:
        """Streams the completion of `prompt` chunk by chunk; the last chunk has a finish reason.

        Raises:
            InvalidInputError: bad parameters, or a prompt that does not fit the context.
            QueueFullError: too many streams are waiting.
            DeadlineExceededError: the deadline passed before the stream ended.
            ModelNotReadyError: the model was unloaded.
        """
        params.check()
        if params.max_tokens > self.context_length:
            raise InvalidInputError(
                f"max_tokens is {params.max_tokens}; the model's context is {self.context_length} tokens"
            )
        prompt_ids = [self.bos, *prompt]
        if len(prompt_ids) >= self.context_length:
            raise InvalidInputError(
                f"prompt is {len(prompt_ids)} tokens; the model's context is {self.context_length}"
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        stream = Stream(
            prompt_ids=prompt_ids,
            params=params,
            rng=random.Random(seed),
            deadline=None if deadline_s is None else time.monotonic() + deadline_s,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            stops=StopMatcher(params.stop),
            max_output=min(params.max_tokens, self.context_length - len(prompt_ids)),
        )
        with self._wakeup:
            if self._closing:
                raise ModelNotReadyError("the model is being unloaded")
            if len(self._waiting) >= self.max_queued:
                raise QueueFullError("too many generation requests are waiting; retry later")
            self._waiting.append(stream)
            self._in_flight += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="generation", daemon=True)
                self._thread.start()
            self._wakeup.notify()
        # The model thread also ends overdue streams between steps; this timer ends the wait
        # even while the thread is busy elsewhere (a long prefill, a stuck step).
        timer = None
        if deadline_s is not None:
            expired = DeadlineExceededError("the request's deadline passed during generation")
            timer = stream.loop.call_later(max(deadline_s, 0.0), stream.queue.put_nowait, expired)
        stats = self.stats
        last_chunk: float | None = None
        tokens_counted = 0
        ended = "abort"  # unless the stream finishes; an error leaves `ended` None
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    if not isinstance(item, DeadlineExceededError):
                        ended = ""
                    raise item
                now = time.perf_counter()
                if last_chunk is None:
                    queued = (stream.admitted if stream.admitted is not None else now) - stream.arrived
                    stats.first_chunk(queued, now - stream.arrived, len(stream.prompt_ids) - 1)
                count = len(item.token_ids)
                if item.finish_reason is not None:
                    count = item.completion_tokens - tokens_counted  # the end-of-text token is not output
                    ended = item.finish_reason
                stats.tokens(count, None if last_chunk is None else now - last_chunk)
                tokens_counted += count
                last_chunk = now
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if ended:
                stats.end(ended, time.perf_counter() - stream.arrived)
            if timer is not None:
                timer.cancel()
            # Client gone or deadline: the model thread drops the stream before its next step.
            if not stream.done:
                stream.cancelled = True
            with self._wakeup:
                self._in_flight -= 1
                if not stream.done and stream in self._waiting:
                    self._waiting.remove(stream)

    def close(self) -> None:
        """Ends the model thread after its current step; streams still there get UNAVAILABLE."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # --- the model thread -------------------------------------------------------------

    def _serve(self) -> None:
        leftovers: list[Stream] = []
        while True:
            outbox: list[tuple[Stream, Delivery]] = []
            admitted: list[Stream] = []
            try:
                self._drop_finished()  # first: finished rows must not hold places or keep the thread awake
                with self._wakeup:
                    while not (self._closing or self._waiting or self._active):
                        self._wakeup.wait()
                    if self._closing:
                        leftovers = [*self._waiting, *self._active]
                        self._waiting.clear()
                        break
                    admitted = self._admissible()
                if admitted:
                    self._prefill(admitted, outbox)  # rows done at their first token leave in _decode_step
                if self._active:
                    self._decode_step(outbox)
            except Exception as exc:  # a failed step fails every stream in it; the thread goes on
                if not isinstance(exc, ServerError):
                    logger.exception("generation step failed")
                error = exc if isinstance(exc, ServerError) else ServerError(f"generation step failed: {exc}")
                for stream in dict.fromkeys([*self._active, *admitted]):
                    if not stream.done:
                        stream.done = True
                        outbox.append((stream, error))
                self._active, self._caches, self._columns = [], [], None
                self._mask, self._positions = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            _send(outbox)
        unloaded = ModelNotReadyError("the model was unloaded during generation")
        _send([(s, unloaded) for s in leftovers if not s.done])

    def _run_model(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results, _ = run_instance(self.runtime, feed, self.output_names)
        return results

    def _reserved(self, stream: Stream) -> int:
        return min(len(stream.prompt_ids) + stream.params.max_tokens, self.context_length)

    def _admissible(self) -> list[Stream]:
        """Takes waiting streams, oldest first, that fit the sequence limit and the token budget."""
        used = sum(self._reserved(s) for s in self._active)
        admitted: list[Stream] = []
        while self._waiting:
            stream = self._waiting[0]
            if stream.cancelled:
                self._waiting.popleft()
                continue
            if len(self._active) + len(admitted) >= self.max_num_seqs:
                break
            need = self._reserved(stream)
            if used + need > self.max_batch_tokens and (self._active or admitted):
                break  # first come, first served: later streams wait too
            stream.admitted = time.perf_counter()
            admitted.append(self._waiting.popleft())
            used += need
        return admitted

    def _feed(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, caches: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update(zip(self.past_names, caches))
        return feed

    def _prefill(self, streams: list[Stream], outbox: list[tuple[Stream, Delivery]]) -> None:
        """Runs the prompts of newly admitted streams, then adds them to the batch."""
        pieces: list[tuple[list[Stream], list[np.ndarray], np.ndarray, np.ndarray]] = []
        last_logits = []
        for group in plan_prefill([len(s.prompt_ids) for s in streams]):
            members = [streams[i] for i in group]
            length = max(len(s.prompt_ids) for s in members)
            ids = np.full((len(members), length), self.eos, np.int64)
            mask = np.zeros((len(members), length), np.int64)
            for row, stream in enumerate(members):
                ids[row, length - len(stream.prompt_ids) :] = stream.prompt_ids
                mask[row, length - len(stream.prompt_ids) :] = 1
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            empty = [np.zeros((len(members), self.heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]
            logits, *caches = self._run_model(self._feed(ids, mask, positions, empty))
            pieces.append((members, caches, mask, positions[:, -1] + 1))
            last_logits.append(logits[:, -1])
        self._merge(pieces)
        self._sample([s for piece in pieces for s in piece[0]], np.concatenate(last_logits), outbox)

    def _merge(self, pieces: list[tuple[list[Stream], list[np.ndarray], np.ndarray, np.ndarray]]) -> None:
        """Adds prefilled rows to the batch in one copy, padding shorter rows on the left.

        New rows go before the rows already there: streams then tend to sit in the order
        they will finish (last admitted, last done), so a finishing stream is usually at
        the end, where _drop_finished removes it without moving any other row.
        """
        self._columns = None
        if self._active:
            pieces = [*pieces, (self._active, self._caches, self._mask, self._positions)]
        if len(pieces) == 1:
            self._active, self._caches, self._mask, self._positions = list(pieces[0][0]), pieces[0][1], pieces[0][2], pieces[0][3]
            return
        rows = sum(len(members) for members, _, _, _ in pieces)
        total = max(mask.shape[1] for _, _, mask, _ in pieces)
        merged_caches = []
        for k in range(2 * self.layers):
            out = np.empty((rows, self.heads, total, self.head_dim), np.float32)
            row = 0
            for members, caches, _, _ in pieces:
                length = caches[k].shape[2]
                out[row : row + len(members), :, : total - length] = 0
                out[row : row + len(members), :, total - length :] = caches[k]
                row += len(members)
            merged_caches.append(out)
        mask = np.zeros((rows, total), np.int64)
        row = 0
        for members, _, piece_mask, _ in pieces:
            mask[row : row + len(members), total - piece_mask.shape[1] :] = piece_mask
            row += len(members)
        self._caches, self._mask = merged_caches, mask
        self._positions = np.concatenate([positions for _, _, _, positions in pieces])
        self._active = [s for members, _, _, _ in pieces for s in members]

    def _drop_finished(self) -> None:
        """Takes finished and cancelled rows out of the batch before the next step.

        Copying every cache to close the gaps would cost about as much as a decode step,
        so the last live rows move into the gaps instead, and every array is then cut
        to its first rows: a view that is still contiguous, which ONNX Runtime takes as is.
        """
        gone = [s.done or s.cancelled for s in self._active]
        if not any(gone):
            return
        self._columns = None
        live = len(gone) - sum(gone)
        if live == 0:
            self._active, self._caches = [], []
            self._mask, self._positions = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            return
        holes = [i for i in range(live) if gone[i]]
        movers = [i for i in range(live, len(gone)) if not gone[i]]
        if holes:
            for cache in self._caches:
                cache[holes] = cache[movers]
            self._mask[holes] = self._mask[movers]
            self._positions[holes] = self._positions[movers]
            for hole, mover in zip(holes, movers):
                self._active[hole] = self._active[mover]
        self._active = self._active[:live]
        self._caches = [c[:live] for c in self._caches]
        self._mask = self._mask[:live]
        self._positions = self._positions[:live]
        # Columns no remaining row attends to are dead weight, but trimming them copies every
        # cache once (a column view is not contiguous): do it when they are an eighth or more.
        used = np.flatnonzero(self._mask.any(axis=0))
        start = int(used[0]) if used.size else self._mask.shape[1]
        if start * 8 >= self._mask.shape[1]:
            self._caches = [np.ascontiguousarray(c[:, :, start:]) for c in self._caches]
            self._mask = self._mask[:, start:]

    def _decode_step(self, outbox: list[tuple[Stream, Delivery]]) -> None:
        now = time.monotonic()
        for stream in self._active:
            if stream.deadline is not None and now > stream.deadline and not stream.done:
                stream.done = True
                outbox.append((stream, DeadlineExceededError("the request's deadline passed during generation")))
        self._drop_finished()
        if not self._active:
            return
        ids = np.array([[s.output_ids[-1]] for s in self._active], np.int64)
        mask = np.concatenate([self._mask, np.ones((len(self._active), 1), np.int64)], axis=1)
        positions = self._positions[:, None]
        streams = list(self._active)
        logits, *caches = self._run_model(self._feed(ids, mask, positions, self._caches))
        self.steps += 1
        # Streams cancelled while this step ran still got a row in it: count it, drop them next.
        for stream in streams:
            if stream.cancelled:
                stream.steps_after_cancel += 1
        self._caches, self._mask, self._positions = caches, mask, self._positions + 1
        if self._columns is None:
            self._columns = SamplingColumns.of([s.params for s in streams])
        self._sample(streams, logits[:, -1], outbox, self._columns)

    def _sample(
        self, streams: list[Stream], logits: np.ndarray, outbox: list[tuple[Stream, Delivery]],
        columns: SamplingColumns | None = None,
    ) -> None:
        """Chooses every live row's next token in one pass, then updates each stream.

        Args:
            columns: The rows' sampling settings when every stream is still live (the
                batch's cached ones); built here otherwise.
        """
        live = [s for s in streams if not (s.done or s.cancelled)]
        if len(live) < len(streams):
            if not live:
                return
            logits = logits[[i for i, s in enumerate(streams) if not (s.done or s.cancelled)]]
            columns = None
        if columns is None:
            columns = SamplingColumns.of([s.params for s in live])
        seen = (
            [s.prompt_ids + s.output_ids if s.params.repetition_penalty != 1.0 else () for s in live]
            if columns.any_penalty else ((),) * len(live)
        )
        uniforms = [s.rng.random() if sampled else 0.0 for s, sampled in zip(live, columns.sampled)]
        # Before min_tokens, the end-of-sequence token is simply not a choice.
        allowed = [self.eos if len(s.output_ids) < s.params.min_tokens else self.eos + 1 for s in live]
        tokens: list[int | None]
        try:
            tokens = list(draw(logits, columns, seen, uniforms, allowed))
        except Exception:
            # One row must not fail its neighbours: draw row by row (with the same numbers, so
            # the others get the tokens they would have got) and fail only the rows that fail.
            logger.exception("batched draw failed; drawing row by row")
            tokens = []
            for row, stream in enumerate(live):
                try:
                    one = SamplingColumns.of([stream.params])
                    tokens.append(draw(logits[row : row + 1], one, [seen[row]], [uniforms[row]], [allowed[row]])[0])
                except Exception:
                    logger.exception("drawing the next token of one stream failed")
                    self._fail_stream(stream, outbox)
                    tokens.append(None)
        interval = self.stream_interval or 1 + len(self._active) // 16
        for stream, token in zip(live, tokens):
            if token is None:
                continue
            try:
                chunk = self._accept(stream, token, interval)
            except Exception:
                logger.exception("handling the next token of one stream failed")
                self._fail_stream(stream, outbox)
                continue
            if chunk is not None:
                outbox.append((stream, chunk))

    def _fail_stream(self, stream: Stream, outbox: list[tuple[Stream, Delivery]]) -> None:
        """Ends one stream with an error; its row leaves the batch before the next step."""
        if not stream.done:
            stream.done = True
            outbox.append((stream, ServerError("generation failed for this request")))

    def _accept(self, stream: Stream, token: int, interval: int) -> TokenChunk | None:
        """Adds a token to a stream; returns the chunk to send now, if any.

        Runs once per stream per step on the model thread, so it avoids work the common
        case does not need (no stop strings, not finished yet).
        """
        stream.output_ids.append(token)
        stream.unsent_ids.append(token)
        finish: str | None = None
        hit = False
        if token == self.eos and not stream.params.ignore_eos:
            finish, data = "stop", b""
        else:
            data = _BYTE_TEXT[token] if token < 256 else b""
        if stream.stops.stops:
            data, hit = stream.stops.feed(data)
            if hit:
                finish = "stop"
        if finish is None and len(stream.output_ids) >= stream.max_output:
            finish = "length"
        if finish is None:
            stream.unsent_text += stream.decoder.decode(data)
            # The first text goes out at once (time to first token); later text every `interval` tokens.
            first = len(stream.unsent_ids) == len(stream.output_ids)
            if stream.unsent_text and (first or len(stream.unsent_ids) >= interval):
                # Token ids travel with the text they produced (a UTF-8 character may span tokens).
                ids, stream.unsent_ids, text, stream.unsent_text = stream.unsent_ids, [], stream.unsent_text, ""
                return TokenChunk(text, ids)
            return None
        if stream.stops.stops and not hit:
            data += stream.stops.flush()  # text held back as a possible start of a stop string
        stream.done = True
        text = stream.unsent_text + stream.decoder.decode(data, final=True)
        counted = len(stream.output_ids) - (1 if finish == "stop" and token == self.eos else 0)
        ids, stream.unsent_ids, stream.unsent_text = stream.unsent_ids, [], ""
        return TokenChunk(text, ids, finish, len(stream.prompt_ids) - 1, counted)


# The text of each byte-level token.
_BYTE_TEXT = tuple(bytes([i]) for i in range(256))


# One prefill run costs about as much beyond its tokens as this many more prompt tokens
# (measured on the example decoder on a 2-core machine: ~1.7 ms of fixed cost at
# ~0.17 ms per token); splitting prompts of different lengths into several runs pays
# only when it saves more padding than that.
PREFILL_RUN_COST_TOKENS = 10


def plan_prefill(lengths: list[int], run_cost_tokens: int = PREFILL_RUN_COST_TOKENS) -> list[list[int]]:
    """Groups prompts into prefill runs so that padding plus per-run cost is least.

    Prompts in one run are padded to its longest, so a 3-token prompt next to a
    16-token one computes 13 wasted positions. Sorted by length, the best split into
    contiguous groups follows from a small dynamic program (at most max_num_seqs prompts).

    Returns:
        Groups of indices into `lengths`, shortest prompts first.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] + [0] * len(order)
    start_of = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        best[end] = -1
        for begin in range(end):
            cost = best[begin] + run_cost_tokens + (end - begin) * lengths[order[end - 1]]
            if best[end] < 0 or cost < best[end]:
                best[end], start_of[end] = cost, begin
    groups: list[list[int]] = []
    end = len(order)
    while end > 0:
        groups.append(order[start_of[end] : end])
        end = start_of[end]
    return groups[::-1]


def _send(outbox: list[tuple[Stream, Delivery]]) -> None:
    """Hands one step's chunks to the streams' event loops, one wake-up per loop."""
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Delivery]]] = {}
    for stream, item in outbox:
        per_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, items in per_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:
            pass  # the loop has closed: nobody is reading these streams any more


def _deliver(items: list[tuple[Stream, Delivery]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


@dataclass(frozen=True)
class GenerationArgs:
    """A text-generation request in Triton's tensor convention, decoded.

    Inputs: `text_input` (BYTES), and optionally `max_tokens` (INT32), `stream` (BOOL),
    `sampling_parameters` (BYTES, a JSON object), `exclude_input_in_output` (BOOL),
    `min_length` (INT32, TensorRT-LLM's name for min_tokens).
    """

    prompt: bytes
    params: SamplingParams
    stream: bool
    exclude_input: bool
    empty_final: bool = False  # request parameter triton_enable_empty_final_response


# What each sampling setting must be; the same names in the JSON `sampling_parameters` and as
# request parameters (Triton's vLLM backend accepts both).
_SETTINGS = {
    "max_tokens": "int", "temperature": "number", "top_k": "int", "top_p": "number",
    "repetition_penalty": "number", "seed": "int", "ignore_eos": "bool", "min_tokens": "int", "stop": "stop",
}
# Request options that also have their own input tensors; the JSON may give them too.
_OPTIONS = {"stream": "bool", "exclude_input_in_output": "bool"}
# Request parameters clients send that are not sampling settings.
_EMPTY_FINAL = "triton_enable_empty_final_response"
_UNSUPPORTED_UNLESS_ZERO = ("priority", "timeout")  # tritonclient sends them only when set
# The JSON holds a few numbers and at most MAX_STOP_STRINGS short strings.
MAX_SAMPLING_JSON_BYTES = 16384


def _convert(where: str, kind: str, value: Any) -> Any:
    """A setting's value in the type SamplingParams wants; InvalidInputError when it is not one."""
    if isinstance(value, np.generic):
        value = value.item()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise InvalidInputError(f"{where} must be true or false, got {quoted(value)}")
    if kind == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidInputError(f"{where} must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidInputError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        return tuple(stops)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{where} must be a number, got {quoted(value)}")
    if not math.isfinite(value):
        raise InvalidInputError(f"{where} must be a finite number, got {value}")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidInputError(f"{where} must be an integer, got {value}")
            value = int(value)
        return value
    return float(value)


def _parse_json_object(raw: Any) -> dict[str, Any]:
    """The JSON `sampling_parameters`: a flat object with no repeated keys."""
    data = bytes(raw)
    if len(data) > MAX_SAMPLING_JSON_BYTES:
        raise InvalidInputError(
            f"sampling_parameters is {len(data)} bytes; at most {MAX_SAMPLING_JSON_BYTES} are allowed"
        )

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise InvalidInputError(f"sampling_parameters gives {quoted(key)} more than once")
            out[key] = value
        return out

    try:
        parsed = json.loads(data.decode("utf-8"), object_pairs_hook=pairs)
    except RecursionError as exc:  # deep nesting: json's parser recurses once per level
        raise InvalidInputError("sampling_parameters is nested too deeply; it must be a flat JSON object") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInputError("sampling_parameters is not UTF-8 text") from exc
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
        raise InvalidInputError(f"sampling_parameters is not valid JSON: {quoted(exc)}") from exc
    if not isinstance(parsed, dict):
        raise InvalidInputError("sampling_parameters must be a JSON object")
    for key, value in parsed.items():
        if isinstance(value, dict) or (isinstance(value, list) and key != "stop"):
            raise InvalidInputError(f"sampling_parameters.{key} must be a plain value; the object must be flat")
    return parsed


def request_args(
    request: InferRequest, validate: Callable[[InferRequest], object], default_stream: bool
) -> GenerationArgs:
    """generation_args() of a decoded ModelInfer request, after `validate` (the model's signature check).

    Scalar inputs may be shaped [1] or [1, 1]: TensorRT-LLM's models batch, so Triton clients
    written for them send every scalar with a batch dimension of one.
    """
    for tensor in request.inputs:
        if tuple(tensor.shape) == (1, 1):
            tensor.shape = (1,)
            tensor.data = tensor.data.reshape(1)
    validate(request)
    return generation_args({t.name: t.data for t in request.inputs}, default_stream, request.parameters)


def generation_args(
    inputs: dict[str, np.ndarray], default_stream: bool, parameters: Mapping[str, ParamValue] | None = None
) -> GenerationArgs:
    """Reads the text-generation tensors and request parameters of a request.

    A setting may come from an input tensor (`max_tokens`, `min_length`, `stream`,
    `exclude_input_in_output`), from the JSON `sampling_parameters`, or from a request
    parameter of the same name; given in more than one place, the values must agree.

    Raises:
        InvalidInputError: missing prompt, bad JSON, unknown settings or request parameters,
            values of the wrong type or out of bounds, a setting given twice differently.
    """
    def scalar(name: str) -> Any:
        value = inputs.get(name)
        if value is None:
            return None
        if value.size != 1:
            raise InvalidInputError(f"input '{name}' must hold exactly one element, got {value.size}")
        return value.reshape(-1)[0]

    prompt = scalar("text_input")
    if prompt is None:
        raise InvalidInputError("missing input 'text_input' (BYTES)")
    given: dict[str, tuple[str, Any]] = {}  # setting -> (where it came from, value)

    def give(key: str, where: str, value: Any) -> None:
        earlier = given.get(key)
        if earlier is not None and earlier[1] != value:
            raise InvalidInputError(
                f"{key} is given twice with different values ({earlier[0]}: {quoted(earlier[1])}, "
                f"{where}: {quoted(value)})"
            )
        given[key] = (where, value)

    for name, key, kind in (
        ("max_tokens", "max_tokens", "int"), ("min_length", "min_tokens", "int"),
        ("stream", "stream", "bool"), ("exclude_input_in_output", "exclude_input_in_output", "bool"),
    ):
        value = scalar(name)
        if value is not None:
            give(key, f"input '{name}'", _convert(f"input '{name}'", kind, value))
    raw_json = scalar("sampling_parameters")
    if raw_json is not None:
        for key, value in _parse_json_object(raw_json).items():
            json_kind = _SETTINGS.get(key) or _OPTIONS.get(key)
            if json_kind is None:
                raise InvalidInputError(
                    f"unknown sampling parameter {quoted(key)}; known: {', '.join([*_SETTINGS, *_OPTIONS])}"
                )
            give(key, "sampling_parameters", _convert(f"sampling_parameters.{key}", json_kind, value))
    empty_final = False
    for key, value in (parameters or {}).items():
        if key in _SETTINGS:
            give(key, "request parameter", _convert(f"request parameter '{key}'", _SETTINGS[key], value))
        elif key == _EMPTY_FINAL:
            empty_final = _convert(f"request parameter '{key}'", "bool", value)
        elif key in _UNSUPPORTED_UNLESS_ZERO:
            if value != 0 or isinstance(value, bool):
                raise InvalidInputError(
                    f"request parameter '{key}' is not supported by text-generation models (got {quoted(value)})"
                )
        else:
            raise InvalidInputError(
                f"unknown request parameter {quoted(key)} for a text-generation model; known: "
                f"{', '.join([*_SETTINGS, _EMPTY_FINAL])}"
            )
    options = {key: value for key, (_, value) in given.items() if key in _SETTINGS}
    params = SamplingParams(**options)
    params.check()
    stream = given.get("stream")
    exclude = given.get("exclude_input_in_output")
    return GenerationArgs(
        prompt=bytes(prompt),
        params=params,
        stream=default_stream if stream is None else bool(stream[1]),
        exclude_input=False if exclude is None else bool(exclude[1]),
        empty_final=bool(empty_final),
    )
