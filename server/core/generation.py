"""Continuous batching for exported decoders: streams join and leave the batch between decode steps.

The model is any ONNX decoder exported with `input_ids`, `attention_mask`, `position_ids`
and per-layer `past_key_values.{i}.key|value` inputs (outputs `logits`, `present.*`),
described by a generation.json. One step loop keeps a batch state (caches padded on the
left to a common length, an attention mask, next positions); new streams are prefilled
and merged in between steps, finished and cancelled ones are dropped before the next.
"""

from __future__ import annotations

import asyncio
import codecs
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.core.batcher import InstanceThread
from server.core.errors import DeadlineExceededError, InvalidInputError, QueueFullError
from server.runtime.base import Runtime


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen, and when a stream ends.

    Attributes:
        max_tokens: Most tokens to generate.
        temperature: 0 is greedy; higher flattens the distribution.
        top_k: Keep only the k most likely tokens (0: all).
        top_p: Keep the smallest set of tokens whose probability reaches p (1: all).
        repetition_penalty: > 1 makes tokens already in the prompt or output less likely.
        seed: Seeds this stream's own random generator (same seed, same tokens,
            whatever else shares the batch); None draws a fresh seed.
        stop: Strings that end the stream; the stop string itself is not returned.
        ignore_eos: Keep going past the end-of-sequence token (benchmarks).
        min_tokens: The end-of-sequence token cannot end the stream before this many tokens.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    def check(self) -> None:
        """Raises InvalidInputError naming the first bad value."""
        if self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InvalidInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise InvalidInputError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop strings must not be empty")


@dataclass
class TokenChunk:
    """What a stream yields: new text, and at the end a finish reason and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def sample_next(
    logits: np.ndarray, params: SamplingParams, seen: Sequence[int], rng: np.random.Generator, allowed: int
) -> int:
    """Chooses the next token from one row of logits.

    Args:
        logits: Scores over the vocabulary.
        params: Sampling settings.
        seen: Token ids of the prompt and the output so far (for the repetition penalty).
        rng: The stream's own generator.
        allowed: Tokens with an id >= this are never chosen (special tokens such as BOS).
    """
    scores = logits[:allowed].astype(np.float64)
    if params.repetition_penalty != 1.0 and len(seen):
        ids = np.unique(np.asarray([t for t in seen if t < allowed], dtype=np.int64))
        values = scores[ids]
        scores[ids] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if params.temperature == 0 or params.top_k == 1:
        return int(np.argmax(scores))
    scores = scores / params.temperature
    if params.top_k:
        cutoff = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores >= cutoff, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    # Inverse-CDF draw: one uniform number per token, much cheaper than Generator.choice(p=...).
    cumulative = np.cumsum(probs)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(probs) - 1))


class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s.encode("utf-8") for s in stops]
        self.buffer = bytearray()
        self.emitted = 0

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Adds output bytes; returns the bytes now safe to emit and whether a stop string was hit."""
        self.buffer += data
        hit = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            out = bytes(self.buffer[self.emitted : hit])
            self.emitted = hit
            return out, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        safe = len(self.buffer) - hold
        out = bytes(self.buffer[self.emitted : safe]) if safe > self.emitted else b""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> bytes:
        out = bytes(self.buffer[self.emitted :])
        self.emitted = len(self.buffer)
        return out


@dataclass(eq=False)
class Stream:
    """One generation request while it is queued or in the batch."""

    prompt_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator
    deadline: float | None
    queue: asyncio.Queue[TokenChunk | BaseException]
    stops: StopMatcher
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    output_ids: list[int] = field(default_factory=list)
    unsent_ids: list[int] = field(default_factory=list)
    unsent_text: str = ""
    done: bool = False
    cancelled: bool = False
    steps_after_cancel: int = 0


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
        self._waiting: list[Stream] = []
        self._active: list[Stream] = []
        self._caches: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)
        self._positions = np.zeros(0, np.int64)
        self._loop_task: asyncio.Task[None] | None = None
        self._thread: InstanceThread | None = None
        self.steps = 0

    @property
    def active(self) -> int:
        return len(self._active)

    async def generate(self, prompt: bytes, params: SamplingParams, deadline_s: float | None = None) -> AsyncIterator[TokenChunk]:
        """Streams the completion of `prompt` chunk by chunk; the last chunk has a finish reason.

        Raises:
            InvalidInputError: bad parameters, or a prompt that does not fit the context.
            QueueFullError: too many streams are waiting.
            DeadlineExceededError: the deadline passed before the stream ended.
        """
        params.check()
        prompt_ids = [self.bos, *prompt]
        if len(prompt_ids) >= self.context_length:
            raise InvalidInputError(
                f"prompt is {len(prompt_ids)} tokens; the model's context is {self.context_length}"
            )
        if len(self._waiting) >= self.max_queued:
            raise QueueFullError("too many generation requests are waiting; retry later")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        stream = Stream(
            prompt_ids=prompt_ids,
            params=params,
            rng=np.random.default_rng(seed),
            deadline=None if deadline_s is None else time.monotonic() + deadline_s,
            queue=asyncio.Queue(),
            stops=StopMatcher(params.stop),
        )
        self._waiting.append(stream)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Client gone or deadline: the step loop drops the stream before its next step.
            if not stream.done:
                stream.cancelled = True

    async def _run(self) -> None:
        while self._waiting or self._active:
            self._drop_finished()
            admitted = self._admissible()
            self._waiting = [s for s in self._waiting if s not in admitted and not s.cancelled]
            if admitted:
                await self._prefill(admitted)
                self._drop_finished()
            if self._active:
                await self._decode_step()
            await asyncio.sleep(0)  # let consumers and new requests in between steps

    async def _run_model(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs one step on the scheduler's own thread (cheaper than a new executor future per step)."""
        if self._thread is None:
            self._thread = InstanceThread(self.runtime, "generation")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[np.ndarray]] = loop.create_future()

        def finish(results: list[np.ndarray] | None, infer_ns: int, error: BaseException | None) -> None:
            if not done.done():
                if error is not None or results is None:
                    done.set_exception(error or RuntimeError("decode step failed"))
                else:
                    done.set_result(results)

        self._thread.submit(loop, feed, self.output_names, finish)
        return await done

    def close(self) -> None:
        """Ends the model thread (after its current step)."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def _reserved(self, stream: Stream) -> int:
        return min(len(stream.prompt_ids) + stream.params.max_tokens, self.context_length)

    def _admissible(self) -> list[Stream]:
        """Waiting streams, oldest first, that fit the sequence limit and the token budget."""
        used = sum(self._reserved(s) for s in self._active)
        admitted: list[Stream] = []
        for stream in self._waiting:
            if stream.cancelled:
                continue
            if len(self._active) + len(admitted) >= self.max_num_seqs:
                break
            need = self._reserved(stream)
            if used + need > self.max_batch_tokens and (self._active or admitted):
                break  # first come, first served: later streams wait too
            admitted.append(stream)
            used += need
        return admitted

    def _feed(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, caches: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = caches[2 * i]
            feed[f"past_key_values.{i}.value"] = caches[2 * i + 1]
        return feed

    async def _prefill(self, streams: list[Stream]) -> None:
        length = max(len(s.prompt_ids) for s in streams)
        ids = np.full((len(streams), length), self.eos, np.int64)
        mask = np.zeros((len(streams), length), np.int64)
        for row, stream in enumerate(streams):
            ids[row, length - len(stream.prompt_ids) :] = stream.prompt_ids
            mask[row, length - len(stream.prompt_ids) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = [np.zeros((len(streams), self.heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]
        logits, *caches = await self._run_model(self._feed(ids, mask, positions, empty))
        self._merge(streams, caches, mask, positions[:, -1] + 1)
        for row, stream in enumerate(streams):
            self._accept(stream, logits[row, -1])

    def _merge(self, streams: list[Stream], caches: list[np.ndarray], mask: np.ndarray, positions: np.ndarray) -> None:
        """Adds prefilled rows to the batch, padding the shorter side on the left."""
        if not self._active:
            self._active, self._caches, self._mask, self._positions = list(streams), caches, mask, positions
            return
        total = max(self._mask.shape[1], mask.shape[1])

        def pad(array: np.ndarray, axis: int) -> np.ndarray:
            missing = total - array.shape[axis]
            if missing == 0:
                return array
            widths = [(0, 0)] * array.ndim
            widths[axis] = (missing, 0)
            return np.pad(array, widths)

        self._caches = [np.concatenate([pad(old, 2), pad(new, 2)]) for old, new in zip(self._caches, caches)]
        self._mask = np.concatenate([pad(self._mask, 1), pad(mask, 1)])
        self._positions = np.concatenate([self._positions, positions])
        self._active += streams

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not (s.done or s.cancelled)]
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not self._active:
            self._caches, self._mask, self._positions = [], np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            return
        self._caches = [c[keep] for c in self._caches]
        self._mask = self._mask[keep]
        self._positions = self._positions[keep]
        # Columns no remaining row attends to are dead weight: trim them from the left.
        used = np.flatnonzero(self._mask.any(axis=0))
        start = int(used[0]) if used.size else self._mask.shape[1]
        if start:
            self._caches = [c[:, :, start:] for c in self._caches]
            self._mask = self._mask[:, start:]

    async def _decode_step(self) -> None:
        now = time.monotonic()
        for stream in self._active:
            if stream.deadline is not None and now > stream.deadline:
                stream.done = True
                stream.queue.put_nowait(DeadlineExceededError("the request's deadline passed during generation"))
        self._drop_finished()
        if not self._active:
            return
        ids = np.array([[s.output_ids[-1]] for s in self._active], np.int64)
        mask = np.concatenate([self._mask, np.ones((len(self._active), 1), np.int64)], axis=1)
        positions = self._positions[:, None]
        streams = list(self._active)
        logits, *caches = await self._run_model(self._feed(ids, mask, positions, self._caches))
        self.steps += 1
        # Streams cancelled while this step ran still got a row in it: count it, drop them next.
        for stream in streams:
            if stream.cancelled:
                stream.steps_after_cancel += 1
        self._caches, self._mask, self._positions = caches, mask, self._positions + 1
        for row, stream in enumerate(streams):
            if not (stream.done or stream.cancelled):
                self._accept(stream, logits[row, -1])

    def _accept(self, stream: Stream, logits: np.ndarray) -> None:
        """Samples one token for a stream and sends what is safe to send."""
        params = stream.params
        seen = stream.prompt_ids + stream.output_ids if params.repetition_penalty != 1.0 else ()
        # Before min_tokens, the end-of-sequence token is simply not a choice.
        allowed = self.eos if len(stream.output_ids) < params.min_tokens else self.eos + 1
        token = sample_next(logits, params, seen, stream.rng, allowed)
        stream.output_ids.append(token)
        stream.unsent_ids.append(token)
        finish: str | None = None
        data = b""
        if token == self.eos and not params.ignore_eos:
            finish = "stop"
        elif token < 256:
            data = bytes([token])
        text_bytes, hit = stream.stops.feed(data)
        if hit:
            finish = "stop"
        elif finish is None and (
            len(stream.output_ids) >= params.max_tokens
            or len(stream.prompt_ids) + len(stream.output_ids) >= self.context_length
        ):
            finish = "length"
        if finish is not None and not hit:
            text_bytes += stream.stops.flush()
        stream.unsent_text += stream.decoder.decode(text_bytes, final=finish is not None)
        counted = len(stream.output_ids) - (1 if finish == "stop" and token == self.eos else 0)
        interval = self.stream_interval or 1 + len(self._active) // 16
        if finish is not None:
            stream.done = True
            ids, stream.unsent_ids, text, stream.unsent_text = stream.unsent_ids, [], stream.unsent_text, ""
            stream.queue.put_nowait(TokenChunk(text, ids, finish, len(stream.prompt_ids) - 1, counted))
        elif stream.unsent_text and len(stream.unsent_ids) >= interval:
            # Token ids travel with the text they produced (a UTF-8 character may span tokens).
            ids, stream.unsent_ids, text, stream.unsent_text = stream.unsent_ids, [], stream.unsent_text, ""
            stream.queue.put_nowait(TokenChunk(text, ids))


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


_JSON_FIELDS = {
    "max_tokens": int, "temperature": float, "top_k": int, "top_p": float,
    "repetition_penalty": float, "seed": int, "ignore_eos": bool, "min_tokens": int,
}


def generation_args(inputs: dict[str, np.ndarray], default_stream: bool) -> GenerationArgs:
    """Reads the text-generation tensors of a request.

    Raises:
        InvalidInputError: missing prompt, bad JSON, unknown sampling options, bad values.
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
    options: dict[str, Any] = {}
    raw_json = scalar("sampling_parameters")
    if raw_json is not None:
        import json

        try:
            parsed = json.loads(bytes(raw_json).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"sampling_parameters is not a JSON object: {exc}") from exc
        if not isinstance(parsed, dict):
            raise InvalidInputError("sampling_parameters must be a JSON object")
        for key, value in parsed.items():
            if key == "stop":
                stops = [value] if isinstance(value, str) else value
                if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                    raise InvalidInputError("sampling_parameters.stop must be a string or a list of strings")
                options["stop"] = tuple(stops)
            elif key in _JSON_FIELDS:
                try:
                    options[key] = _JSON_FIELDS[key](value)
                except (TypeError, ValueError) as exc:
                    raise InvalidInputError(f"sampling_parameters.{key} has a bad value {value!r}") from exc
            elif key not in ("stream", "exclude_input_in_output"):
                raise InvalidInputError(f"unknown sampling parameter '{key}'")
    max_tokens = scalar("max_tokens")
    if max_tokens is not None:
        options["max_tokens"] = int(max_tokens)
    min_length = scalar("min_length")  # TensorRT-LLM's name, sent by genai-perf for fixed output lengths
    if min_length is not None:
        options["min_tokens"] = int(min_length)
    stream = scalar("stream")
    exclude = scalar("exclude_input_in_output")
    params = SamplingParams(**options)
    params.check()
    return GenerationArgs(
        prompt=bytes(prompt),
        params=params,
        stream=default_stream if stream is None else bool(stream),
        exclude_input=bool(exclude) if exclude is not None else False,
    )
