"""Tokenizers of generation models: incremental decoding, special tokens, EOS ids; the decoder's cache layout."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from server.core.decoder_layout import DecoderLayout
from server.core.errors import InvalidInputError, ModelLoadError
from server.core.tokenizer import ByteTokenizer, HfTokenizer, load_tokenizer
from server.runtime.base import GraphTensor
from tests.hf_models import UNICODE_TEXT, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(directory, add_bos=True)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5], "temperature": 0.7}))
    return directory


def stream_text(tokenizer: HfTokenizer | ByteTokenizer, ids: list[int]) -> list[bytes]:
    detokenizer = tokenizer.detokenizer()
    chunks = [detokenizer.add(i) for i in ids]
    return [*chunks, detokenizer.flush()]


def test_streamed_chunks_join_to_the_whole_decode_and_never_split_a_character(tokenizer_dir: Path) -> None:
    tokenizer = HfTokenizer(tokenizer_dir)
    rng = random.Random(0)
    split_seen = 0
    for _ in range(200):
        # Random ids meet byte tokens that are parts of characters; encoded text meets real merges.
        if rng.random() < 0.5:
            ids = [rng.randrange(2, tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        else:
            start = rng.randrange(len(UNICODE_TEXT) - 60)
            ids = tokenizer.encode(UNICODE_TEXT[start : start + rng.randrange(1, 60)])[1:]
        chunks = stream_text(tokenizer, ids)
        assert b"".join(chunks).decode("utf-8") == tokenizer.decode(ids)
        for chunk in chunks[:-1]:
            chunk.decode("utf-8")  # strict: every chunk but the flush is whole characters
            assert "\ufffd" not in chunk.decode("utf-8") or "\ufffd" in tokenizer.decode(ids)
        split_seen += sum(1 for i in ids if "\ufffd" in tokenizer.decode([i]))
    assert split_seen > 0


def test_a_character_split_across_tokens_comes_out_whole_once_complete(tokenizer_dir: Path) -> None:
    tokenizer = HfTokenizer(tokenizer_dir)
    ids = tokenizer.encode("🙂")[1:]
    if len(ids) == 1:
        pytest.skip("the trained merges keep this emoji whole")
    chunks = stream_text(tokenizer, ids)
    assert chunks[:-2] == [b""] * (len(ids) - 1) and chunks[-2] == "🙂".encode()


def test_special_tokens_bos_and_eos_come_from_the_configs(tokenizer_dir: Path) -> None:
    tokenizer = HfTokenizer(tokenizer_dir)
    assert tokenizer.bos_id == 1 and tokenizer.encode("def")[0] == 1
    assert tokenizer.eos_ids == frozenset({0, 5})  # generation_config.json's list wins
    assert tokenizer.generation_defaults == {"temperature": 0.7}
    assert tokenizer.encode("") == [1]
    with pytest.raises(InvalidInputError, match="UTF-8"):
        tokenizer.encode_bytes(b"caf\xe9")
    assert tokenizer.decode([1, *tokenizer.encode("héllo")[1:], 0]) == "héllo"  # special tokens skipped


def test_eos_falls_back_to_the_tokenizer_config_then_generation_json(tmp_path: Path) -> None:
    train_tokenizer(tmp_path, add_bos=False)
    assert HfTokenizer(tmp_path).eos_ids == frozenset({0})  # tokenizer_config.json's eos_token
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert HfTokenizer(tmp_path, fallback_eos=[3]).eos_ids == frozenset({3})
    with pytest.raises(ModelLoadError, match="no end-of-sequence token"):
        HfTokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 99999}))
    with pytest.raises(ModelLoadError, match="outside the vocabulary"):
        HfTokenizer(tmp_path)


def test_load_tokenizer_refuses_bad_files_and_kinds(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown tokenizer"):
        load_tokenizer(tmp_path, {"tokenizer": "sentencepiece"})
    with pytest.raises(ModelLoadError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path, {"tokenizer": "tokenizer.json"})
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be loaded"):
        load_tokenizer(tmp_path, {"tokenizer": "tokenizer.json"})
    outside = tmp_path.parent / f"{tmp_path.name}-outside.json"
    outside.write_text("{}")
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="inside the model directory"):
        load_tokenizer(tmp_path, {"tokenizer": "tokenizer.json"})
    with pytest.raises(ModelLoadError, match="integer bos_token_id"):
        load_tokenizer(tmp_path, {"tokenizer": "bytes"})


def test_the_byte_tokenizer_keeps_the_bundled_decoders_behaviour() -> None:
    tokenizer = load_tokenizer(Path("."), {"bos_token_id": 256, "eos_token_id": 257, "vocab_size": 258})
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.encode_bytes(b"\xff\x00a") == [256, 255, 0, 97]  # any bytes, no UTF-8 check
    assert tokenizer.encode("é") == [256, 0xC3, 0xA9] and tokenizer.counts_bos_apart
    assert stream_text(tokenizer, [0xC3, 0xA9, 257]) == [b"\xc3", b"\xa9", b"", b""]


def cache_tensors(layers: int, shape: tuple[int, ...], datatype: str = "FP32") -> list[GraphTensor]:
    return [
        GraphTensor(f"past_key_values.{i}.{k}", datatype, "", shape) for i in range(layers) for k in ("key", "value")
    ]


def decoder_signature(layers: int, shape: tuple[int, ...], datatype: str = "FP32", positions: bool = True):  # type: ignore[no-untyped-def]
    inputs = [GraphTensor("input_ids", "INT64", "", (-1, -1)), GraphTensor("attention_mask", "INT64", "", (-1, -1))]
    if positions:
        inputs.append(GraphTensor("position_ids", "INT64", "", (-1, -1)))
    outputs = [GraphTensor("logits", datatype, "", (-1, -1, 10))] + [
        GraphTensor(f"present.{i}.{k}", datatype, "", shape) for i in range(layers) for k in ("key", "value")
    ]
    return inputs + cache_tensors(layers, shape, datatype), outputs


def test_the_cache_layout_is_read_from_the_graph() -> None:
    layout = DecoderLayout.of(*decoder_signature(3, (-1, 2, -1, 16), "FP16", positions=False), {"num_heads": 8})
    assert (layout.layers, layout.kv_heads, layout.head_dim, layout.position_ids) == (3, 2, 16, False)
    caches = layout.empty_caches(4)
    assert len(caches) == 6 and caches[0].shape == (4, 2, 0, 16) and caches[0].dtype == np.float16
    # Symbolic head dimensions come from generation.json, GQA's KV head count first.
    symbolic = DecoderLayout.of(*decoder_signature(1, (-1, -1, -1, -1)), {"num_kv_heads": 2, "num_heads": 8,
                                                                           "head_dim": 4})
    assert (symbolic.kv_heads, symbolic.head_dim) == (2, 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i, o: ([t for t in i if t.name != "past_key_values.1.value"], o), "layers 0..n-1"),
        (lambda i, o: ([t for t in i if t.name != "attention_mask"], o), "attention_mask"),
        (lambda i, o: (i, [t for t in o if t.name != "present.0.key"]), "outputs present"),
        (lambda i, o: (i[:-1] + [GraphTensor("past_key_values.1.value", "FP16", "", (-1, 2, -1, 16))], o), "FP32 or"),
        (lambda i, o: (i[:-1] + [GraphTensor("past_key_values.1.value", "FP32", "", (-1, 4, -1, 16))], o), "one 4-"),
        (lambda i, o: (i[:-1] + [GraphTensor("past_key_values.1.value", "INT64", "", (-1, 2, -1, 16))], o), "FP32"),
    ],
)
def test_graphs_outside_the_layout_are_refused(change, message: str) -> None:  # type: ignore[no-untyped-def]
    inputs, outputs = change(*decoder_signature(2, (-1, 2, -1, 16)))
    with pytest.raises(ModelLoadError, match=message):
        DecoderLayout.of(inputs, outputs, {})


def test_a_symbolic_head_count_without_generation_json_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="symbolic"):
        DecoderLayout.of(*decoder_signature(1, (-1, -1, -1, 8)), {})


def test_a_models_sampling_defaults_are_checked_like_a_requests() -> None:
    from server.core.sampling import model_sampling_defaults

    assert model_sampling_defaults({"temperature": 0.6, "top_p": 0.9, "do_sample": True}) == {
        "temperature": 0.6, "top_p": 0.9,
    }
    with pytest.raises(ModelLoadError, match="generation_config.json's temperature"):
        model_sampling_defaults({"temperature": -1})
