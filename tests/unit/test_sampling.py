"""The compiled next-token draw (server/core/_sampling.c) against the numpy reference."""

from __future__ import annotations

import warnings

import numpy as np

from server.core import sampling
from server.core.sampling import SamplingParams
from tests.sampling_helpers import sample_batch


def test_the_compiled_draw_is_built() -> None:
    # scripts/setup.sh builds it (setup.py); without it every decode step pays ~150 us more.
    assert sampling._sampling is not None, "server/core/_sampling.c was not compiled: run scripts/setup.sh"


def _random_case(gen: np.random.Generator) -> tuple[np.ndarray, list[SamplingParams], list[list[int]], list[int]]:
    rows, vocab = int(gen.integers(1, 40)), int(gen.integers(2, 300))
    logits = (gen.standard_normal((rows, vocab)) * gen.uniform(0.1, 8)).astype(np.float32)
    if gen.random() < 0.2:  # exact ties at the top
        logits[:, gen.integers(0, vocab)] = logits.max()
    params = [
        SamplingParams(
            temperature=float(gen.choice([0.0, 0.5, 1.0, 1.7])),
            top_k=int(gen.choice([0, 1, 5, 40, 500])),
            top_p=float(gen.choice([1.0, 0.9, 0.5, 1e-6])),
            repetition_penalty=float(gen.choice([1.0, 1.3, 0.8])),
        )
        for _ in range(rows)
    ]
    seen = [gen.integers(0, vocab + 3, size=int(gen.integers(0, 20))).tolist() for _ in range(rows)]
    allowed = gen.integers(1, vocab + 1, size=rows).tolist()
    return logits, params, seen, allowed


def test_compiled_and_numpy_draws_choose_the_same_tokens() -> None:
    gen = np.random.default_rng(0)
    rows = 0
    for _ in range(600):
        logits, params, seen, allowed = _random_case(gen)
        seeds = gen.integers(0, 2**31, size=len(params))
        rngs = [np.random.default_rng(s) for s in seeds]
        fresh = [np.random.default_rng(s) for s in seeds]  # the same draws again, for the reference
        compiled = sample_batch(logits, params, seen, rngs, allowed)
        reference = sample_batch(logits, params, seen, fresh, allowed, compiled=False)
        assert compiled == reference
        rows += len(params)
    assert rows > 10_000


def test_compiled_draw_on_broken_logits_matches_numpy() -> None:
    # A broken model may emit NaN or infinities: no crash, and the same (arbitrary) choice.
    gen = np.random.default_rng(1)
    warnings.simplefilter("ignore", RuntimeWarning)
    for _ in range(200):
        logits = gen.standard_normal((5, 30)).astype(np.float32)
        logits[0, gen.integers(0, 30, 3)] = np.nan
        logits[1, :] = -np.inf
        logits[2, gen.integers(0, 30, 3)] = np.inf
        logits[3, gen.integers(0, 30, 3)] = -np.inf
        logits[4, :] = np.nan
        params = [
            SamplingParams(temperature=float(gen.choice([0.0, 1.0])), top_k=int(gen.choice([0, 1, 5])),
                           top_p=float(gen.choice([1.0, 0.6])))
            for _ in range(5)
        ]
        seeds = gen.integers(0, 1000, 5)
        compiled = sample_batch(logits, params, [()] * 5, [np.random.default_rng(s) for s in seeds], [30] * 5)
        fresh = [np.random.default_rng(s) for s in seeds]
        reference = sample_batch(logits, params, [()] * 5, fresh, [30] * 5, compiled=False)
        assert compiled == reference
        assert all(0 <= token < 30 for token in compiled)


def test_compiled_draw_rejects_bad_arguments() -> None:
    import pytest

    from server.core import _sampling

    logits = np.zeros((2, 4), np.float32)
    row = ([4, 4], [1.0, 1.0], [0, 0], [1.0, 1.0], [1.0, 1.0], [(), ()], [0.5, 0.5])
    assert _sampling.sample_rows(logits, *row) == [2, 2]  # four equal weights, draw 0.5 of their sum: id 2
    with pytest.raises(ValueError):
        _sampling.sample_rows(logits.astype(np.float64), *row)
    with pytest.raises(ValueError):
        _sampling.sample_rows(logits, [5, 4], *row[1:])  # beyond the vocabulary
    with pytest.raises(ValueError):
        _sampling.sample_rows(logits, [4], *row[1:])  # one item per row
    with pytest.raises(TypeError):
        _sampling.sample_rows(logits, ["x", 4], *row[1:])


def test_bounds_of_every_setting() -> None:
    import pytest

    from server.core.errors import InvalidInputError

    for bad in [
        dict(temperature=float("nan")), dict(temperature=float("inf")),
        dict(temperature=100.5), dict(temperature=-1e-9),
        dict(repetition_penalty=float("nan")), dict(repetition_penalty=0.0), dict(repetition_penalty=1e9),
        dict(top_p=float("nan")), dict(top_p=0.0), dict(top_p=1.01), dict(top_k=-1), dict(top_k=2**31),
        dict(max_tokens=0), dict(max_tokens=2**31), dict(min_tokens=65), dict(seed=2**64), dict(seed=-1),
        dict(stop=("",)), dict(stop=("s",) * 17), dict(stop=("é" * 65,)), dict(ignore_eos=1),
        dict(top_k=True), dict(temperature="1"),
    ]:
        with pytest.raises(InvalidInputError):
            SamplingParams(**bad).check()  # type: ignore[arg-type]
    for good in [
        dict(temperature=0.0), dict(temperature=100.0), dict(repetition_penalty=0.01), dict(repetition_penalty=100.0),
        dict(top_k=2**31 - 1), dict(stop=("x" * 128,) * 16), dict(seed=2**64 - 1), dict(min_tokens=64),
    ]:
        SamplingParams(**good).check()  # type: ignore[arg-type]


def test_tiny_temperatures_are_greedy_in_both_draws() -> None:
    logits = np.array([[1.0, 3.0, 2.9, -1.0, 0.5]], np.float32) * 1e3
    for compiled in (True, False):
        tiny = [SamplingParams(temperature=1e-300)]
        picks = sample_batch(logits, tiny, [[]], [np.random.default_rng(0)], [5], compiled)
        assert picks == [1]


def test_stop_matching_work_does_not_grow_with_the_number_of_stop_strings() -> None:
    from server.core.sampling import StopMatcher

    data = bytes(np.random.default_rng(0).integers(97, 100, 20_000, dtype=np.uint8))  # a, b, c only
    few = StopMatcher(["abcabcabcz"])
    many = StopMatcher(["abcabcabc" + chr(100 + i) + "x" * 100 for i in range(16)])
    for matcher in (few, many):
        out = b"".join(matcher.feed(data[i : i + 3])[0] for i in range(0, len(data), 3)) + matcher.flush()
        assert out == data  # nothing matched; everything held back was released
        # One transition per byte, plus failure steps that never outnumber the bytes fed.
        assert matcher.work <= 2 * len(data)


def test_stop_matcher_semantics() -> None:
    from server.core.sampling import StopMatcher

    matcher = StopMatcher(["END", "NDX"])
    assert matcher.feed(b"aEN") == (b"a", False)  # "EN" may start "END"; "N" may start "NDX"
    assert matcher.feed(b"DX") == (b"a"[:0], True)  # "END" completes first; the text before it was sent
    matcher = StopMatcher(["aab"])
    assert matcher.feed(b"aaa") == (b"a", False) and matcher.feed(b"b") == (b"", True)
    matcher = StopMatcher(["xyz"])
    assert matcher.feed(b"1xy") == (b"1", False) and matcher.flush() == b"xy"
    matcher = StopMatcher(["bc", "abcd"])
    assert matcher.feed(b"zabcd") == (b"za", True)  # the first stop string to complete wins
