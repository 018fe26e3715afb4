"""Continuous batching for exported decoders: streams join and leave the batch between decode steps.

The model is any ONNX decoder exported with `input_ids`, `attention_mask`, optionally
`position_ids`, and per-layer `past_key_values.{i}.key|value` inputs (outputs `logits`,
`present.*`; decoder_layout.py reads the cache's shape and type from the graph), with a
tokenizer (tokenizer.py) named by its generation.json. One model thread owns the batch (a DecodeBatch: caches
padded on the left to a common length, an attention mask, next positions) and runs step
after step without waiting for the event loop: it prefills and merges new streams between
steps, drops finished and cancelled ones, samples every row in one vectorised pass, and
hands each step's text to the event loop in one call. The event loop only queues streams
and writes responses, so gRPC work overlaps the next decode step instead of delaying it.
Request parsing lives in generation_args.py, the batch's array work in decode_batch.py.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from server.core.decode_batch import DecodeBatch, plan_prefill, prompt_inputs
from server.core.decoder_layout import DecoderLayout
from server.core.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotReadyError,
    QueueFullError,
    ServerError,
)
from server.core.generation_stream import Delivery, Stream, TokenChunk, TokenLogprob, send, token_logprobs
from server.core.instance import run_instance
from server.core.sampling import SamplingColumns, SamplingParams, StopMatcher, draw, model_sampling_defaults
from server.core.statistics import GenerationStats
from server.core.tokenizer import Tokenizer, load_tokenizer
from server.runtime import cpus
from server.runtime.base import Runtime

# TokenChunk is defined with the stream's other types; callers import it from here too.
__all__ = ["GenerationScheduler", "Stream", "TokenChunk"]

logger = logging.getLogger(__name__)


class GenerationScheduler:
    """Runs every active stream of one decoder model in one batch, step after step.

    Args:
        runtime: The exported decoder.
        info: Its generation.json (context_length; tokenizer; for the byte-level tokenizer
            bos_token_id and eos_token_id; head counts only where the graph leaves them symbolic).
        max_num_seqs: Most streams in the batch at once.
        max_queued: Most streams waiting for a place; more are refused (RESOURCE_EXHAUSTED).
        max_batch_tokens: Token budget of the batch: a stream is admitted only while the
            prompts plus the requested output tokens of every active stream fit in it
            (bounds cache memory); 0 means max_num_seqs * context_length.
        stream_interval: Tokens per streamed message. 0 adapts to load: one token per
            message up to 15 active streams, then one more per 16 streams (each message
            costs the server a gRPC write; clients see the same text, in fewer pieces).
            A stream's first token is always sent at once, alone.
        tokenizer: The model's tokenizer; by default the one generation.json names, read from
            `model_dir`.
        model_dir: Where the tokenizer's files are.

    Raises:
        ModelLoadError: the graph is not a decoder in the common layout, or the tokenizer cannot load.
    """

    def __init__(
        self,
        runtime: Runtime,
        info: dict[str, Any],
        max_num_seqs: int = 32,
        max_queued: int = 256,
        max_batch_tokens: int = 0,
        stream_interval: int = 0,
        tokenizer: Tokenizer | None = None,
        model_dir: Path | None = None,
    ) -> None:
        self.runtime = runtime
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir or Path("."), info)
        self.eos_ids = sorted(self.tokenizer.eos_ids)
        self.pad_id = self.eos_ids[0]  # any valid id: the mask hides padding
        self.context_length = int(info["context_length"])
        self.layout = DecoderLayout.of(runtime.inputs, runtime.outputs, info)
        self.sampling_defaults = model_sampling_defaults(self.tokenizer.generation_defaults)
        self.max_num_seqs = max_num_seqs
        self.max_queued = max_queued
        self.max_batch_tokens = max_batch_tokens or max_num_seqs * self.context_length
        self.stream_interval = stream_interval
        self.output_names = self.layout.output_names
        self.past_names = self.layout.past_names
        # Shared between the event loop and the model thread, under _wakeup's lock.
        self._wakeup = threading.Condition()
        self._waiting: collections.deque[Stream] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # generate() calls between admission and their end (queued or in the batch)
        # The model thread's own batch; the event loop only copies its rows (running()).
        self._batch: DecodeBatch[Stream] = DecodeBatch.empty()
        self.stats = GenerationStats()

    def running(self) -> list[Stream]:
        """The streams in the batch now (a copy).

        Safe on the event loop while the model thread changes the batch: the copy is one
        operation under the GIL, so it is a consistent moment's list.
        """
        return list(self._batch.rows)

    def load(self) -> tuple[int, int, float]:
        """Streams in the batch, streams waiting for a place, and the share of the token budget
        (the cache) the batch holds, for the metrics gauges.
        """
        active = self.running()
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

    async def generate(
        self, prompt: bytes | str, params: SamplingParams, deadline_s: float | None = None
    ) -> AsyncIterator[TokenChunk]:
        """Streams the completion of `prompt` (text, or its UTF-8 bytes) chunk by chunk; the last
        chunk has a finish reason.

        Raises:
            InvalidInputError: bad parameters, or a prompt that does not fit the context.
            QueueFullError: too many streams are waiting.
            DeadlineExceededError: the deadline passed before the stream ended.
            ModelNotReadyError: the model was unloaded.
        """
        if params.unset and self.sampling_defaults:
            chosen = {k: v for k, v in self.sampling_defaults.items() if k in params.unset}
            params = dataclasses.replace(params, **chosen)
        params.check()
        if params.max_tokens > self.context_length:
            raise InvalidInputError(
                f"max_tokens is {params.max_tokens}; the model's context is {self.context_length} tokens"
            )
        tokenizer = self.tokenizer
        prompt_ids = tokenizer.encode_bytes(prompt) if isinstance(prompt, bytes) else tokenizer.encode(prompt)
        if len(prompt_ids) >= self.context_length:
            raise InvalidInputError(
                f"prompt is {len(prompt_ids)} tokens; the model's context is {self.context_length}"
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        stream = Stream(
            prompt_ids=prompt_ids,
            prompt_tokens=len(prompt_ids) - (1 if tokenizer.bos_id is not None and tokenizer.counts_bos_apart else 0),
            params=params,
            rng=random.Random(seed),
            deadline=None if deadline_s is None else time.monotonic() + deadline_s,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            stops=StopMatcher(params.stop),
            max_output=min(params.max_tokens, self.context_length - len(prompt_ids)),
            detokenizer=tokenizer.detokenizer(),
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
                    stats.first_chunk(queued, now - stream.arrived, stream.prompt_tokens)
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
        # A stream's steps use every CPU of the process (its session's intra-op threads are sized so), also in a
        # worker whose other threads are pinned to its share (cpus.pin_worker).
        cpus.unpin_this_thread()
        leftovers: list[Stream] = []
        while True:
            outbox: list[tuple[Stream, Delivery]] = []
            admitted: list[Stream] = []
            try:
                self._drop_finished()  # first: finished rows must not hold places or keep the thread awake
                with self._wakeup:
                    while not (self._closing or self._waiting or self._batch):
                        self._wakeup.wait()
                    if self._closing:
                        leftovers = [*self._waiting, *self._batch.rows]
                        self._waiting.clear()
                        break
                    admitted = self._admissible()
                if admitted:
                    self._prefill(admitted, outbox)  # rows done at their first token leave in _decode_step
                if self._batch:
                    self._decode_step(outbox)
            except Exception as exc:  # a failed step fails every stream in it; the thread goes on
                if not isinstance(exc, ServerError):
                    logger.exception("generation step failed")
                error = exc if isinstance(exc, ServerError) else ServerError(f"generation step failed: {exc}")
                for stream in dict.fromkeys([*self._batch.rows, *admitted]):
                    if not stream.done:
                        stream.done = True
                        outbox.append((stream, error))
                self._batch = DecodeBatch.empty()
            send(outbox)
        unloaded = ModelNotReadyError("the model was unloaded during generation")
        send([(s, unloaded) for s in leftovers if not s.done])

    def _run_model(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results, _ = run_instance(self.runtime, feed, self.output_names)
        return results

    def _reserved(self, stream: Stream) -> int:
        return min(len(stream.prompt_ids) + stream.params.max_tokens, self.context_length)

    def _admissible(self) -> list[Stream]:
        """Takes waiting streams, oldest first, that fit the sequence limit and the token budget."""
        used = sum(self._reserved(s) for s in self._batch.rows)
        admitted: list[Stream] = []
        while self._waiting:
            stream = self._waiting[0]
            if stream.cancelled:
                self._waiting.popleft()
                continue
            if len(self._batch) + len(admitted) >= self.max_num_seqs:
                break
            need = self._reserved(stream)
            if used + need > self.max_batch_tokens and (self._batch or admitted):
                break  # first come, first served: later streams wait too
            stream.admitted = time.perf_counter()
            admitted.append(self._waiting.popleft())
            used += need
        return admitted

    def _feed(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, caches: list[np.ndarray]
    ) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask}
        if self.layout.position_ids:
            feed["position_ids"] = positions
        feed.update(zip(self.past_names, caches, strict=True))
        return feed

    def _prefill(self, streams: list[Stream], outbox: list[tuple[Stream, Delivery]]) -> None:
        """Runs the prompts of newly admitted streams, then adds them to the batch in one copy.

        New rows go before the rows already there: streams then tend to sit in the order
        they will finish (last admitted, last done), so a finishing stream is usually at
        the end, where the batch's filter removes it without moving any other row.
        """
        pieces: list[DecodeBatch[Stream]] = []
        last_logits = []
        for group in plan_prefill([len(s.prompt_ids) for s in streams]):
            members = [streams[i] for i in group]
            ids, mask, positions = prompt_inputs([s.prompt_ids for s in members], self.pad_id)
            empty = self.layout.empty_caches(len(members))
            logits, *caches = self._run_model(self._feed(ids, mask, positions, empty))
            pieces.append(DecodeBatch.prefilled(members, caches, mask, positions))
            last_logits.append(logits[:, -1])
        self._batch = DecodeBatch.concatenate([*pieces, self._batch])
        self._sample([s for piece in pieces for s in piece.rows], np.concatenate(last_logits), outbox)

    def _drop_finished(self) -> None:
        """Takes finished and cancelled rows out of the batch before the next step."""
        self._batch.filter([not (s.done or s.cancelled) for s in self._batch.rows])

    def _decode_step(self, outbox: list[tuple[Stream, Delivery]]) -> None:
        now = time.monotonic()
        for stream in self._batch.rows:
            if stream.deadline is not None and now > stream.deadline and not stream.done:
                stream.done = True
                outbox.append((stream, DeadlineExceededError("the request's deadline passed during generation")))
        self._drop_finished()
        batch = self._batch
        if not batch:
            return
        streams = list(batch.rows)
        ids, mask, positions = batch.step_inputs([s.output_ids[-1] for s in streams])
        logits, *caches = self._run_model(self._feed(ids, mask, positions, batch.caches))
        batch.advance(caches, mask)
        if batch.columns is None:
            batch.columns = SamplingColumns.of([s.params for s in streams])
        self._sample(streams, logits[:, -1], outbox, batch.columns)

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
        uniforms = [s.rng.random() if sampled else 0.0 for s, sampled in zip(live, columns.sampled, strict=True)]
        # Before min_tokens, the end-of-sequence tokens are simply not a choice. `logits` is this
        # step's own array (the model's output or a copy), so it is changed in place.
        for row, stream in enumerate(live):
            if len(stream.output_ids) < stream.params.min_tokens:
                logits[row, self.eos_ids] = -np.inf
        # Ids past the tokenizer's vocabulary (a model's padded embedding table) have no text.
        allowed = [min(logits.shape[-1], self.tokenizer.vocab_size)] * len(live)
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
        interval = self.stream_interval or 1 + len(self._batch) // 16
        asked = [i for i, s in enumerate(live) if s.params.logprobs is not None and tokens[i] is not None]
        if asked:
            found = token_logprobs(
                self.tokenizer, logits, asked, [tokens[i] for i in asked],  # type: ignore[misc]
                [live[i].params.logprobs for i in asked],  # type: ignore[misc]
            )
            for i, entry in zip(asked, found, strict=True):
                live[i].unsent_logprobs.append(entry)
        for stream, token in zip(live, tokens, strict=True):
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
        eos = token in self.tokenizer.eos_ids
        if eos and not stream.params.ignore_eos:
            finish, data = "stop", b""
        else:
            data = stream.detokenizer.add(token)
        if finish is None and len(stream.output_ids) >= stream.max_output:
            finish = "length"
        if finish is not None:
            data += stream.detokenizer.flush()  # an unfinished character's replacement
        if stream.stops.stops:
            data, hit = stream.stops.feed(data)
            if hit:
                finish = "stop"
        if finish is None:
            stream.unsent_text += stream.decoder.decode(data)
            # The first text goes out at once (time to first token); later text every `interval` tokens.
            first = len(stream.unsent_ids) == len(stream.output_ids)
            if stream.unsent_text and (first or len(stream.unsent_ids) >= interval):
                # Token ids travel with the text they produced (a UTF-8 character may span tokens).
                ids, stream.unsent_ids, text, stream.unsent_text = stream.unsent_ids, [], stream.unsent_text, ""
                return TokenChunk(text, ids, logprobs=_take_logprobs(stream))
            return None
        if stream.stops.stops and not hit:
            data += stream.stops.flush()  # text held back as a possible start of a stop string
        stream.done = True
        text = stream.unsent_text + stream.decoder.decode(data, final=True)
        counted = len(stream.output_ids) - (1 if eos and not stream.params.ignore_eos else 0)
        ids, stream.unsent_ids, stream.unsent_text = stream.unsent_ids, [], ""
        return TokenChunk(text, ids, finish, stream.prompt_tokens, counted, _take_logprobs(stream))


def _take_logprobs(stream: Stream) -> list[TokenLogprob] | None:
    if stream.params.logprobs is None:
        return None
    taken, stream.unsent_logprobs = stream.unsent_logprobs, []
    return taken
