"""Sampling from SamplingParams and random generators, for tests.

The server draws through server.core.sampling.draw with columns and uniform numbers the
generation scheduler keeps per batch; tests want the same draw from plain settings and a
generator per row, which is what these wrappers add. They hold no logic of their own beyond
turning generators into the uniform numbers draw() takes, exactly as the scheduler does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from server.core.sampling import SamplingColumns, SamplingParams, draw


class UniformSource(Protocol):
    """A row's own random generator: random.Random (what the scheduler uses: a draw costs about
    70 ns against 1 us for numpy's Generator) or numpy.random.Generator."""

    def random(self) -> float: ...


def uniforms(columns: SamplingColumns, rngs: Sequence[UniformSource]) -> list[float]:
    """One number in [0, 1) from each sampled row's own generator (0 for greedy rows), as the scheduler draws them."""
    return [rng.random() if sampled else 0.0 for sampled, rng in zip(columns.sampled, rngs, strict=True)]


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
    return draw(logits, columns, seen, uniforms(columns, rngs), allowed, compiled)


def sample_next(
    logits: np.ndarray, params: SamplingParams, seen: Sequence[int], rng: UniformSource, allowed: int
) -> int:
    """Chooses the next token from one row of logits (sample_batch for a batch of one)."""
    return sample_batch(logits[None, :], [params], [seen], [rng], [allowed])[0]
