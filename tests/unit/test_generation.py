"""The generation scheduler on a small exported decoder: continuous batching, sampling, stops, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporters.models import decoder as dec
from server.core.decode_batch import plan_prefill
from server.core.errors import DeadlineExceededError, InvalidInputError, QueueFullError, ServerError
from server.core.generation import GenerationScheduler, Stream, TokenChunk
from server.core.sampling import SamplingParams, StopMatcher
from server.runtime.base import Runtime
from server.runtime.onnx import OnnxRuntimeSession, SessionOptions
from tests.sampling_helpers import sample_batch, sample_next

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


async def wait_until(predicate, what: str, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Polls observable state; the generous timeout is only reached when something is broken."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


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
    others = [
        collect(scheduler, p, SamplingParams(seed=i, max_tokens=30, ignore_eos=True))
        for i, p in enumerate([b"a", b"class B:", b"    return "])
    ]
    mixed, *_ = await asyncio.gather(collect(scheduler, b"import ", params), *others)
    assert output_ids(mixed) == alone


async def test_admission_while_others_decode(scheduler, model_dir: Path) -> None:
    alone = output_ids(await collect(scheduler, b"for i in ", GREEDY))
    # The model is held between steps, so "the second stream joins while the first decodes" is a state the
    # test makes, not a race between the test's polling and the decode steps.
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    gated = GatedRuntime(session)
    held = GenerationScheduler(gated, json.loads((model_dir / "generation.json").read_text()), max_num_seqs=8)
    rows_per_run: list[int] = []
    gated.on_run = lambda: rows_per_run.append(len(held.running()))
    received: list[int] = []

    async def first_stream() -> None:
        long = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        async for chunk in held.generate(b"while True:", long):
            received.extend(chunk.token_ids)

    first = asyncio.create_task(first_stream())
    gated.permits.release(6)  # the prefill and five decode steps, then the model waits at the gate
    await wait_until(lambda: len(gated.batch_sizes) == 6 and gated.entered == 7, "six runs of the first stream")
    second = asyncio.create_task(collect(held, b"for i in ", GREEDY))
    await wait_until(lambda: held.load()[1] == 1, "the second stream to wait for a place")
    assert not first.done() and held.load()[0] == 1  # the first is mid-decode as the second arrives
    gated.permits.release(100_000)
    joined = await second
    await first
    assert len(received) == 60
    assert output_ids(joined) == alone
    # Both decoded in one batch: the first stream was still in it when the second was admitted.
    assert 2 in rows_per_run, rows_per_run
    held.close()


# The tokens the scheduler wrote for these streams before the decode batch had its own module
# (recorded once; batch-invariant, so the same alone or together): same seeds, same tokens.
RECORDED_PROMPTS = [b"def ", b"import numpy as np\n", b"x", b"class Node:\n    def ", b"for i in range(10):\n"]
RECORDED_TOKENS = [
    [105, 110, 116, 104, 101, 32, 99, 104],
    [32] * 13,
    [95, 102, 105, 115, 40, 41, 10] + [32] * 11,
    [97, 115, 115, 116, 97, 109, 111, 114, 40, 111, 110, 111, 99, 101, 116, 101, 44, 32, 111, 100, 101, 110, 97],
    [32] * 28,
]


async def test_seeded_streams_write_the_recorded_tokens() -> None:
    scheduler = example_scheduler()
    params = [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=11 + i, max_tokens=8 + 5 * i, ignore_eos=True,
                       repetition_penalty=1.0 + 0.1 * (i % 2))
        for i in range(len(RECORDED_PROMPTS))
    ]
    # Together: different prompt lengths merged, rows leaving at different steps (max_tokens differ).
    together = await asyncio.gather(*(collect(scheduler, p, q) for p, q in zip(RECORDED_PROMPTS, params, strict=True)))
    assert [output_ids(c) for c in together] == RECORDED_TOKENS
    alone = [output_ids(await collect(scheduler, p, q)) for p, q in zip(RECORDED_PROMPTS[:2], params[:2], strict=True)]
    assert alone == RECORDED_TOKENS[:2]
    scheduler.close()


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
    stopped = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,))
    chunks = await collect(scheduler, b"def ", stopped)
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == plain[: plain.find(stop)]


async def test_text_held_back_for_a_stop_string_is_sent_when_the_stream_ends_otherwise() -> None:
    # "de" may start the stop string "dex": held back, then sent when the stream ends by
    # length or by the end-of-sequence token (the stop string was never completed).
    scheduler = example_scheduler()
    loop = asyncio.get_running_loop()

    def stream(params: SamplingParams) -> Any:
        return Stream(
            prompt_ids=[scheduler.tokenizer.bos_id], prompt_tokens=0, params=params, rng=random.Random(0),
            deadline=None, loop=loop, queue=asyncio.Queue(), stops=StopMatcher(params.stop),
            max_output=params.max_tokens, detokenizer=scheduler.tokenizer.detokenizer(),
        )

    by_length = stream(SamplingParams(max_tokens=3, stop=("dex",)))
    chunks = [scheduler._accept(by_length, token, 1) for token in b"ade"]
    assert [c.text if c else None for c in chunks] == ["a", None, "de"]
    assert chunks[-1] is not None and chunks[-1].finish_reason == "length"
    assert chunks[-1].token_ids == [ord("d"), ord("e")] and chunks[-1].completion_tokens == 3
    by_eos = stream(SamplingParams(max_tokens=9, stop=("dex",)))
    chunks = [scheduler._accept(by_eos, token, 1) for token in [*b"ade", scheduler.eos_ids[0]]]
    assert chunks[-1] is not None and (chunks[-1].text, chunks[-1].finish_reason) == ("de", "stop")
    assert chunks[-1].completion_tokens == 3  # the end-of-sequence token is not counted
    by_stop = stream(SamplingParams(max_tokens=9, stop=("dex",)))
    chunks = [scheduler._accept(by_stop, token, 1) for token in b"adex"]
    assert chunks[-1] is not None and (chunks[-1].text, chunks[-1].finish_reason) == ("", "stop")
    scheduler.close()


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
    with pytest.raises(InvalidInputError, match="seed"):
        SamplingParams(seed=-5).check()


class GatedRuntime(Runtime):
    """The decoder, run one step per permit the test hands out; records each run's batch size."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.inputs, self.outputs, self.providers = inner.inputs, inner.outputs, inner.providers
        self.permits = threading.Semaphore(0)
        self.batch_sizes: list[int] = []
        self.entered = 0  # runs that reached the gate, including one waiting for its permit
        self.on_run: Any = None  # called on the model thread as each run passes the gate

    def run(self, inputs, output_names):  # type: ignore[override]
        self.entered += 1
        self.permits.acquire()
        self.batch_sizes.append(len(inputs["input_ids"]))
        if self.on_run is not None:
            self.on_run()
        return self.inner.run(inputs, output_names)


async def test_cancelling_half_of_64_streams_frees_their_rows_within_one_step(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    gated = GatedRuntime(session)
    info = json.loads((model_dir / "generation.json").read_text())
    scheduler = GenerationScheduler(gated, info, max_num_seqs=64, stream_interval=1)
    params = SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True)
    received: list[list[int]] = [[] for _ in range(64)]
    # The streams in the batch during each run, by the scheduler's own account (no prefill
    # runs after the cancels: all 64 are admitted by then, so these are decode steps).
    rows_per_run: list[list[Stream]] = []
    gated.on_run = lambda: rows_per_run.append(scheduler.running())

    async def consume(i: int) -> list[TokenChunk]:
        chunks = []
        async for chunk in scheduler.generate(f"s{i} = ".encode(), dataclasses.replace(params, seed=i)):
            received[i] += chunk.token_ids
            chunks.append(chunk)
        return chunks

    tasks = [asyncio.create_task(consume(i)) for i in range(64)]

    async def until(condition) -> None:  # type: ignore[no-untyped-def]
        for _ in range(12_000):  # 60 s
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("timed out")

    def waiting() -> bool:  # the model thread waits at the gate for its next permit
        return gated.entered == len(gated.batch_sizes) + 1

    # Hand out steps one at a time until every stream is 10 tokens in. Each permit is taken
    # before the next is given, so none is banked: a banked permit would let the thread run
    # full-batch steps while the test cancels, however the machine's threads are scheduled.
    await until(waiting)
    while min(len(r) for r in received) < 10:
        runs = len(gated.batch_sizes)
        gated.permits.release()
        await until(lambda runs=runs: len(gated.batch_sizes) > runs and waiting())
    # The model thread is now waiting for a permit: the batch holds all 64 streams.
    streams = scheduler.running()
    assert len(streams) == 64
    runs_before_cancel = len(gated.batch_sizes)
    for task in tasks[::2]:
        task.cancel()  # the client leaves mid-stream
    await asyncio.gather(*tasks[::2], return_exceptions=True)
    cancelled = [s for s in streams if s.cancelled]
    assert len(cancelled) == 32
    gated.permits.release(1000)
    survivors = await asyncio.gather(*tasks[1::2])
    for chunks in survivors:
        # The others finish with exactly their requested token counts.
        assert len(output_ids(chunks)) == 40
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 40
    # The step in flight when they left is the last one that carried their rows.
    assert len(rows_per_run) == len(gated.batch_sizes)
    steps_after_cancel = [sum(s in rows for rows in rows_per_run[runs_before_cancel:]) for s in cancelled]
    assert all(n <= 1 for n in steps_after_cancel), steps_after_cancel
    # Then every step carries the 32 survivors at most: fewer at the very end when the first
    # prefill took only some streams (they started a step earlier, so they finish earlier).
    after = gated.batch_sizes[runs_before_cancel + 1 :]
    assert after[0] == 32 and all(size <= 32 for size in after), f"{runs_before_cancel} {gated.batch_sizes}"
    await wait_until(lambda: scheduler.load()[0] == 0, "finished streams to leave the batch")
    # Rows moved into the places of cancelled ones kept their own caches: each survivor wrote
    # what it writes alone.
    gated.permits.release(100_000)
    for i in (1, 7, 33, 63):
        alone = await collect(scheduler, f"s{i} = ".encode(), dataclasses.replace(params, seed=i))
        assert output_ids(alone) == output_ids(survivors[i // 2])
    scheduler.close()


def test_batch_sampling_equals_row_by_row_sampling() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((24, 40)) * 3
    settings = [
        SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r)
        for t, k, p, r in zip(
            [0.0, 0.7, 1.0, 1.5] * 6, [0, 5, 1, 50, 0, 3] * 4, [1.0, 0.9, 0.5, 1e-6] * 6, [1.0, 1.3, 1.0] * 8,
            strict=True,
        )
    ]
    seen = [list(rng.integers(0, 40, 6)) for _ in settings]
    allowed = [40, 39] * 12
    batch = sample_batch(logits, settings, seen, [np.random.default_rng(i) for i in range(24)], allowed)
    one_by_one = [sample_next(logits[i], settings[i], seen[i], np.random.default_rng(i), allowed[i]) for i in range(24)]
    assert batch == one_by_one
    assert all(batch[i] < allowed[i] for i in range(24))


async def test_queue_full_and_bad_prompts(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    gated = GatedRuntime(session)  # no step runs until the test hands out permits
    info = json.loads((model_dir / "generation.json").read_text())
    scheduler = GenerationScheduler(gated, info, max_num_seqs=1, max_queued=1)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    running = asyncio.create_task(collect(scheduler, b"a", params))
    await wait_until(lambda: gated.entered == 1, "the first stream's prefill to start")
    waiting = asyncio.create_task(collect(scheduler, b"b", params))
    await wait_until(lambda: len(scheduler._waiting) == 1, "the second stream to wait")
    with pytest.raises(QueueFullError):
        await collect(scheduler, b"c", params)
    gated.permits.release(1000)
    await asyncio.gather(running, waiting)
    with pytest.raises(InvalidInputError, match="context"):
        await collect(scheduler, b"x" * 200, params)
    scheduler.close()


async def test_deadline_bounds_the_whole_stream(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    gated = GatedRuntime(session)
    scheduler = GenerationScheduler(gated, json.loads((model_dir / "generation.json").read_text()), stream_interval=1)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    received = 0
    gated.permits.release(5)  # five steps run, then the model is held past the deadline
    with pytest.raises(DeadlineExceededError):
        async for chunk in scheduler.generate(b"slow ", params, deadline_s=0.5):
            received += len(chunk.token_ids)
    assert received == 5
    gated.permits.release(1000)
    scheduler.close()


async def test_token_budget_bounds_admission(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    gated = GatedRuntime(session)  # records every run's batch size
    info = json.loads((model_dir / "generation.json").read_text())
    # Each stream reserves 2 prompt tokens + 20 output tokens = 22: a budget of 50 fits two at a time.
    scheduler = GenerationScheduler(gated, info, max_num_seqs=8, max_batch_tokens=50)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    streams = asyncio.gather(*(collect(scheduler, bytes([65 + i]), params) for i in range(5)))
    # Hold the first run until every stream has arrived: whatever the machine's speed, the
    # budget, not the arrival order, decides what shares a batch.
    await wait_until(lambda: gated.entered == 1 and len(scheduler._waiting) >= 3, "all five streams to arrive")
    gated.permits.release(100_000)
    results = await streams
    assert all(r[-1].completion_tokens == 20 for r in results)
    assert max(gated.batch_sizes) == 2
    scheduler.close()


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
    # The first token goes out alone (time to first token), then four tokens a message.
    assert len(grouped[0].token_ids) == 1
    assert all(len(c.token_ids) >= 4 for c in grouped[1:-1]) and len(grouped) < len(single)


class LargestDraw:
    """A generator whose every draw is the largest double below 1."""

    def random(self) -> float:
        return 1.0 - 2.0**-53


def test_the_largest_draw_still_lands_on_a_kept_token() -> None:
    logits = np.array([1.0, 3.0, 2.9, -1.0, 0.5])
    # Probabilities at temperature 1: 0.06, 0.47, 0.42, 0.01, 0.04 (ids 0-4).
    cases = [(SamplingParams(top_k=2), {1, 2}), (SamplingParams(top_p=0.5), {1, 2}),
             (SamplingParams(top_k=3, temperature=0.3), {0, 1, 2})]
    for params, kept in cases:
        assert sample_next(logits, params, [], LargestDraw(), 5) in kept  # type: ignore[arg-type]
    # Banned ids (here EOS = 4 before min_tokens) are never reached either.
    assert sample_next(logits, SamplingParams(temperature=2.0), [], LargestDraw(), 4) < 4  # type: ignore[arg-type]


def test_min_tokens_keeps_eos_out_until_reached() -> None:
    logits = np.array([0.0, 1.0, 9.0])  # token 2 plays EOS here, and it is the favourite
    rng = np.random.default_rng(0)
    assert sample_next(logits, SamplingParams(temperature=0.0), [], rng, 2) == 1
    assert sample_next(logits, SamplingParams(temperature=0.0), [], rng, 3) == 2


def test_prefill_plan_groups_prompts_of_similar_length() -> None:
    lengths = [3, 16, 4, 15, 3, 16, 4, 15]
    groups = plan_prefill(lengths, run_cost_tokens=10)
    assert sorted(i for g in groups for i in g) == list(range(8))  # every prompt exactly once
    assert [sorted(lengths[i] for i in g) for g in groups] == [[3, 3, 4, 4], [15, 15, 16, 16]]
    assert plan_prefill([5, 6, 5], run_cost_tokens=10) == [[0, 2, 1]]  # splitting would not pay
    assert plan_prefill([], run_cost_tokens=10) == []


async def test_prompts_of_mixed_lengths_admitted_together_decode_as_alone() -> None:
    scheduler = example_scheduler()
    prompts = [b"a", b"def f(x):", b"# ", b"import collections.abc\n", b"x", b"class Node:\n    def "]
    alone = [output_ids(await collect(scheduler, p, GREEDY)) for p in prompts]
    together = await asyncio.gather(*(collect(scheduler, p, GREEDY) for p in prompts))
    assert [output_ids(c) for c in together] == alone
    scheduler.close()


class FailingRuntime(GatedRuntime):
    """The decoder, except that chosen runs raise (a model that fails mid-stream)."""

    def __init__(self, inner: Runtime, failing_runs: set[int]) -> None:
        super().__init__(inner)
        self.permits.release(1_000_000)
        self.failing_runs = failing_runs

    def run(self, inputs, output_names):  # type: ignore[override]
        if len(self.batch_sizes) in self.failing_runs:
            self.batch_sizes.append(len(inputs["input_ids"]))
            raise RuntimeError("simulated kernel failure")
        return super().run(inputs, output_names)


async def test_a_failed_step_fails_its_streams_and_the_model_goes_on(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    failing = FailingRuntime(session, failing_runs={5})
    scheduler = GenerationScheduler(failing, json.loads((model_dir / "generation.json").read_text()))
    results = await asyncio.gather(*(collect(scheduler, p, GREEDY) for p in (b"a", b"b")), return_exceptions=True)
    assert all(isinstance(r, ServerError) and "simulated kernel failure" in str(r) for r in results)
    after = await collect(scheduler, b"a", GREEDY)  # the model thread survived the failure
    assert after[-1].finish_reason == "length" and after[-1].completion_tokens == 24
    scheduler.close()


async def test_a_row_whose_draw_fails_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The batched draw fails whenever a row carries top_k 77 (a stand-in for any per-row fault):
    # the scheduler then draws row by row, and only that row's stream fails.
    import server.core.generation as generation

    real_draw = generation.draw

    def draw(logits, columns, *args, **kwargs):  # type: ignore[no-untyped-def]
        if 77 in columns.top_ks:
            raise ValueError("simulated per-row failure")
        return real_draw(logits, columns, *args, **kwargs)

    monkeypatch.setattr(generation, "draw", draw)
    scheduler = example_scheduler()
    alone = [output_ids(await collect(scheduler, p, GREEDY)) for p in (b"a", b"def ", b"import ")]
    bad = SamplingParams(temperature=0.7, top_k=77, max_tokens=24, ignore_eos=True)
    results = await asyncio.gather(
        collect(scheduler, b"a", GREEDY), collect(scheduler, b"x", bad), collect(scheduler, b"def ", GREEDY),
        collect(scheduler, b"import ", GREEDY), return_exceptions=True,
    )
    assert isinstance(results[1], ServerError) and "failed for this request" in str(results[1])
    good = [results[0], results[2], results[3]]
    assert all(isinstance(r, list) and r[-1].finish_reason == "length" for r in good), good
    assert [output_ids(r) for r in good] == alone  # the others got exactly their own tokens
    scheduler.close()


async def test_a_row_whose_token_handling_fails_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = example_scheduler()
    real_accept = scheduler._accept

    def accept(stream: Stream, token: int, interval: int) -> TokenChunk | None:
        if stream.params.seed == 666 and len(stream.output_ids) == 5:
            raise RuntimeError("simulated failure")
        return real_accept(stream, token, interval)

    monkeypatch.setattr(scheduler, "_accept", accept)
    doomed = dataclasses.replace(GREEDY, seed=666)
    results = await asyncio.gather(
        collect(scheduler, b"a", GREEDY), collect(scheduler, b"b", doomed), collect(scheduler, b"c", GREEDY),
        return_exceptions=True,
    )
    assert isinstance(results[1], ServerError)
    assert all(isinstance(r, list) and r[-1].completion_tokens == 24 for r in (results[0], results[2]))
    scheduler.close()


async def test_busy_covers_waiting_and_active_streams(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    gated = GatedRuntime(session)
    scheduler = GenerationScheduler(gated, json.loads((model_dir / "generation.json").read_text()))
    assert not scheduler.busy
    task = asyncio.create_task(collect(scheduler, b"a", GREEDY))
    await wait_until(lambda: gated.entered == 1, "the prefill to reach the gate")
    assert scheduler.busy  # admitted, in its prefill (neither waiting nor in the batch yet)
    gated.permits.release(1000)
    await task
    assert not scheduler.busy
    scheduler.close()


async def test_max_tokens_beyond_the_context_is_refused(scheduler) -> None:
    with pytest.raises(InvalidInputError, match="context"):
        await collect(scheduler, b"a", SamplingParams(max_tokens=TINY.context_length + 1))


def _args(sampling: Any = None, parameters: dict | None = None, **tensors: Any):  # type: ignore[no-untyped-def]
    from server.core.generation_args import generation_args

    inputs = {"text_input": np.array([b"hi"], dtype=object)}
    if sampling is not None:
        text = sampling if isinstance(sampling, str) else json.dumps(sampling)
        inputs["sampling_parameters"] = np.array([text.encode()], dtype=object)
    inputs.update({k: np.array([v]) for k, v in tensors.items()})
    return generation_args(inputs, default_stream=True, parameters=parameters)


def test_generation_args_reads_every_source_and_refuses_conflicts() -> None:
    args = _args(
        {"temperature": 0.5, "stop": "x", "top_k": 40.0, "stream": False}, {"seed": 9, "min_tokens": 2},
        max_tokens=np.int32(7),
    )
    assert (args.params.temperature, args.params.stop, args.params.top_k, args.params.seed) == (0.5, ("x",), 40, 9)
    assert (args.params.max_tokens, args.params.min_tokens, args.stream) == (7, 2, False)
    assert _args(parameters={"triton_enable_empty_final_response": True, "priority": 0}).empty_final
    for sampling, parameters, tensors, match in [
        ({"max_tokens": 5}, None, {"max_tokens": np.int32(6)}, "given twice"),
        ({"stream": True}, None, {"stream": False}, "given twice"),
        (None, {"top_k": 3}, {}, None),
        ('{"temperature": NaN}', None, {}, "temperature"),
        ('{"top_k": 1e30}', None, {}, "top_k"),
        ('{"max_tokens": 1e400}', None, {}, "max_tokens"),
        ("[" * 5000 + "]" * 5000, None, {}, "nested"),
        ({"stop": ["a"] * 17}, None, {}, "16"),
        (None, {"sequence_id": 3}, {}, "sequence_id"),
        (None, {"timeout": 100}, {}, "timeout"),
        (None, {"temperature": True}, {}, "temperature"),
    ]:
        if match is None:
            assert _args(sampling, parameters, **tensors).params.top_k == 3
            continue
        with pytest.raises(InvalidInputError, match=match):
            _args(sampling, parameters, **tensors)
