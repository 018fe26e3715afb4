"""Hugging Face decoders end to end: exported with `python -m exporters.hf`, served with their own tokenizer.

A tiny GPT-2 and a tiny Llama with grouped-query attention (tests/hf_models.py) are exported
into a repository and served; their greedy output must be transformers' own generate(), token
for token, through the typed Generate API, tritonclient (streaming and unary ModelInfer) and
the openai package, including while other prompts join the running batch. The gated copy of
the Llama runs a step only when the test releases it (tests/gate.py), so "B joins after A's
third step" is exactly that on any machine.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tokenizers import Tokenizer

from server.rpc.pb import text_generation_pb2 as gen_pb
from server.rpc.pb import text_generation_pb2_grpc as gen_grpc
from tests.conftest import ROOT, ServerProcess
from tests.gate import Gate, gate_config, wait_until
from tests.hf_models import build_gpt2, build_llama, greedy_reference, prompt_ids

NEW_TOKENS = 64
PROMPTS = ["def f(x):\n    return", "x", "import collections.abc\nclass Node:\n    def __init__(self, naïve):"]


class Served:
    """The server, the source model directories, and transformers' greedy ids per (model, prompt)."""

    def __init__(self, server: ServerProcess, repo: Path, sources: dict[str, Path], gate: Gate) -> None:
        self.server = server
        self.repo = repo
        self.sources = sources
        self.gate = gate
        self._references: dict[tuple[str, str], list[int]] = {}
        self.channel = grpc.insecure_channel(server.address)
        self.stub = gen_grpc.TextGenerationStub(self.channel)

    def source(self, model: str) -> Path:
        return self.sources[model.removesuffix("_gated").removesuffix("_greedy")]

    def reference(self, model: str, prompt: str) -> list[int]:
        key = (model.removesuffix("_gated").removesuffix("_greedy"), prompt)
        if key not in self._references:
            source = self.source(model)
            self._references[key] = greedy_reference(source, prompt_ids(source, prompt), NEW_TOKENS)
        return self._references[key]

    def decode(self, model: str, ids: list[int]) -> str:
        return str(Tokenizer.from_file(str(self.source(model) / "tokenizer.json")).decode(ids))

    def generate(self, model: str, prompt: str, **fields: Any) -> list[gen_pb.GenerateResponse]:
        request = gen_pb.GenerateRequest(model=model, prompt=prompt, **fields)
        return list(self.stub.Generate(request, timeout=120))

    def metric(self, family: str, model: str, label: str = "") -> float:
        """One sample of the model's vLLM-style metrics on /metrics (0 when absent)."""
        text = urllib.request.urlopen(self.server.metrics_url, timeout=30).read().decode()
        for line in text.splitlines():
            if line.startswith(family + "{") and f'model_name="{model}"' in line and label in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def waiting(self, model: str) -> float:
        """The model's streams waiting for a place in its batch."""
        return self.metric("vllm:num_requests_waiting", model)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("hf")
    sources = {"gpt2": build_gpt2(work / "src" / "gpt2"), "llama": build_llama(work / "src" / "llama")}
    repo = work / "repo"
    # The command line for one model, the function for the other: both are the exporter's front doors.
    command = [sys.executable, "-m", "exporters.hf", str(sources["gpt2"]), "--task", "text-generation-with-past",
               "--repository", str(repo), "--name", "gpt2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    from exporters.hf import export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and torch's own deprecation notes while tracing
        export(sources["llama"], "text-generation-with-past", repo, "llama")
    # The same GPT-2 with a greedy default in its generation_config.json (as many chat models ship).
    shutil.copytree(repo / "gpt2", repo / "gpt2_greedy")
    config = (repo / "gpt2_greedy" / "config.pbtxt").read_text().replace('name: "gpt2"', 'name: "gpt2_greedy"')
    (repo / "gpt2_greedy" / "config.pbtxt").write_text(config)
    generation = json.loads((repo / "gpt2_greedy" / "generation_config.json").read_text())
    (repo / "gpt2_greedy" / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.0}))
    gated = repo / "llama_gated"
    shutil.copytree(repo / "llama", gated)
    gate = Gate(work / "gate")
    config = (gated / "config.pbtxt").read_text().replace('name: "llama"', 'name: "llama_gated"')
    (gated / "config.pbtxt").write_text(config + "\n" + gate_config(gate.directory) + "\n")
    server = ServerProcess(repo, tmp_path_factory.mktemp("hf_server"))
    yield Served(server, repo, sources, gate)
    assert server.stop() == 0, server.log()


def ids_of(responses: list[gen_pb.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def test_the_exported_llama_keeps_grouped_query_attention(served: Served) -> None:
    source = json.loads((served.sources["llama"] / "config.json").read_text())
    repo = served.repo
    info = json.loads((repo / "llama" / "generation.json").read_text())
    assert source["num_attention_heads"] == 8 and info["num_kv_heads"] == 2 == source["num_key_value_heads"]
    assert (repo / "llama" / "tokenizer.json").is_file() and info["tokenizer"] == "tokenizer.json"
    config = grpcclient.InferenceServerClient(served.server.address).get_model_config("llama").config
    assert config.model_transaction_policy.decoupled


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_greedy_output_is_transformers_generate_token_for_token(served: Served, model: str) -> None:
    for prompt in PROMPTS:
        responses = served.generate(model, prompt, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        assert ids_of(responses) == served.reference(model, prompt), prompt
        assert "".join(r.text for r in responses) == served.decode(model, served.reference(model, prompt))
        assert responses[-1].prompt_tokens == len(prompt_ids(served.source(model), prompt))
        assert responses[-1].completion_tokens == NEW_TOKENS


def test_prompts_joining_a_running_batch_still_match_transformers(served: Served) -> None:
    # A starts alone; B joins after A's 3rd decode step, C after the 10th: each still gets
    # exactly transformers' greedy tokens, and the batch really held them together.
    model, gate = "llama_gated", served.gate
    results: dict[str, list[gen_pb.GenerateResponse]] = {}
    failures: queue.Queue[BaseException] = queue.Queue()

    def run(prompt: str) -> None:
        try:
            results[prompt] = served.generate(model, prompt, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            failures.put(exc)

    threads = [threading.Thread(target=run, args=(p,), daemon=True) for p in PROMPTS]
    with gate.held():
        seen = len(gate.entered())
        threads[0].start()
        gate.release(gate.wait_entered(seen))  # A's prefill
        seen += 1
        for joiner, after_steps in ((threads[1], 3), (threads[2], 7)):
            for _ in range(after_steps):
                gate.release(gate.wait_entered(seen))
                seen += 1
            held = gate.wait_entered(seen)  # the next decode step, held while the joiner queues
            joiner.start()
            wait_until(lambda: served.waiting(model) == 1, "the joining stream to queue")
            rows = gate.rows(held)
            gate.release(held)
            prefill = gate.wait_entered(seen + 1)
            assert gate.rows(prefill) == 1
            gate.release(prefill)
            decode = gate.wait_entered(seen + 2)
            assert gate.rows(decode) == rows + 1  # the joiner decodes in the same batch
            gate.release(decode)
            seen += 3
    for thread in threads:
        thread.join(timeout=120)
    assert failures.empty(), failures.get()
    for prompt in PROMPTS:
        assert ids_of(results[prompt]) == served.reference(model, prompt), prompt


def test_seeded_sampling_repeats_whatever_shares_the_batch(served: Served) -> None:
    model, gate = "llama_gated", served.gate
    fields = {"max_tokens": 32, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "ignore_eos": True}
    alone = ids_of(served.generate(model, PROMPTS[0], seed=7, **fields))
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = ids_of(served.generate(model, PROMPTS[i % 3], seed=7 if i == 0 else 100 + i, **fields))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
    with gate.held():
        seen = len(gate.entered())
        threads[0].start()
        gate.wait_entered(seen)  # the first prefill is at the gate: the others queue behind it
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: served.waiting(model) == 3, "three streams to queue")
    for thread in threads:
        thread.join(timeout=120)
    assert results[0] == alone
    assert len({tuple(ids) for ids in results.values()}) > 1  # the neighbours really sampled differently


def test_streamed_text_is_the_decode_of_the_ids_even_with_characters_split_across_tokens(served: Served) -> None:
    tokenizer = Tokenizer.from_file(str(served.sources["gpt2"] / "tokenizer.json"))
    split = 0
    for seed in range(3):
        responses = served.generate("gpt2", "日本語 café", max_tokens=48, temperature=1.5, seed=seed, ignore_eos=True)
        ids = ids_of(responses)
        assert "".join(r.text for r in responses) == tokenizer.decode(ids)
        split += sum(1 for i in ids if "\ufffd" in tokenizer.decode([i]))
        for r in responses[:-1]:  # no chunk but the last ends inside a character
            assert not r.text.endswith("\ufffd") or "\ufffd" in tokenizer.decode(ids)
    assert split > 0  # some tokens were parts of characters: the case was really exercised


def test_stop_strings_match_across_token_boundaries(served: Served) -> None:
    reference = served.reference("gpt2", PROMPTS[0])
    text = served.decode("gpt2", reference)
    pieces = [served.decode("gpt2", [t]) for t in reference]
    # A stop string made of the end of one token and the start of the next.
    at = next(i for i in range(5, len(pieces) - 1) if pieces[i] and pieces[i + 1] and pieces[i].isascii())
    stop = pieces[at][-1:] + pieces[at + 1][:2]
    start = text.find(stop)
    responses = served.generate("gpt2", PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, stop=[stop])
    assert responses[-1].finish_reason == "stop"
    assert "".join(r.text for r in responses) == text[:start]


def triton_inputs(prompt: bytes, stream: bool) -> list[grpcclient.InferInput]:
    tensors = []
    sampling = json.dumps({"temperature": 0, "ignore_eos": True}).encode()
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([prompt], dtype=object)),
        ("max_tokens", "INT32", np.array([NEW_TOKENS], np.int32)),
        ("stream", "BOOL", np.array([stream])),
        ("sampling_parameters", "BYTES", np.array([sampling], dtype=object)),
        ("exclude_input_in_output", "BOOL", np.array([True])),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def test_tritonclient_stream_and_unary_infer_give_transformers_text(served: Served) -> None:
    prompt = PROMPTS[2]
    expected = served.decode("llama", served.reference("llama", prompt))
    client = grpcclient.InferenceServerClient(served.server.address)
    unary = client.infer("llama", triton_inputs(prompt.encode(), False))
    assert unary.as_numpy("text_output")[0].decode() == expected
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("llama", triton_inputs(prompt.encode(), True), request_id="hf1")
        deltas = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            deltas.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    assert "".join(deltas) == expected
    with pytest.raises(Exception, match="UTF-8"):  # a prompt the tokenizer cannot read: INVALID_ARGUMENT
        client.infer("llama", triton_inputs(b"caf\xe9", False))
    assert client.is_model_ready("llama")


def test_openai_completions_and_chat_give_transformers_text(served: Served) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=served.server.http_url + "/v1", api_key="unused", max_retries=0)
    prompt = PROMPTS[0]
    extra = {"ignore_eos": True}
    completion = client.completions.create(
        model="gpt2", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, extra_body=extra
    )
    assert completion.choices[0].text == served.decode("gpt2", served.reference("gpt2", prompt))
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt_ids(served.sources["gpt2"], prompt))
    stream = client.completions.create(
        model="gpt2", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True, extra_body=extra
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == completion.choices[0].text
    chat = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, extra_body=extra
    )
    chat_prompt = "<|user|>hi\n<|assistant|>"  # the template of the Llama's tokenizer_config.json
    assert chat.choices[0].message.content == served.decode("llama", greedy_reference(
        served.sources["llama"], prompt_ids(served.sources["llama"], chat_prompt), 8
    ))


def transformers_logprobs(source: Path, prompt: list[int], completion: list[int]) -> np.ndarray:
    """log-softmax of transformers' logits for each completion token, from one full pass."""
    import torch
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def test_log_probabilities_are_the_models_through_both_apis(served: Served) -> None:
    from openai import OpenAI

    prompt = PROMPTS[0]
    responses = served.generate("llama", prompt, max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    ids = ids_of(responses)
    entries = [e for r in responses for e in r.logprobs]
    assert [e.token_id for e in entries] == ids == served.reference("llama", prompt)[:16]
    expected = transformers_logprobs(served.sources["llama"], prompt_ids(served.sources["llama"], prompt), ids)
    assert np.allclose([e.logprob for e in entries], expected[np.arange(16), ids], atol=1e-3)
    for entry, row in zip(entries, expected, strict=True):
        assert [t.token_id for t in entry.top] == list(np.argsort(-row, kind="stable")[:3])
        assert entry.top[0].token_id == entry.token_id  # greedy takes the most likely
    plain = served.generate("llama", prompt, max_tokens=4, temperature=0, ignore_eos=True)
    assert all(not r.logprobs for r in plain)  # none unless asked
    client = OpenAI(base_url=served.server.http_url + "/v1", api_key="unused", max_retries=0)
    extra = {"ignore_eos": True}
    completion = client.completions.create(
        model="llama", prompt=prompt, max_tokens=16, temperature=0, logprobs=2, extra_body=extra
    )
    fields = completion.choices[0].logprobs
    assert fields is not None and fields.token_logprobs is not None and fields.top_logprobs is not None
    assert np.allclose(fields.token_logprobs, [e.logprob for e in entries], atol=1e-5)
    assert "".join(fields.tokens or []) == "".join(e.text for e in entries)
    assert all(len(top) <= 2 for top in fields.top_logprobs) and fields.text_offset is not None
    chat = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2, stream=True, extra_body=extra,
    )
    content = [c for chunk in chat if chunk.choices and chunk.choices[0].logprobs
               for c in chunk.choices[0].logprobs.content or []]
    assert len(content) == 6 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_sampling_settings_left_out_take_the_models_generation_config_defaults(served: Served) -> None:
    from openai import OpenAI

    prompt = PROMPTS[0]
    reference = served.reference("gpt2", prompt)
    # No temperature in the request: generation_config.json's 0 makes it greedy, on every API.
    assert ids_of(served.generate("gpt2_greedy", prompt, max_tokens=NEW_TOKENS, ignore_eos=True)) == reference
    client = OpenAI(base_url=served.server.http_url + "/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(
        model="gpt2_greedy", prompt=prompt, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].text == served.decode("gpt2", reference)
    triton = grpcclient.InferenceServerClient(served.server.address)
    inputs = triton_inputs(prompt.encode(), False)
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps({"ignore_eos": True}).encode()], dtype=object))
    inputs = [t if t.name() != "sampling_parameters" else sampling for t in inputs]
    result = triton.infer("gpt2_greedy", inputs)
    assert result.as_numpy("text_output")[0].decode() == served.decode("gpt2", reference)
    # A temperature the request gives wins over the model's default.
    sampled = served.generate("gpt2_greedy", prompt, max_tokens=NEW_TOKENS, ignore_eos=True, temperature=1.0, seed=3)
    assert ids_of(sampled) != reference


def test_a_cancelled_stream_leaves_the_batch_and_a_deadline_ends_a_held_one(served: Served) -> None:
    model, gate = "llama_gated", served.gate
    request = gen_pb.GenerateRequest(model=model, prompt=PROMPTS[1], max_tokens=NEW_TOKENS, temperature=0,
                                     ignore_eos=True)
    aborted = served.metric("vllm:request_success_total", model, 'finished_reason="abort"')
    with gate.held():
        seen = len(gate.entered())
        call = served.stub.Generate(request, timeout=120)
        gate.release(gate.wait_entered(seen))  # the prefill
        held = gate.wait_entered(seen + 1)  # the first decode step, held while the client leaves
        assert gate.rows(held) == 1
        call.cancel()
        wait_until(lambda: served.metric("vllm:request_success_total", model, 'finished_reason="abort"') > aborted,
                   "the server to see the cancel")
        gate.release(held)
        # The cancelled row is dropped before any further step: the next stream runs alone.
        done: list[gen_pb.GenerateResponse] = []
        worker = threading.Thread(target=lambda: done.extend(served.generate(
            model, "x", max_tokens=2, temperature=0, ignore_eos=True)), daemon=True)
        worker.start()
        for step in range(2):
            run = gate.wait_entered(seen + 2 + step)
            assert gate.rows(run) == 1
            gate.release(run)
        worker.join(timeout=120)
        assert ids_of(done) == served.reference(model, "x")[:2]
        with pytest.raises(grpc.RpcError) as err:  # its prefill stays held: the deadline passes
            list(served.stub.Generate(request, timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ids_of(served.generate(model, "x", max_tokens=3, temperature=0, ignore_eos=True)) == \
        served.reference(model, "x")[:3]
