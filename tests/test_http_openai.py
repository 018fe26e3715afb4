"""The OpenAI-compatible routes through the `openai` package against a real server, and the SSE helper's bounds."""

from __future__ import annotations

import asyncio
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import tritonclient.grpc as grpcclient

from server.http.sse import EventStream
from tests.conftest import ROOT, ServerProcess
from tests.gate import Gate, gate_config, wait_until

MODEL = "bytes_decoder"
GATED = "bytes_decoder_gated"
TEMPLATED = "bytes_decoder_chat"
TEMPLATE = (
    "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
    "{% if messages[0].role == 'tool' %}{{ raise_exception('a chat cannot start with a tool') }}{% endif %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)


def _copy(repo: Path, name: str, extra: str = "") -> Path:
    target = repo / name
    shutil.copytree(ROOT / "model_repository" / MODEL, target)
    config = (target / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{name}"')
    (target / "config.pbtxt").write_text(config + "\n" + extra + "\n")
    return target


@pytest.fixture(scope="module")
def oa_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("openai_repo")
    shutil.copytree(ROOT / "model_repository" / MODEL, repo / MODEL)
    gate_dir = repo.parent / f"{repo.name}-gate"
    _copy(repo, GATED, gate_config(gate_dir))
    gate = Gate(gate_dir)  # the directory must exist when the model loads
    (_copy(repo, TEMPLATED) / "chat_template.jinja").write_text(TEMPLATE)
    server = ServerProcess(repo, tmp_path_factory.mktemp("openai_server"))
    server.gate = gate  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def client(oa_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{oa_server.http_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models_lists_the_text_generation_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == sorted([MODEL, GATED, TEMPLATED])


def test_completion_streamed_and_not_give_the_same_text_and_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="def ", max_tokens=12, **GREEDY)
    assert whole.object == "text_completion" and len(whole.choices) == 1
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (4, 12, 16)
    chunks = list(client.completions.create(
        model=MODEL, prompt=["def "], max_tokens=12, stream=True, stream_options={"include_usage": True}, **GREEDY,
    ))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 12
    echoed = client.completions.create(model=MODEL, prompt="def ", max_tokens=12, echo=True, **GREEDY)
    assert echoed.choices[0].text == "def " + whole.choices[0].text


def test_completion_stop_string_and_seed(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model=MODEL, prompt="def ", max_tokens=20, **GREEDY).choices[0].text
    stop = greedy[5:7]
    stopped = client.completions.create(model=MODEL, prompt="def ", max_tokens=20, stop=[stop], **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[: greedy.index(stop)]
    sampled = [
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=10, seed=7, temperature=1.0, top_p=0.9
        ).choices[0].text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_chat_default_prompt_streamed_and_not(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **GREEDY)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    # The byte tokenizer counts bytes: the documented default "role: content" lines then "assistant:".
    assert whole.usage is not None and whole.usage.prompt_tokens == len("system: Be brief.\nuser: hi\nassistant:")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_model_directory_template(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    answer = client.chat.completions.create(model=TEMPLATED, messages=messages, max_tokens=2, **GREEDY)
    assert answer.usage is not None and answer.usage.prompt_tokens == len("[USER] hi\n[ASSISTANT]")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=TEMPLATED, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]
        )
    assert "a chat cannot start with a tool" in _message(err.value)


def _message(err: openai.APIStatusError) -> str:
    body = err.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    message: str = body["error"]["message"]
    return message


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        ("chat", {"messages": []}, "at least one message"),
        ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "'wizard'"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n must be 1"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs logprobs: true"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "logprobs"),
        ("completions", {"prompt": "x", "logprobs": 99}, "logprobs must be an integer in"),
        ("completions", {"prompt": ["a", "b"]}, "list of one string"),
        ("completions", {"prompt": "x" * 400}, "the model's context is 256"),
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ],
)
def test_bad_requests_get_400_with_openai_error_object(
    client: openai.OpenAI, route: str, body: dict, expected: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        if route == "chat":
            client.chat.completions.create(model=MODEL, **body)
        else:
            client.completions.create(model=MODEL, **body)
    assert err.value.status_code == 400
    assert expected in _message(err.value)
    assert err.value.response.json()["error"]["type"] == "invalid_request_error"
    # The next request is served.
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text is not None


def test_unknown_model_404_and_malformed_json_400(client: openai.OpenAI, oa_server: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no_such_model", prompt="x")
    assert "no_such_model" in _message(err.value)
    for raw in (b"{not json", b"[1, 2]", b'{"model": "bytes_decoder"}'):
        reply = httpx.post(f"{oa_server.http_url}/v1/completions", content=raw, timeout=60)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["type"] == "invalid_request_error"


def _fail_count(oa_server: ServerProcess, model: str) -> int:
    stats = grpcclient.InferenceServerClient(oa_server.address).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"].get("fail", {}).get("count", 0))


def test_a_client_that_leaves_mid_stream_frees_its_row_before_the_next_step(
    client: openai.OpenAI, oa_server: ServerProcess
) -> None:
    gate: Gate = oa_server.gate  # type: ignore[attr-defined]
    chunks: queue.Queue[Any] = queue.Queue()
    leave = threading.Event()

    def read(max_tokens: int) -> None:
        """Reads the first chunk, then leaves when told to."""
        with client.completions.create(model=GATED, prompt="a", max_tokens=max_tokens, stream=True, **GREEDY) as stream:
            for chunk in stream:
                chunks.put(chunk)
                leave.wait(60)
                return  # closes the response: the client disconnects mid-stream

    failed_before = _fail_count(oa_server, GATED)
    with gate.held():
        seen = len(gate.entered())
        leaver = threading.Thread(target=read, args=(200,))
        leaver.start()
        # The stream's first iteration is a prefill run then a decode run; its first chunks go out after them.
        for _ in range(2):
            gate.release(gate.wait_entered(seen))
            seen += 1
        held = gate.wait_entered(seen)  # the next decode step, held while the client leaves
        seen += 1
        assert gate.rows(held) == 1
        assert chunks.get(timeout=60) is not None
        leave.set()
        leaver.join(timeout=60)
        assert not leaver.is_alive()
        # The server saw the disconnect: the request ended (counted as failed) while a step of it is held.
        wait_until(lambda: _fail_count(oa_server, GATED) == failed_before + 1, "the cancelled stream to end")
        follower_done = threading.Event()

        def follow() -> None:
            client.completions.create(model=GATED, prompt="b", max_tokens=3, **GREEDY)
            follower_done.set()

        follower = threading.Thread(target=follow)
        follower.start()
        gate.release(held)
        # The follower's prefill, then its decode step: the leaver's row is gone (1 row, not 2).
        prefill = gate.wait_entered(seen)
        assert gate.rows(prefill) == 1
        gate.release(prefill)
        decode = gate.wait_entered(seen + 1)
        assert gate.rows(decode) == 1
        gate.release(decode)
    follower.join(timeout=60)
    assert follower_done.is_set()


# The SSE helper on its own: a reader that stops reading, and one that leaves.


class _Source:
    def __init__(self, items: int) -> None:
        self.produced = 0
        self.closed = False
        self.cancelled = False
        self.items = items

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> dict[str, int]:
        if self.produced >= self.items:
            await asyncio.Event().wait()  # a stream whose next token never comes
        await asyncio.sleep(0)
        self.produced += 1
        return {"i": self.produced}

    async def aclose(self) -> None:
        self.closed = True


async def test_a_reader_that_stops_reading_cancels_the_stream_once_its_buffer_is_full() -> None:
    source = _Source(items=10_000)
    response = EventStream(source, max_buffered_events=8)
    sent: list[dict[str, Any]] = []
    stuck = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await stuck.wait()  # the client's socket buffer is full: writes block, as uvicorn's flow control does

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=60)
    assert response.outcome == "overflow"
    assert source.closed
    # At most the buffer plus the event being written were ever produced.
    assert source.produced <= 8 + 2


async def test_a_reader_that_leaves_cancels_the_source_at_once() -> None:
    source = _Source(items=1)
    response = EventStream(source, done="[DONE]")
    left = asyncio.Event()
    bodies: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            left.set()

    async def receive() -> dict[str, Any]:
        await left.wait()  # the client leaves after the first event, while the source waits for its next
        return {"type": "http.disconnect"}

    await asyncio.wait_for(response({"type": "http"}, receive, send), timeout=60)
    assert response.outcome == "disconnect"
    assert bodies == [b'data: {"i":1}\n\n']
    assert source.closed
