"""The decode batch's operations on their own, with numpy arrays standing in for the model.

A fake model step writes, for each row, cache values that are a function of the row, the cache
(layer key or value), head, position and channel only. So whatever padding, merging and
filtering happened, every row's attended columns must hold exactly its own values: a batch
reached by merging then filtering must equal the survivors' batch built directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporters.models import decoder as dec
from server.core.decode_batch import DecodeBatch, empty_caches, plan_prefill, prompt_inputs

EXAMPLE_INFO = json.loads(
    (Path(__file__).resolve().parents[2] / "model_repository" / "bytes_decoder" / "generation.json").read_text()
)
TINY = dec.DecoderConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, context_length=96)  # test_generation's
# (layers, heads, head_dim): the committed example decoder, the unit tests' tiny one, the smallest.
LAYOUTS = [
    (EXAMPLE_INFO["num_layers"], EXAMPLE_INFO["num_heads"], EXAMPLE_INFO["head_dim"]),
    (TINY.n_layers, TINY.n_heads, TINY.head_dim),
    (1, 1, 1),
]
PAD = 257


class Model:
    """A stand-in decoder: which rows are which is told by `lengths` (row -> prompt length)."""

    def __init__(self, layers: int, heads: int, head_dim: int) -> None:
        self.layers, self.heads, self.head_dim = layers, heads, head_dim

    def values(self, row: int, k: int, positions: range) -> np.ndarray:
        """Row `row`'s cache `k` at `positions`: [heads, len(positions), head_dim]."""
        h = np.arange(self.heads)[:, None, None]
        p = np.array(positions)[None, :, None]
        d = np.arange(self.head_dim)[None, None, :]
        return np.sin(row * 7.13 + k * 3.31 + h * 1.7 + p * 0.37 + d * 0.011).astype(np.float32)

    def prefill(self, rows: list[int], lengths: dict[int, int], rng: np.random.Generator) -> DecodeBatch[int]:
        """The batch of `rows` prefilled together; padding columns hold junk (as a real model's do)."""
        ids, mask, positions = prompt_inputs([[1] * lengths[r] for r in rows], PAD)
        assert ids.shape == mask.shape == positions.shape
        width = mask.shape[1]
        caches = []
        for k in range(2 * self.layers):
            cache = rng.standard_normal((len(rows), self.heads, width, self.head_dim)).astype(np.float32)
            for i, r in enumerate(rows):
                cache[i, :, width - lengths[r] :] = self.values(r, k, range(lengths[r]))
            caches.append(cache)
        empty = empty_caches(len(rows), self.layers, self.heads, self.head_dim)  # the scheduler's prefill input
        assert [c.shape[:2] + c.shape[3:] for c in caches] == [e.shape[:2] + e.shape[3:] for e in empty]
        return DecodeBatch.prefilled(rows, caches, mask, positions)

    def step(self, batch: DecodeBatch[int]) -> None:
        """One decode step of every row, as the scheduler runs it."""
        ids, mask, positions = batch.step_inputs([r % 256 for r in batch.rows])
        assert ids.shape == positions.shape == (len(batch), 1) and mask.shape == (len(batch), batch.width + 1)
        assert all(c.flags.c_contiguous for c in batch.caches)  # what ONNX Runtime is given
        rows_at = list(zip(batch.rows, positions[:, 0].tolist(), strict=True))
        new = [np.stack([self.values(r, k, range(p, p + 1)) for r, p in rows_at]) for k in range(2 * self.layers)]
        batch.advance([np.concatenate([c, n], axis=2) for c, n in zip(batch.caches, new, strict=True)], mask)


def check(batch: DecodeBatch[int], model: Model, lengths: dict[int, int], steps: dict[int, int]) -> None:
    """The batch's invariants, and that every row attends to exactly its own values."""
    n, width = len(batch), batch.width
    assert len(set(batch.rows)) == n
    assert batch.mask.shape == (n, width) and batch.positions.shape == (n,)
    assert len(batch.caches) == (2 * model.layers if n else 0)  # an empty batch has no arrays to pad
    for cache in batch.caches:
        assert cache.shape == (n, model.heads, width, model.head_dim) and cache.flags.c_contiguous
    for i, r in enumerate(batch.rows):
        length = lengths[r] + steps[r]
        assert batch.mask[i].tolist() == [0] * (width - length) + [1] * length  # padding, then the row
        assert batch.positions[i] == length
        for k, cache in enumerate(batch.caches):
            np.testing.assert_array_equal(cache[i, :, width - length :], model.values(r, k, range(length)))


def same_rows(a: DecodeBatch[int], b: DecodeBatch[int]) -> None:
    """Same rows, each with the same attended cache columns, mask and next position."""
    assert sorted(a.rows) == sorted(b.rows)
    where = {r: i for i, r in enumerate(b.rows)}
    for i, r in enumerate(a.rows):
        j = where[r]
        assert a.positions[i] == b.positions[j]
        used = int(a.mask[i].sum())
        assert used == int(b.mask[j].sum())
        for ca, cb in zip(a.caches, b.caches, strict=True):
            np.testing.assert_array_equal(ca[i, :, a.width - used :], cb[j, :, b.width - used :])


def build(model: Model, groups: list[list[int]], old: list[int], lengths: dict[int, int], old_steps: int,
          rng: np.random.Generator) -> DecodeBatch[int]:
    """The scheduler's way: `old` rows prefilled then stepped, then new groups prefilled and merged in front."""
    batch: DecodeBatch[int] = DecodeBatch.empty()
    if old:
        batch = model.prefill(old, lengths, rng)
        for _ in range(old_steps):
            model.step(batch)
    return DecodeBatch.concatenate([*(model.prefill(g, lengths, rng) for g in groups if g), batch])


# New prefill groups (row ids), rows already decoding, prompt lengths, steps the old rows ran, which rows
# stay (in merged order), seed of the padding junk.
Scenario = tuple[list[list[int]], list[int], dict[int, int], int, list[bool], int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    groups = draw(st.lists(st.lists(st.just(0), min_size=1, max_size=4), min_size=0, max_size=3))
    old_count = draw(st.integers(0, 5))
    rows = iter(range(1000))
    groups = [[next(rows) for _ in g] for g in groups]
    old = [next(rows) for _ in range(old_count)]
    everyone = [r for g in groups for r in g] + old
    lengths = {r: draw(st.integers(1, 12)) for r in everyone}
    keep = draw(st.lists(st.booleans(), min_size=len(everyone), max_size=len(everyone)))
    return groups, old, lengths, draw(st.integers(0, 20)), keep, draw(st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_merge_then_filter_equals_building_the_survivors_directly(
    layout: tuple[int, int, int], scenario: Scenario
) -> None:
    groups, old, lengths, old_steps, keep, seed = scenario
    model = Model(*layout)
    rng = np.random.default_rng(seed)
    merged = build(model, groups, old, lengths, old_steps, rng)
    steps = {r: 0 for g in groups for r in g} | {r: old_steps for r in old}
    # Merged in front: the new groups' rows in order, then the rows already there.
    assert merged.rows == [r for g in groups for r in g] + old
    check(merged, model, lengths, steps)
    keep_of = dict(zip(merged.rows, keep, strict=True))
    merged.filter(keep)
    survivors = [r for r in keep_of if keep_of[r]]
    direct = build(model, [[r for r in g if keep_of[r]] for g in groups], [r for r in old if keep_of[r]],
                   lengths, old_steps, rng)
    check(merged, model, lengths, steps)
    check(direct, model, lengths, steps)
    same_rows(merged, direct)
    assert sorted(merged.rows) == sorted(survivors)
    if not survivors:
        return  # the scheduler runs no step on an empty batch
    # Both go on decoding alike.
    for batch in (merged, direct):
        model.step(batch)
    check(merged, model, lengths, {r: s + 1 for r, s in steps.items()})
    same_rows(merged, direct)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
def test_filter_moves_the_last_kept_rows_into_the_gaps(layout: tuple[int, int, int]) -> None:
    model = Model(*layout)
    lengths = {r: 3 + r for r in range(6)}
    batch = model.prefill(list(range(6)), lengths, np.random.default_rng(0))
    batch.filter([False, True, False, True, True, False])
    assert batch.rows == [3, 1, 4]  # rows 3 and 4 fill the gaps at 0 and 2; row 1 does not move
    check(batch, model, lengths, dict.fromkeys(lengths, 0))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
def test_filtering_nothing_changes_nothing(layout: tuple[int, int, int]) -> None:
    model = Model(*layout)
    batch = model.prefill([0, 1, 2], {0: 2, 1: 5, 2: 1}, np.random.default_rng(0))
    batch.columns = object()  # type: ignore[assignment]  # whatever the sampler cached stays valid
    caches, mask, columns = batch.caches, batch.mask, batch.columns
    batch.filter([True, True, True])
    assert batch.rows == [0, 1, 2] and batch.caches is caches and batch.mask is mask and batch.columns is columns
    batch.filter([True, False, True])
    assert batch.columns is None  # the rows changed: the sampler must rebuild its columns


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
def test_filtering_everything_leaves_an_empty_batch_that_takes_new_rows(layout: tuple[int, int, int]) -> None:
    model = Model(*layout)
    lengths = {0: 4, 1: 7, 2: 2}
    batch = model.prefill([0, 1], lengths, np.random.default_rng(0))
    model.step(batch)
    batch.filter([False, False])
    assert len(batch) == 0 and not batch and batch.width == 0 and batch.caches == [] and batch.positions.shape == (0,)
    batch = DecodeBatch.concatenate([model.prefill([2], lengths, np.random.default_rng(1)), batch])
    check(batch, model, lengths, {2: 0})


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
def test_merging_into_an_empty_batch_takes_the_new_one_as_is(layout: tuple[int, int, int]) -> None:
    model = Model(*layout)
    piece = model.prefill([0, 1], {0: 3, 1: 6}, np.random.default_rng(0))
    assert DecodeBatch.concatenate([piece, DecodeBatch.empty()]) is piece  # no copy
    assert DecodeBatch.concatenate([DecodeBatch.empty(), piece]) is piece
    nothing: DecodeBatch[int] = DecodeBatch.concatenate([DecodeBatch.empty(), DecodeBatch.empty()])
    assert len(nothing) == 0 and nothing.width == 0
    assert len(DecodeBatch.concatenate([])) == 0


def test_filter_trims_leading_padding_only_when_worth_a_copy() -> None:
    model = Model(2, 2, 4)
    # The 16-token row leaves: 15 of the 16 columns are padding of the 1-token row: trimmed.
    lengths = {0: 16, 1: 1, 2: 16, 3: 15}
    batch = model.prefill([0, 1], lengths, np.random.default_rng(0))
    batch.filter([False, True])
    assert batch.width == 1
    check(batch, model, lengths, {1: 0})
    # One padding column of 16 is below an eighth: left there (trimming would copy every cache).
    batch = model.prefill([2, 3], lengths, np.random.default_rng(0))
    batch.filter([False, True])
    assert batch.width == 16 and batch.mask[0, 0] == 0
    check(batch, model, lengths, {3: 0})


def test_step_inputs_feed_each_row_its_token_at_its_next_position() -> None:
    model = Model(1, 1, 2)
    batch = model.prefill([0, 1], {0: 2, 1: 4}, np.random.default_rng(0))
    ids, mask, positions = batch.step_inputs([11, 12])
    assert ids.tolist() == [[11], [12]] and positions.tolist() == [[2], [4]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    batch.advance([np.zeros((2, 1, 5, 2), np.float32)] * 2, mask)
    assert batch.positions.tolist() == [3, 5] and batch.width == 5


def test_prompt_inputs_pad_on_the_left() -> None:
    ids, mask, positions = prompt_inputs([[5, 6, 7], [8]], PAD)
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert plan_prefill([3, 3]) == [[0, 1]]
