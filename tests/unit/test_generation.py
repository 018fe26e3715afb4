"""The generation scheduler on a small exported decoder: continuous batching, sampling, stops, cancellation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.models import decoder as dec
from server.core.errors import DeadlineExceededError, InvalidInputError, QueueFullError
from server.core.generation import GenerationScheduler, SamplingParams, StopMatcher, TokenChunk, sample_next
from server.runtime.onnx import OnnxRuntimeSession, SessionOptions

TINY = dec.DecoderConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, context_length=96)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    return dec.export(dec.Decoder(TINY).eval(), tmp_path_factory.mktemp("gen"))


@pytest.fixture()
def scheduler(model_dir: Path) -> GenerationScheduler:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    info = json.loads((model_dir / "generation.json").read_text())
    return GenerationScheduler(session, info, max_num_seqs=8, max_queued=4)


async def collect(scheduler: GenerationScheduler, prompt: bytes, params: SamplingParams) -> list[TokenChunk]:
    return [chunk async for chunk in scheduler.generate(prompt, params)]


def output_ids(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_greedy_stream_equals_the_reference_decoder(scheduler) -> None:
    chunks = await collect(scheduler, b"def ", SamplingParams(temperature=0.0, max_tokens=16))
    reference = dec.greedy_completion(scheduler.runtime, TINY, b"def ", 16)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert bytes(t for t in output_ids(chunks) if t < 256) == reference
    assert chunks[-1].prompt_tokens == 4


async def test_max_tokens_gives_length_and_exact_counts(scheduler) -> None:
    chunks = await collect(scheduler, b"x = ", GREEDY)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 24 and len(output_ids(chunks)) <= 24


async def test_seed_gives_the_same_tokens_whatever_shares_the_batch(scheduler) -> None:
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    alone = output_ids(await collect(scheduler, b"import ", params))
    others = [collect(scheduler, p, SamplingParams(seed=i, max_tokens=30, ignore_eos=True)) for i, p in enumerate([b"a", b"class B:", b"    return "])]
    mixed, *_ = await asyncio.gather(collect(scheduler, b"import ", params), *others)
    assert output_ids(mixed) == alone


async def test_admission_while_others_decode(scheduler) -> None:
    alone = output_ids(await collect(scheduler, b"for i in ", GREEDY))
    first = asyncio.create_task(collect(scheduler, b"while True:", SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)))
    while scheduler.steps < 5:
        await asyncio.sleep(0.001)
    joined = await collect(scheduler, b"for i in ", GREEDY)
    assert not first.done()  # it was decoding when the second one joined
    await first
    assert output_ids(joined) == alone


def example_scheduler() -> GenerationScheduler:
    """The committed example decoder (it writes ASCII, and a step takes milliseconds)."""
    model_dir = Path(__file__).resolve().parents[2] / "model_repository" / "bytes_decoder"
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    return GenerationScheduler(session, json.loads((model_dir / "generation.json").read_text()))


async def test_stop_string_split_across_tokens() -> None:
    # The example model writes ASCII, so a stop string spans several byte tokens.
    scheduler = example_scheduler()
    plain = "".join(c.text for c in await collect(scheduler, b"def ", GREEDY))
    stop = plain[6:9]
    assert len(stop.encode()) == 3
    chunks = await collect(scheduler, b"def ", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,)))
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == plain[: plain.find(stop)]


def test_stop_matcher_holds_back_a_possible_prefix() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed(b"abE") == (b"ab", False)
    assert matcher.feed(b"N") == (b"", False)
    assert matcher.feed(b"x") == (b"ENx", False)
    assert matcher.feed(b"yEND") == (b"y", True)


def test_sampling_options_on_fixed_logits() -> None:
    logits = np.array([1.0, 3.0, 2.9, -1.0, 0.5])
    rng = np.random.default_rng(0)
    assert sample_next(logits, SamplingParams(temperature=0.0), [], rng, 5) == 1
    assert sample_next(logits, SamplingParams(top_k=1), [], rng, 5) == 1
    assert sample_next(logits, SamplingParams(top_p=1e-6), [], rng, 5) == 1
    assert sample_next(logits, SamplingParams(temperature=0.0, repetition_penalty=1.2), [1], rng, 5) == 2
    assert sample_next(logits, SamplingParams(temperature=0.0), [], rng, 1) == 0  # ids >= allowed never chosen
    picks = {sample_next(logits, SamplingParams(top_k=2, temperature=5.0), [], rng, 5) for _ in range(200)}
    assert picks == {1, 2}
    draws = [sample_next(logits, SamplingParams(temperature=1.0), [], np.random.default_rng(7), 5) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    with pytest.raises(InvalidInputError, match="top_p"):
        SamplingParams(top_p=0).check()
    with pytest.raises(InvalidInputError, match="temperature"):
        SamplingParams(temperature=-1).check()


async def test_cancelled_streams_stop_costing_steps_within_one_step(scheduler) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    generators = [scheduler.generate(f"s{i} = ".encode(), params) for i in range(8)]
    counts = [0] * 8
    for _ in range(10):
        for i, gen in enumerate(generators):
            counts[i] += len((await gen.__anext__()).token_ids)
    for gen in generators[::2]:
        await gen.aclose()  # the client leaves mid-stream
    cancelled = [s for s in scheduler._active if s.cancelled]
    finished = []
    for gen in generators[1::2]:
        finished.append([c async for c in gen])
    for i, chunks in zip(range(1, 8, 2), finished):
        # The others finish with exactly their requested token counts.
        assert counts[i] + len(output_ids(chunks)) == 40
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 40
    assert cancelled and all(s.steps_after_cancel <= 1 for s in cancelled)
    for _ in range(100):
        if scheduler.active == 0:
            break
        await asyncio.sleep(0.01)
    assert scheduler.active == 0  # finished streams leave the batch


async def test_queue_full_and_bad_prompts(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    info = json.loads((model_dir / "generation.json").read_text())
    scheduler = GenerationScheduler(session, info, max_num_seqs=1, max_queued=1)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    running = asyncio.create_task(collect(scheduler, b"a", params))
    while scheduler.active == 0:
        await asyncio.sleep(0.001)
    waiting = asyncio.create_task(collect(scheduler, b"b", params))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):
        await collect(scheduler, b"c", params)
    await asyncio.gather(running, waiting)
    with pytest.raises(InvalidInputError, match="context"):
        await collect(scheduler, b"x" * 200, params)


async def test_deadline_bounds_the_whole_stream() -> None:
    scheduler = example_scheduler()  # a model large enough that 200 steps take far longer than 20 ms
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    received = 0
    with pytest.raises(DeadlineExceededError):
        async for chunk in scheduler.generate(b"slow ", params, deadline_s=0.02):
            received += len(chunk.token_ids)
    assert received < 200


async def test_token_budget_bounds_admission(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    info = json.loads((model_dir / "generation.json").read_text())
    # Each stream reserves 2 prompt tokens + 20 output tokens = 22: a budget of 50 fits two at a time.
    scheduler = GenerationScheduler(session, info, max_num_seqs=8, max_batch_tokens=50)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, scheduler.active)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(collect(scheduler, bytes([65 + i]), params) for i in range(5)))
    watcher.cancel()
    assert all(r[-1].completion_tokens == 20 for r in results)
    assert peak == 2


async def test_stream_interval_groups_tokens_per_message(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    info = json.loads((model_dir / "generation.json").read_text())
    scheduler = GenerationScheduler(session, info, stream_interval=4)
    one_by_one = GenerationScheduler(session, info, stream_interval=1)
    params = SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True)
    grouped = await collect(scheduler, b"abc", params)
    single = await collect(one_by_one, b"abc", params)
    assert output_ids(grouped) == output_ids(single)  # same tokens, fewer messages
    assert "".join(c.text for c in grouped) == "".join(c.text for c in single)
    assert all(len(c.token_ids) >= 4 for c in grouped[:-1]) and len(grouped) < len(single)


def test_min_tokens_keeps_eos_out_until_reached() -> None:
    logits = np.array([0.0, 1.0, 9.0])  # token 2 plays EOS here, and it is the favourite
    rng = np.random.default_rng(0)
    assert sample_next(logits, SamplingParams(temperature=0.0), [], rng, 2) == 1
    assert sample_next(logits, SamplingParams(temperature=0.0), [], rng, 3) == 2
