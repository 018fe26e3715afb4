"""The decode batch as a value: rows, their KV caches, attention mask and next positions.

A decoder with a KV cache (see exporters/models/decoder.py) takes, per layer, a key and a
value cache shaped [batch, heads, past, head_dim], an attention mask [batch, past + new] and
position ids [batch, new]. Rows of different lengths share one batch by padding on the left:
a row's real columns are its last ones, and the mask is 0 over its padding. This module owns
that arithmetic (concatenate batches, filter rows out, feed one step and take its outputs)
so that the scheduler which drives the batch only decides *when* rows come and go.

It knows nothing of threads, event loops or what a row is: rows are carried, never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

from server.core.sampling import SamplingColumns

Row = TypeVar("Row")

# A filter leaves leading columns that no row attends to; dropping them copies every cache
# once (a column view is not contiguous), so it is done only when they are at least
# 1 / TRIM_FRACTION of the batch's width.
TRIM_FRACTION = 8


def prompt_inputs(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prefill tensors of prompts run together: ids, mask and positions, padded on the left.

    Padding takes `pad_id` (any valid id: the mask hides it) and position 0; each prompt's
    positions count from 0 at its first real token.
    """
    length = max((len(p) for p in prompts), default=0)
    ids = np.full((len(prompts), length), pad_id, np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, positions


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


def empty_caches(rows: int, layers: int, heads: int, head_dim: int) -> list[np.ndarray]:
    """Past caches of length 0 (a prefill's), key then value for each layer."""
    return [np.zeros((rows, heads, 0, head_dim), np.float32) for _ in range(2 * layers)]


class DecodeBatch(Generic[Row]):
    """Rows decoding together, with the arrays the next decode step feeds the model.

    Invariants: `caches` are 2 * layers arrays [len(rows), heads, width, head_dim] (key and
    value per layer; none in an empty batch), `mask` is [len(rows), width] with each row's zeros (its padding) before
    its ones, `positions` [len(rows)] is each row's next position. `columns` caches the rows'
    sampling settings for whoever samples them; it is None after any change of rows.

    Operations may reuse or change the arrays of the batches they are given: a batch passed to
    concatenate(), or filtered, is the result's from then on.
    """

    def __init__(
        self, rows: list[Row], caches: list[np.ndarray], mask: np.ndarray, positions: np.ndarray
    ) -> None:
        self.rows = rows
        self.caches = caches
        self.mask = mask
        self.positions = positions
        self.columns: SamplingColumns | None = None

    @classmethod
    def empty(cls) -> DecodeBatch[Row]:
        """A batch of no rows."""
        return cls([], [], np.zeros((0, 0), np.int64), np.zeros(0, np.int64))

    @classmethod
    def prefilled(
        cls, rows: list[Row], caches: list[np.ndarray], mask: np.ndarray, positions: np.ndarray
    ) -> DecodeBatch[Row]:
        """The batch of rows just prefilled together: the model's present caches for the prompt
        tensors `mask` and `positions` (see prompt_inputs); each row goes on after its last position."""
        return cls(list(rows), caches, mask, positions[:, -1] + 1)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Columns of the caches and the mask: the longest row's length, padding included."""
        return int(self.mask.shape[1])

    @classmethod
    def concatenate(cls, batches: Sequence[DecodeBatch[Row]]) -> DecodeBatch[Row]:
        """One batch of the rows of `batches`, in order, in one copy of each cache.

        Shorter batches are padded on the left (zeros in caches and mask) to the widest.
        Empty batches are skipped; a single non-empty one is returned as is, uncopied.
        """
        pieces = [b for b in batches if len(b)]
        if not pieces:
            return cls.empty()
        if len(pieces) == 1:
            return pieces[0]
        rows = sum(len(piece) for piece in pieces)
        total = max(piece.width for piece in pieces)
        caches = []
        for k in range(len(pieces[0].caches)):
            first = pieces[0].caches[k]
            out = np.empty((rows, first.shape[1], total, first.shape[3]), first.dtype)
            row = 0
            for piece in pieces:
                length = piece.caches[k].shape[2]
                out[row : row + len(piece), :, : total - length] = 0
                out[row : row + len(piece), :, total - length :] = piece.caches[k]
                row += len(piece)
            caches.append(out)
        mask = np.zeros((rows, total), np.int64)
        row = 0
        for piece in pieces:
            mask[row : row + len(piece), total - piece.width :] = piece.mask
            row += len(piece)
        positions = np.concatenate([piece.positions for piece in pieces])
        return cls([r for piece in pieces for r in piece.rows], caches, mask, positions)

    def filter(self, keep: Sequence[bool]) -> None:
        """Keeps the rows whose `keep` is true, in place.

        Copying every cache to close the gaps would cost about as much as a decode step, so
        the last kept rows move into the gaps instead (kept rows may change order: the i-th
        gap takes the i-th kept row after the new end), and every array is then cut to its
        first rows: a view that is still contiguous, which ONNX Runtime takes as is. Leading
        columns no kept row attends to are then dropped when they are worth a copy.
        """
        if all(keep):
            return
        self.columns = None
        live = sum(1 for k in keep if k)
        if live == 0:
            self.rows, self.caches = [], []
            self.mask, self.positions = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
            return
        holes = [i for i in range(live) if not keep[i]]
        movers = [i for i in range(live, len(keep)) if keep[i]]
        if holes:
            for cache in self.caches:
                cache[holes] = cache[movers]
            self.mask[holes] = self.mask[movers]
            self.positions[holes] = self.positions[movers]
            for hole, mover in zip(holes, movers, strict=True):
                self.rows[hole] = self.rows[mover]
        self.rows = self.rows[:live]
        self.caches = [c[:live] for c in self.caches]
        self.mask = self.mask[:live]
        self.positions = self.positions[:live]
        self._trim_padding()

    def _trim_padding(self) -> None:
        used = np.flatnonzero(self.mask.any(axis=0))
        start = int(used[0]) if used.size else self.width
        if start * TRIM_FRACTION >= self.width:
            self.caches = [np.ascontiguousarray(c[:, :, start:]) for c in self.caches]
            self.mask = self.mask[:, start:]

    def step_inputs(self, last_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ids, mask and positions of one decode step that feeds each row its `last_tokens` entry.

        The mask has one more column (the new token) and is what advance() takes back.
        """
        ids = np.array([[token] for token in last_tokens], np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        return ids, mask, self.positions[:, None]

    def advance(self, caches: list[np.ndarray], mask: np.ndarray) -> None:
        """Takes a decode step's outputs: its present caches and the mask step_inputs() gave it."""
        self.caches, self.mask, self.positions = caches, mask, self.positions + 1
