"""The adaptive queue delay through a real server and tritonclient: a closed group of clients is served without
waiting out the delay, and a lone client is served at once.

The model's delay is 60 s, so a request that waits it out cannot finish within the test's timeout: whether the
scheduler waited is decided by the answers arriving at all, not by how fast this machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient

from exporters.export import ExportSpec
from exporters.graphs import export_graph, identity_model
from tests.conftest import ServerProcess

MODEL = "identity_slow_delay"
DELAY_US = 60_000_000  # a minute (the most ortserve allows): never waited out within TIMEOUT_S
CLIENTS = 4
ANSWERS = 40
TIMEOUT_S = 45  # generous: the group needs ~10 batch-4 runs of an Identity, milliseconds each


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("adaptive_delay")
    repository = root / "repository"
    export_graph(
        identity_model(["FP32"], ["batch", 2]),
        ExportSpec(
            [], [], max_batch_size=8, extra_config=f"dynamic_batching {{ max_queue_delay_microseconds: {DELAY_US} }}"
        ),
        repository, MODEL,
    )
    process = ServerProcess(repository, root)
    yield process
    assert process.stop() == 0, process.log()


async def infer(client: grpcclient.InferenceServerClient, value: float) -> np.ndarray:
    data = np.full((1, 2), value, np.float32)
    tensor = grpcclient.InferInput("in_fp32", [1, 2], "FP32")
    tensor.set_data_from_numpy(data)
    result = await client.infer(MODEL, [tensor])
    answer = result.as_numpy("out_fp32")
    assert answer is not None
    return answer


async def test_a_lone_client_is_served_without_waiting(server: ServerProcess) -> None:
    async with grpcclient.InferenceServerClient(server.address) as client:
        for i in range(5):
            answer = await asyncio.wait_for(infer(client, float(i)), TIMEOUT_S)
            np.testing.assert_array_equal(answer, np.full((1, 2), float(i), np.float32))


async def test_a_closed_group_of_clients_never_waits_out_the_delay(server: ServerProcess) -> None:
    """Four clients, each sending its next request when the last is answered, on four channels of their own."""
    answered = 0

    async def client_loop(index: int) -> None:
        nonlocal answered
        # A channel each: tritonclient users in one process, or four processes.
        async with grpcclient.InferenceServerClient(
            server.address, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        ) as client:
            for i in range(1_000_000):
                value = float(index * 1000 + i % 1000)
                answer = await infer(client, value)
                np.testing.assert_array_equal(answer, np.full((1, 2), value, np.float32))
                answered += 1

    clients = [asyncio.create_task(client_loop(c)) for c in range(CLIENTS)]
    try:
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while answered < ANSWERS and not any(task.done() for task in clients):
            assert asyncio.get_running_loop().time() < deadline, f"only {answered} answers: the group waited"
            await asyncio.sleep(0.01)
    finally:
        # The group stops together: requests still queued are cancelled by their clients (a group that shrinks
        # waits out the delay for the missing member until the peak forgets it).
        for task in clients:
            task.cancel()
        outcomes = await asyncio.gather(*clients, return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)]
    assert not errors, errors
    assert answered >= ANSWERS
    async with grpcclient.InferenceServerClient(server.address) as client:
        assert await client.is_model_ready(MODEL)  # the cancelled requests left the server serving


def test_repository_config_keeps_the_delay(server: ServerProcess) -> None:
    """The 600 s delay is what the server runs with (so the tests above prove the adaptive rule, not a default)."""
    import tritonclient.grpc as syncclient

    client = syncclient.InferenceServerClient(server.address)
    config = client.get_model_config(MODEL).config
    client.close()
    assert config.dynamic_batching.max_queue_delay_microseconds == DELAY_US
