"""Dynamic batching through the real server: no request lost, mixed up or left waiting."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc


def digits_request(images: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits", id=request_id)
    request.inputs.add(name="image", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    request.outputs.add(name="logits")
    return request


def logits(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))


def slow_request(rows: int, **params: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow_batched")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 512])
    request.raw_input_contents.append(np.full((rows, 512), 0.01, np.float32).tobytes())
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
    for i, (response, want) in enumerate(zip(responses, expected)):
        assert response.id == str(i)
        np.testing.assert_allclose(logits(response), want, rtol=1e-5, atol=1e-5)
    assert after.inference_count - before.inference_count == sum(sizes)
    assert after.inference_stats.success.count - before.inference_stats.success.count == len(sizes)
    executions = after.execution_count - before.execution_count
    assert executions < len(sizes), "concurrent requests were never merged"
    assert any(b.batch_size > 5 for b in after.batch_stats)


def _wait_idle(stub) -> None:  # type: ignore[no-untyped-def]
    # All runs of earlier tests are over once a fresh request has gone through.
    stub.ModelInfer(slow_request(1), timeout=60)


def test_expired_in_queue_is_deadline_exceeded_and_never_runs(stub) -> None:
    _wait_idle(stub)
    before = statistics(stub, "slow_batched")
    running = stub.ModelInfer.future(slow_request(256), timeout=60)
    time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(slow_request(3, timeout=20_000), timeout=60)  # server-side queue timeout (µs)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "timed out in the queue" in err.value.details()
    running.result()
    after = statistics(stub, "slow_batched")
    assert after.execution_count - before.execution_count == 1
    assert after.inference_count - before.inference_count == 256


def test_client_deadline_bounds_the_queue_wait(stub) -> None:
    _wait_idle(stub)
    before = statistics(stub, "slow_batched")
    running = stub.ModelInfer.future(slow_request(256), timeout=60)
    time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(slow_request(5), timeout=0.02)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running.result()
    time.sleep(0.1)
    after = statistics(stub, "slow_batched")
    assert after.inference_count - before.inference_count == 256  # the 5 rows never ran


def test_cancelled_while_queued_never_runs(stub) -> None:
    _wait_idle(stub)
    before = statistics(stub, "slow_batched")
    running = stub.ModelInfer.future(slow_request(256), timeout=60)
    time.sleep(0.05)
    doomed = stub.ModelInfer.future(slow_request(7), timeout=60)
    time.sleep(0.02)
    assert doomed.cancel()
    running.result()
    time.sleep(0.1)
    after = statistics(stub, "slow_batched")
    assert after.inference_count - before.inference_count == 256


def test_queue_full_is_resource_exhausted_at_once(stub) -> None:
    _wait_idle(stub)
    running = stub.ModelInfer.future(slow_request(256), timeout=60)
    time.sleep(0.05)
    queued = stub.ModelInfer.future(slow_request(256), timeout=60)
    time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(slow_request(1), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.result()
    queued.result()
    stub.ModelInfer(slow_request(1), timeout=60)  # and it serves again


def test_batch_over_max_is_invalid_and_bad_priority(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(slow_request(257), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(slow_request(1, priority=5), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority 5" in err.value.details()
