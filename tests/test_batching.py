"""Dynamic batching through the real server: no request lost, mixed up or left waiting."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.gate import WAIT_S, Gate, wait_until


def digits_request(images: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits", id=request_id)
    request.inputs.add(name="image", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    request.outputs.add(name="logits")
    return request


def logits(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


def gated_request(rows: int, model: str = "gated_batched", value: float = 0.01, **params: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 512])
    request.raw_input_contents.append(np.full((rows, 512), value, np.float32).tobytes())
    for key, value in params.items():
        request.parameters[key].int64_param = value
    return request


def statistics(stub, model: str):  # type: ignore[no-untyped-def]
    return stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0]


async def test_many_clients_with_mixed_batch_sizes_each_get_their_own_answer(server, stub) -> None:
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 6, 160)]
    inputs = [rng.uniform(0, 16, (size, 1, 8, 8)).astype(np.float32) for size in sizes]
    expected = [logits(stub.ModelInfer(digits_request(x, "solo"))) for x in inputs]
    before = statistics(stub, "digits")
    async with grpc.aio.insecure_channel(server.address) as channel:
        aio_stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = await asyncio.gather(
            *(aio_stub.ModelInfer(digits_request(x, str(i)), timeout=60) for i, x in enumerate(inputs))
        )
    after = statistics(stub, "digits")
    for i, (response, want) in enumerate(zip(responses, expected, strict=True)):
        assert response.id == str(i)
        np.testing.assert_allclose(logits(response), want, rtol=1e-5, atol=1e-5)
    assert after.inference_count - before.inference_count == sum(sizes)
    assert after.inference_stats.success.count - before.inference_stats.success.count == len(sizes)
    # Whether these happened to share runs depends on the machine's speed; the test below
    # proves merging with requests the test holds in the queue.


# The gated_batched model runs only when the test releases its gate (tests/gate.py), so
# "the instance is busy" and "the queue (max_queue_size 1) is full" are states the test holds,
# whatever the machine's speed. Every wait is on something observable, with a generous timeout.


@pytest.fixture
def gate(repository) -> Gate:  # type: ignore[no-untyped-def]
    return repository.gates["gated_batched"]


def _occupy(stub, gate: Gate):  # type: ignore[no-untyped-def]
    """Starts a 256-row request and waits until its run holds the (only) instance at the gate."""
    seen = len(gate.entered())
    running = stub.ModelInfer.future(gated_request(256), timeout=WAIT_S)
    run = gate.wait_entered(seen)
    assert gate.rows(run) == 256
    return running, run


def _rows_run_since(stub, before) -> int:  # type: ignore[no-untyped-def]
    """Rows run since `before`, after a fresh 1-row request has gone through.

    The queue is first-in first-out: a request still queued would run with (or before)
    the fresh one, so once it has answered nothing older can run any more.
    """
    stub.ModelInfer(gated_request(1), timeout=WAIT_S)
    return statistics(stub, "gated_batched").inference_count - before.inference_count - 1


def test_requests_queued_behind_a_busy_instance_share_one_run_and_get_their_own_rows(repository, stub) -> None:  # type: ignore[no-untyped-def]
    # gated_pair: a queue of two. With its instance held, two requests are queued (seen by a
    # probe being refused: the queue is full), then the instance is let go: the next run holds
    # both (its row count says so) and each gets back exactly its own rows.
    gate = repository.gates["gated_pair"]
    out = lambda response: np.frombuffer(response.raw_output_contents[0], np.float32).reshape(-1, 512)  # noqa: E731
    alone = [
        out(stub.ModelInfer(gated_request(rows, "gated_pair", value), timeout=WAIT_S))
        for rows, value in ((2, 0.5), (3, -0.25))
    ]
    before = statistics(stub, "gated_pair")
    with gate.held():
        seen = len(gate.entered())
        running = stub.ModelInfer.future(gated_request(1, "gated_pair"), timeout=WAIT_S)
        first = gate.wait_entered(seen)
        pair = _queue_all(
            stub, [gated_request(2, "gated_pair", 0.5), gated_request(3, "gated_pair", -0.25)], "gated_pair"
        )
        gate.release(first)
        running.result()
        merged = gate.wait_entered(seen + 1)
        assert gate.rows(merged) == 5, gate.rows(merged)
    results = [out(future.result()) for future in pair]
    for got, want in zip(results, alone, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    after = statistics(stub, "gated_pair")
    assert after.execution_count - before.execution_count == 2
    assert after.inference_count - before.inference_count == 6
    assert any(b.batch_size == 5 for b in after.batch_stats)


def _queue_all(stub, requests: list, model: str):  # type: ignore[no-untyped-def]
    """Sends `requests` and waits until they fill the model's queue; returns their futures.

    A probe that comes in first holds a place for a moment; a request refused then is sent again.
    """
    deadline = time.monotonic() + WAIT_S
    futures = [stub.ModelInfer.future(r, timeout=WAIT_S) for r in requests]
    while time.monotonic() < deadline:
        full = _queue_is_full(stub, model)
        for i, future in enumerate(futures):
            if future.done():
                assert future.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED, future.exception()
                futures[i] = stub.ModelInfer.future(requests[i], timeout=WAIT_S)
                full = False
        if full:
            return futures
    raise AssertionError("the requests could not be queued")


def _queue_is_full(stub, model: str = "gated_batched") -> bool:  # type: ignore[no-untyped-def]
    """Probes the one-place queue while the instance is held.

    The probe asks for a 1 µs queue timeout, so when there is room it expires in the
    queue at once (and has left it before the answer comes); when the place is taken
    it is refused with RESOURCE_EXHAUSTED.
    """
    try:
        stub.ModelInfer(gated_request(1, model, timeout=1), timeout=WAIT_S)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED), exc
        return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    raise AssertionError("a request ran while the instance was held")


def _queue_one(stub, rows: int):  # type: ignore[no-untyped-def]
    """Sends a request and waits until it holds the queue's one place; returns its future.

    A probe that comes in first holds the place for a moment; the request is then
    refused, and sent again.
    """
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        queued = stub.ModelInfer.future(gated_request(rows), timeout=WAIT_S)
        while not _queue_is_full(stub):
            if queued.done():
                break
        if not queued.done():
            return queued
        assert queued.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED, queued.exception()
    raise AssertionError("no request could be queued")


def test_expired_in_queue_is_deadline_exceeded_and_never_runs(stub, gate: Gate) -> None:
    before = statistics(stub, "gated_batched")
    with gate.held():
        running, run = _occupy(stub, gate)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(gated_request(3, timeout=20_000), timeout=WAIT_S)  # server-side queue timeout (µs)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "timed out in the queue" in err.value.details()
        assert not running.done()
        gate.release(run)
        running.result()
    assert _rows_run_since(stub, before) == 256


def test_client_deadline_bounds_the_queue_wait(stub, gate: Gate) -> None:
    before = statistics(stub, "gated_batched")
    with gate.held():
        running, run = _occupy(stub, gate)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(gated_request(5), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.release(run)
        running.result()
    assert _rows_run_since(stub, before) == 256  # the 5 rows never ran


def test_cancelled_while_queued_never_runs(stub, gate: Gate) -> None:
    before = statistics(stub, "gated_batched")
    with gate.held():
        running, run = _occupy(stub, gate)
        doomed = _queue_one(stub, 7)
        assert doomed.cancel()
        # The cancelled request leaves the queue, freeing its place.
        wait_until(lambda: not _queue_is_full(stub), "the cancelled request to leave the queue")
        gate.release(run)
        running.result()
    assert _rows_run_since(stub, before) == 256


def test_queue_full_is_resource_exhausted_at_once(stub, gate: Gate) -> None:
    before = statistics(stub, "gated_batched")
    with gate.held():
        running, run = _occupy(stub, gate)
        queued = _queue_one(stub, 256)
        # Refused while the instance is still held: the answer did not wait for room.
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(gated_request(1), timeout=WAIT_S)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many queued requests" in err.value.details()
        assert not running.done() and not queued.done()
        gate.release(run)
        running.result()
    queued.result()
    assert _rows_run_since(stub, before) == 512  # and it serves again


def test_batch_over_max_is_invalid_and_bad_priority(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(gated_request(257), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(gated_request(1, priority=5), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority 5" in err.value.details()
