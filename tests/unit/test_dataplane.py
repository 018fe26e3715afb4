"""The data plane without any channel: readiness and draining, Triton's text-generation convention, model control."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server.core.batcher import SchedulerConfig
from server.core.errors import (
    InvalidInputError,
    ModelNotFoundError,
    PermissionDeniedError,
    ServerUnavailableError,
)
from server.core.generation import TokenChunk
from server.core.model import Model, ModelSignature
from server.core.sampling import SamplingParams
from server.core.types import InferRequest, InputTensor, TensorSpec
from server.repository.registry import IndexEntry
from server.schema import model_config_pb2 as mc
from server.service.dataplane import DataPlane, ServerState, WorkerPeers
from server.service.statistics import VersionStatistics


class ScriptedGenerator:
    """Stands in for GenerationScheduler: yields the given pieces, the last with a finish reason."""

    def __init__(self, pieces: list[str], fail: bool = False) -> None:
        self.pieces = pieces
        self.fail = fail
        self.prompts: list[bytes] = []
        self.busy = False

    async def generate(
        self, prompt: bytes, params: SamplingParams, deadline_s: float | None
    ) -> AsyncIterator[TokenChunk]:
        self.prompts.append(prompt)
        for index, piece in enumerate(self.pieces):
            last = index == len(self.pieces) - 1
            if last and self.fail:
                raise InvalidInputError("the scripted generation fails")
            yield TokenChunk(piece, [index], "length" if last else None, 3, index + 1)

    def close(self) -> None:
        pass


def generation_model(pieces: list[str], fail: bool = False) -> Model:
    signature = ModelSignature(
        inputs=[
            TensorSpec("text_input", "BYTES", (1,)),
            TensorSpec("stream", "BOOL", (1,), optional=True),
            TensorSpec("exclude_input_in_output", "BOOL", (1,), optional=True),
        ],
        outputs=[TensorSpec("text_output", "BYTES", (-1,))],
        max_batch_size=0,
    )
    generator = ScriptedGenerator(pieces, fail)
    config = mc.ModelConfig(name="writer")
    return Model(
        "writer", 1, "onnxruntime_onnx", signature, [], SchedulerConfig(), config, generator  # type: ignore[arg-type]
    )


@dataclass
class Entry:
    name: str
    reason: str = ""


class FakeRegistry:
    """Just what the data plane reads: models by name, readiness, and a log of loads and unloads."""

    def __init__(self, models: dict[str, Model], unready: dict[str, str] | None = None) -> None:
        self.served = models
        self.unready = unready or {}  # name -> reason
        self.calls: list[tuple[str, str]] = []
        self.repository = self

    def model_dir(self, name: str) -> Path:
        return Path(name)

    def get(self, name: str, version: str = "") -> Model:
        if name not in self.served:
            raise ModelNotFoundError(f"unknown model '{name}'")
        return self.served[name]

    def models(self, name: str = "", version: str = "") -> list[Model]:
        return [self.get(name)] if name else list(self.served.values())

    def is_ready(self, name: str, version: str = "") -> bool:
        return name in self.served

    def entries(self) -> list[Entry]:
        return [Entry(n) for n in self.served] + [Entry(n, r) for n, r in self.unready.items()]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        return [IndexEntry(n, "1", "READY", "") for n in self.served]

    async def load(self, name: str, config: object = None) -> None:
        self.calls.append(("load", name))

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name))


def plane(registry: FakeRegistry, strict: bool = True, control_mode: str = "none") -> DataPlane:
    state = ServerState(strict_readiness=strict, started=True)
    return DataPlane(registry, state, "1.2.3", control_mode)  # type: ignore[arg-type]


def text_request(
    prompt: str, stream: bool | None = None, exclude: bool | None = None, empty_final: bool = False
) -> InferRequest:
    inputs = [InputTensor("text_input", "BYTES", (1,), np.array([prompt.encode()], dtype=object))]
    if stream is not None:
        inputs.append(InputTensor("stream", "BOOL", (1,), np.array([stream])))
    if exclude is not None:
        inputs.append(InputTensor("exclude_input_in_output", "BOOL", (1,), np.array([exclude])))
    parameters: dict[str, bool | int | float | str] = {}
    if empty_final:
        parameters["triton_enable_empty_final_response"] = True
    return InferRequest("writer", id="r1", inputs=inputs, parameters=parameters)


# Readiness and draining.


def test_ready_needs_started_and_not_draining() -> None:
    data_plane = plane(FakeRegistry({}))
    assert data_plane.live() and data_plane.ready()
    data_plane.state.started = False
    assert not data_plane.ready()
    data_plane.state.started, data_plane.state.draining = True, True
    assert not data_plane.ready() and data_plane.live()


def test_strict_readiness_counts_failed_models_but_not_unloaded_ones() -> None:
    assert not plane(FakeRegistry({}, {"broken": "failed to load"})).ready()
    assert plane(FakeRegistry({}, {"broken": "failed to load"}), strict=False).ready()
    assert plane(FakeRegistry({}, {"gone": "unloaded"})).ready()


async def test_a_draining_server_refuses_new_work_and_reports_models_unready() -> None:
    data_plane = plane(FakeRegistry({"writer": generation_model(["a"])}))
    assert data_plane.model_ready("writer")
    data_plane.state.draining = True
    assert not data_plane.model_ready("writer")
    with pytest.raises(ServerUnavailableError):
        await data_plane.infer(text_request("x"))
    with pytest.raises(ServerUnavailableError):
        data_plane.generate_text(text_request("x"))


def test_metadata_is_plain() -> None:
    data_plane = plane(FakeRegistry({"writer": generation_model(["a"])}))
    assert data_plane.metadata().name == "ortserve" and "statistics" in data_plane.metadata().extensions
    metadata = data_plane.model_metadata("writer")
    assert metadata.versions == ("1",) and [t.name for t in metadata.inputs][0] == "text_input"
    assert metadata.inputs[0].shape == (1,)


# Triton's text-generation convention.


async def responses(
    data_plane: DataPlane, request: InferRequest, decoupled: bool
) -> list[tuple[str | None, bool | None]]:
    return [(r.text, r.final) async for r in data_plane.generate_text(request, decoupled=decoupled)]


async def test_unary_answers_prompt_and_completion_in_one_response_without_a_final_flag() -> None:
    model = generation_model(["lo", " world"])
    data_plane = plane(FakeRegistry({"writer": model}))
    response = await data_plane.infer(text_request("hel"))
    assert [o.name for o in response.outputs] == ["text_output"]
    assert response.outputs[0].data.tolist() == [b"hello world"]
    assert "triton_final_response" not in response.parameters and response.id == "r1"
    assert await responses(data_plane, text_request("hel", exclude=True), decoupled=False) == [("lo world", None)]
    # Unary ignores `stream`: one answer whatever it says.
    assert await responses(data_plane, text_request("hel", stream=True), decoupled=False) == [("hello world", None)]
    assert model.stats.success.count == 3 and model.stats.fail.count == 0


async def test_decoupled_streams_deltas_and_flags_the_last() -> None:
    data_plane = plane(FakeRegistry({"writer": generation_model(["a", "b", "c"])}))
    assert await responses(data_plane, text_request("p"), decoupled=True) == [("a", False), ("b", False), ("c", True)]


async def test_decoupled_without_stream_answers_the_whole_text_once() -> None:
    data_plane = plane(FakeRegistry({"writer": generation_model(["a", "b"])}))
    assert await responses(data_plane, text_request("p", stream=False), decoupled=True) == [("pab", True)]
    assert await responses(data_plane, text_request("p", stream=False, exclude=True), decoupled=True) == [("ab", True)]


async def test_the_empty_final_response_ends_the_series() -> None:
    data_plane = plane(FakeRegistry({"writer": generation_model(["a", "b"])}))
    request = text_request("p", empty_final=True)
    assert await responses(data_plane, request, decoupled=True) == [("a", False), ("b", False), (None, True)]
    # A last chunk without text is not sent: the empty final response replaces it.
    data_plane = plane(FakeRegistry({"writer": generation_model(["a", ""])}))
    answers = await responses(data_plane, text_request("p", empty_final=True), decoupled=True)
    assert answers == [("a", False), (None, True)]
    # As a tensor response, the empty final one has no output and the final flag.
    final = [r async for r in data_plane.infer_decoupled(text_request("p", empty_final=True))][-1]
    assert final.outputs == [] and final.parameters == {"triton_final_response": True}


async def test_a_failed_generation_is_counted_as_a_failure() -> None:
    model = generation_model(["a", "b"], fail=True)
    data_plane = plane(FakeRegistry({"writer": model}))
    with pytest.raises(InvalidInputError):
        await responses(data_plane, text_request("p"), decoupled=True)
    assert model.stats.fail.count == 1 and model.stats.success.count == 0


async def test_typed_generation_yields_token_chunks() -> None:
    data_plane = plane(FakeRegistry({"writer": generation_model(["a", "b"])}))
    chunks = [c async for c in data_plane.generate("writer", "", "p", SamplingParams())]
    assert [c.text for c in chunks] == ["a", "b"] and chunks[-1].finish_reason == "length"


# Model control and statistics.


async def test_load_and_unload_are_refused_unless_explicit_mode() -> None:
    registry = FakeRegistry({})
    for mode in ("none", "poll"):
        with pytest.raises(PermissionDeniedError, match="explicit"):
            await plane(registry, control_mode=mode).load("digits")
        with pytest.raises(PermissionDeniedError, match="explicit"):
            await plane(registry, control_mode=mode).unload("digits")
    assert registry.calls == []
    await plane(registry, control_mode="explicit").load("digits", mc.ModelConfig(max_batch_size=2))
    await plane(registry, control_mode="explicit").unload("digits")
    assert registry.calls == [("load", "digits"), ("unload", "digits")]


class StatisticsPeers:
    """A sibling that reports its own count for every model version."""

    async def statistics(self, address: str, name: str, version: str) -> list[VersionStatistics] | None:
        stats = VersionStatistics("writer", "1", inference_count=5, last_inference_ms=7)
        stats.requests["success"].add(100, 5)
        return [stats, VersionStatistics("other", "1", inference_count=1)]

    async def load(self, address: str, name: str, config: object) -> bool:
        raise AssertionError("not called")

    async def unload(self, address: str, name: str) -> bool:
        raise AssertionError("not called")

    async def close(self) -> None:
        pass


async def test_statistics_add_up_the_siblings_unless_local_only(tmp_path: Path) -> None:
    model = generation_model(["a"])
    model.stats.record_execution(1, 1, 0, 10, 0)
    model.stats.record_request(None, 10)
    data_plane = plane(FakeRegistry({"writer": model}))
    data_plane.attach_workers(WorkerPeers(StatisticsPeers(), ("unix:sibling",), tmp_path, 0))
    local = await data_plane.statistics(local_only=True)
    assert [(s.name, s.inference_count) for s in local] == [("writer", 1)]
    merged = await data_plane.statistics()
    assert [(s.name, s.inference_count) for s in merged] == [("writer", 6), ("other", 1)]
    assert merged[0].requests["success"].count == 6 and merged[0].last_inference_ms >= 7
    assert 1 in merged[0].batches
