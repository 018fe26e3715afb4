"""Choosing next tokens for a whole batch of streams at once, and finding stop strings.

Each stream keeps its own settings and its own random generator: one pass over the
batch's logits draws exactly what a pass over that stream's row alone would, so a seeded
stream writes the same tokens whatever else shares the batch. The pass runs in C
(_sampling.c) when the extension was compiled, else as vectorised numpy; the two choose
the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.core.errors import InvalidInputError

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
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidInputError(f"seed must be in [0, 2**64), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop strings must not be empty")


class UniformSource(Protocol):
    """A stream's own random generator: random.Random (what the scheduler uses: a draw
    costs 70 ns against 1 us for numpy's Generator) or numpy.random.Generator."""

    def random(self) -> float: ...


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
            temperatures=[p.temperature for p in params],
            top_ks=[p.top_k for p in params],
            top_ps=[p.top_p for p in params],
            penalties=[p.repetition_penalty for p in params],
            sampled=[p.temperature != 0 and p.top_k != 1 for p in params],
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        )

    def uniforms(self, rngs: Sequence[UniformSource]) -> list[float]:
        """One number in [0, 1) from each sampled row's own generator (0 for greedy rows)."""
        return [rng.random() if sampled else 0.0 for sampled, rng in zip(self.sampled, rngs)]


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
        uniforms: Each row's number in [0, 1) (SamplingColumns.uniforms), used by sampled rows.
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


def sample_batch(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    seen: Sequence[Sequence[int]],
    rngs: Sequence[UniformSource],
    allowed: Sequence[int],
    compiled: bool = True,
) -> list[int]:
    """draw() for rows given as SamplingParams and generators."""
    columns = SamplingColumns.of(params)
    return draw(logits, columns, seen, columns.uniforms(rngs), allowed, compiled)


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


def sample_next(
    logits: np.ndarray, params: SamplingParams, seen: Sequence[int], rng: UniformSource, allowed: int
) -> int:
    """Chooses the next token from one row of logits (sample_batch for a batch of one)."""
    return sample_batch(logits[None, :], [params], [seen], [rng], [allowed])[0]


class StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s.encode("utf-8") for s in stops]
        self.buffer = bytearray()
        self.emitted = 0

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Adds output bytes; returns the bytes now safe to emit and whether a stop string was hit."""
        if not self.stops:
            return data, False
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


