"""Choosing next tokens for a whole batch of streams at once, and finding stop strings.

Each stream keeps its own settings and its own random generator: one pass over the
batch's logits draws exactly what a pass over that stream's row alone would, so a seeded
stream writes the same tokens whatever else shares the batch. The pass runs in C
(_sampling.c) when the extension was compiled, else as vectorised numpy; the two choose
the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.errors import InvalidInputError, ModelLoadError, quoted

try:  # compiled by setup.py when a C compiler is there; numpy otherwise (same tokens)
    from server.core import _sampling
except ImportError:  # pragma: no cover - depends on how the package was built
    _sampling = None  # type: ignore[assignment]


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
        logprobs: None for none; else each token comes with its log-probability and this
            many most likely alternatives (0 to MAX_LOGPROBS).
        unset: Which of MODEL_DEFAULTED the request left out: a model's own defaults
            (generation_config.json) take their place.
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
    logprobs: int | None = None
    unset: frozenset[str] = frozenset()

    def check(self) -> None:
        """Raises InvalidInputError naming the first bad value (the bounds are the module's constants)."""
        _check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT)
        _check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _check_int("top_k", self.top_k, 0, MAX_TOP_K)
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidInputError(f"top_p must be a finite number in (0, 1], got {quoted(self.top_p)}")
        _check_number("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidInputError(f"ignore_eos must be true or false, got {quoted(self.ignore_eos)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidInputError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise InvalidInputError("stop strings must be non-empty strings")
            size = len(stop.encode("utf-8", "surrogatepass"))
            if size > MAX_STOP_BYTES:
                raise InvalidInputError(
                    f"a stop string may hold at most {MAX_STOP_BYTES} bytes of UTF-8, got {size}: {quoted(stop)}"
                )


# Bounds of the sampling settings (documented in the README). Values outside them are refused
# (INVALID_ARGUMENT) before a stream is admitted, so a bad setting can never reach the batched
# draw, where it would fail or skew every stream sharing the step.
MAX_TOKENS_LIMIT = 2**31 - 1  # the scheduler further limits max_tokens to the model's context
MAX_TEMPERATURE = 100.0
# Temperatures above 0 but below this are greedy: dividing scores by a tinier one overflows.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_K = 2**31 - 1
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# Stop strings: matching costs the same whatever their number (StopMatcher), but each one is
# held in every stream's automaton, so both their number and their length are bounded.
MAX_STOP_STRINGS = 16
# The settings a model's generation_config.json may give defaults for (as vLLM reads it;
# its do_sample is not read: an API request samples unless its temperature is 0).
MODEL_DEFAULTED = ("temperature", "top_k", "top_p", "repetition_penalty")
# Alternatives per token with log-probabilities (OpenAI's own limit for top_logprobs).
MAX_LOGPROBS = 20
MAX_STOP_BYTES = 128


def model_sampling_defaults(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A model's sampling defaults (from its generation_config.json), each checked like a request's.

    Raises:
        ModelLoadError: a default outside the bounds a request would be held to.
    """
    defaults = {k: v for k, v in raw.items() if k in MODEL_DEFAULTED}
    for key, value in defaults.items():
        try:
            SamplingParams(**{key: value}).check()
        except InvalidInputError as exc:
            raise ModelLoadError(f"generation_config.json's {key}: {exc}") from exc
    return defaults


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if not (_is_number(value) and low <= value <= high):  # type: ignore[operator]
        raise InvalidInputError(f"{name} must be a finite number in [{low:g}, {high:g}], got {quoted(value)}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(f"{name} must be an integer in [{low}, {high}], got {quoted(value)}")


@dataclass(frozen=True)
class SamplingColumns:
    """The sampling settings of a batch's rows, one list per setting: what one draw takes.

    The scheduler builds it when rows join or leave the batch, not on every step.
    """

    temperatures: list[float]
    top_ks: list[int]
    top_ps: list[float]
    penalties: list[float]
    sampled: list[bool]  # rows that draw (not greedy): each takes one uniform number per step
    any_penalty: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> SamplingColumns:
        return cls(
            temperatures=[p.temperature if p.temperature >= GREEDY_BELOW_TEMPERATURE else 0.0 for p in params],
            top_ks=[p.top_k for p in params],
            top_ps=[p.top_p for p in params],
            penalties=[p.repetition_penalty for p in params],
            sampled=[p.temperature >= GREEDY_BELOW_TEMPERATURE and p.top_k != 1 for p in params],
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        )


def draw(
    logits: np.ndarray,
    columns: SamplingColumns,
    seen: Sequence[Sequence[int]],
    uniforms: Sequence[float],
    allowed: Sequence[int],
    compiled: bool = True,
) -> list[int]:
    """Chooses the next token of every row in one pass.

    Args:
        logits: Scores, one row per stream, [batch, vocabulary].
        columns: Each row's sampling settings.
        seen: Each row's prompt and output ids so far (read only for a repetition penalty).
        uniforms: Each row's number in [0, 1) from its own generator, used by sampled rows (the
            scheduler draws one per sampled row per step; greedy rows' numbers are not read).
        allowed: Per row, ids >= this are never chosen (special tokens such as BOS, or EOS
            before min_tokens).
        compiled: Use the compiled draw (server/core/_sampling.c) when it was built; the
            numpy one otherwise. Both choose the same tokens (tests/unit/test_sampling.py).

    Returns:
        The chosen id of every row.
    """
    if compiled and _sampling is not None:
        return _sampling.sample_rows(
            np.ascontiguousarray(logits, dtype=np.float32),
            allowed,
            columns.temperatures,
            columns.top_ks,
            columns.top_ps,
            columns.penalties,
            seen,
            uniforms,
        )
    return _draw_numpy(logits, columns, seen, uniforms, allowed)


def _draw_numpy(
    logits: np.ndarray,
    columns: SamplingColumns,
    seen: Sequence[Sequence[int]],
    uniforms: Sequence[float],
    allowed: Sequence[int],
) -> list[int]:
    """draw() as one vectorised numpy pass over the batch."""
    width = max(allowed)
    scores = np.array(logits[:, :width], dtype=np.float64)
    for row, limit in enumerate(allowed):
        if limit < width:
            scores[row, limit:] = -np.inf
    for row, penalty in enumerate(columns.penalties):
        if penalty != 1.0 and len(seen[row]):
            ids = np.unique(np.asarray(seen[row], dtype=np.int64))
            ids = ids[ids < allowed[row]]
            values = scores[row, ids]
            scores[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    # Few numpy calls per step matter more than their size here: a step samples up to a few
    # dozen rows of a few hundred scores, and each call costs microseconds of overhead.
    rows = [i for i, sampled in enumerate(columns.sampled) if sampled]
    every_row = len(rows) == len(columns.sampled)
    chosen = np.zeros(len(rows), np.int64) if every_row else np.argmax(scores, axis=1)
    if not rows:
        return chosen.tolist()  # type: ignore[no-any-return]
    sampled = scores if every_row else scores[rows]
    temperatures = [columns.temperatures[i] for i in rows]
    if min(temperatures) == max(temperatures):
        sampled /= temperatures[0]
    else:
        sampled /= np.array(temperatures)[:, None]
    ks = [min(columns.top_ks[i], width) for i in rows]
    if max(ks) > 0:
        if min(ks) == max(ks):
            kth = np.partition(sampled, width - ks[0], axis=1)[:, width - ks[0]]
        else:  # rows with top_k 0 keep everything
            ascending = np.sort(sampled, axis=1)
            kth = np.where(np.array(ks) > 0, ascending[np.arange(len(rows)), width - np.maximum(ks, 1)], -np.inf)
        sampled[sampled < kth[:, None]] = -np.inf
    sampled -= sampled.max(axis=1, keepdims=True)
    weights = np.exp(sampled, out=sampled)
    top_p = [columns.top_ps[i] for i in rows]
    if min(top_p) < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches p (the one crossing p included).
        probs = weights / weights.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
        p = np.array(top_p)
        keep = np.where(p < 1.0, (mass < p[:, None]).sum(axis=1) + 1, width)
        dropped_in_order = np.arange(width)[None, :] >= keep[:, None]
        dropped = np.empty_like(dropped_in_order)
        np.put_along_axis(dropped, order, dropped_in_order, axis=1)
        weights = np.where(dropped, 0.0, probs)
    # Inverse-CDF draw: one uniform number per row, much cheaper than Generator.choice(p=...).
    cumulative = np.cumsum(weights, axis=1)
    targets = np.array([uniforms[i] for i in rows]) * cumulative[:, -1]
    picks = np.minimum((cumulative <= targets[:, None]).sum(axis=1), width - 1)
    if every_row:
        return picks.tolist()  # type: ignore[no-any-return]
    chosen[rows] = picks
    return chosen.tolist()  # type: ignore[no-any-return]


class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may start one.

    An Aho-Corasick automaton over the stop strings' bytes: each output byte takes one
    transition (plus amortised failure steps), whatever the number of stop strings, and the
    automaton's state is the longest output suffix that may still grow into a stop string,
    which is exactly the text to hold back. A stream ends where a stop string first
    completes; the text before that stop string is returned, the stop string is not.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s.encode("utf-8") for s in stops]
        # State 0 is the root. _next[state][byte] -> state; _fail: the longest proper suffix
        # that is also a trie state; _depth: the state's length; _hit: the longest stop
        # string ending at this state (0: none).
        self._next: list[dict[int, int]] = [{}]
        self._depth = [0]
        self._hit = [0]
        for stop in self.stops:
            state = 0
            for byte in stop:
                nxt = self._next[state].get(byte)
                if nxt is None:
                    nxt = len(self._next)
                    self._next[state][byte] = nxt
                    self._next.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._hit.append(0)
                state = nxt
            self._hit[state] = len(stop)
        self._fail = [0] * len(self._next)
        order = list(self._next[0].values())  # breadth first: a state's fail link is shallower
        for state in order:
            for byte, child in self._next[state].items():
                order.append(child)
                if state == 0:
                    continue
                link = self._fail[state]
                while link and byte not in self._next[link]:
                    link = self._fail[link]
                self._fail[child] = self._next[link].get(byte, 0)
                self._hit[child] = max(self._hit[child], self._hit[self._fail[child]])
        self._state = 0
        self._pending = bytearray()  # bytes not yet emitted: always the last _depth[_state] ones
        self.work = 0  # transitions taken, failure steps included (tests count it)

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Adds output bytes; returns the bytes now safe to emit and whether a stop string was hit."""
        if not self.stops:
            return data, False
        out = bytearray()
        pending = self._pending
        state = self._state
        for byte in data:
            self.work += 1
            while state and byte not in self._next[state]:
                state = self._fail[state]
                self.work += 1
            state = self._next[state].get(byte, 0)
            pending.append(byte)
            hit = self._hit[state]
            if hit:
                out += pending[: len(pending) - hit]
                self._state, self._pending = 0, bytearray()
                return bytes(out), True
            release = len(pending) - self._depth[state]
            if release:
                out += pending[:release]
                del pending[:release]
        self._state = state
        return bytes(out), False

    def flush(self) -> bytes:
        """The bytes held back as a possible start of a stop string (the stream ended otherwise)."""
        out = bytes(self._pending)
        self._pending.clear()
        self._state = 0
        return out
