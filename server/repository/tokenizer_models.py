"""Tokenizer models (`backend: "tokenizer"`): a `tokenizer.json` served as a batching model.

A repository entry looks like an ONNX model with another file:

    minilm_tokenizer/config.pbtxt      backend: "tokenizer", max_batch_size, dynamic_batching,
                                       parameters max_length / pad_to_multiple_of (optional)
    minilm_tokenizer/1/tokenizer.json

It takes `text` (BYTES, dims [1]) and gives `input_ids`, `attention_mask`, `token_type_ids`
(INT64, [-1]) and `token_count` (INT64, [1]); see server/runtime/tokenizer_runtime.py.
Its requests go through the same scheduler as any model, so dynamic batching, queue
policies, statistics and ensembles work unchanged.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from server.core.batcher import HARD_QUEUE_LIMIT
from server.core.errors import InvalidInputError, ModelLoadError
from server.core.model import Model, ModelSignature
from server.core.types import InferRequest, InferResponse
from server.repository import config as model_config
from server.repository.loader import load_versions, warm_up
from server.repository.repository import ModelRepository
from server.runtime.tokenizer_runtime import PROVIDER, TEXT_INPUT, TokenizerRuntime
from server.schema import model_config_pb2 as mc

logger = logging.getLogger(__name__)

TOKENIZER_BACKEND = "tokenizer"
TOKENIZER_FILENAME = "tokenizer.json"


class TokenizerModel(Model):
    """A tokenizer version: like any model, but its text is checked before it is queued.

    The runtime sees a whole dynamic batch; checking UTF-8 there would fail every request
    sharing the batch with one bad one.
    """

    async def infer(self, request: InferRequest, deadline_s: float | None = None) -> InferResponse:
        for tensor in request.inputs:
            if tensor.name == TEXT_INPUT and tensor.datatype == "BYTES":
                _check_utf8(tensor.data)
        return await super().infer(request, deadline_s)


def _check_utf8(data: object) -> None:
    flat = getattr(data, "flat", ())
    for i, item in enumerate(flat):
        if isinstance(item, bytes):
            try:
                item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInputError(f"input '{TEXT_INPUT}' element {i} is not valid UTF-8 text") from None


def _int_parameter(config: mc.ModelConfig, key: str) -> int:
    value = config.parameters[key].string_value if key in config.parameters else "0"
    try:
        number = int(value)
    except ValueError:
        raise ModelLoadError(f"parameters {key} must be an integer, got {value!r}") from None
    if number < 0:
        raise ModelLoadError(f"parameters {key} must be >= 0, got {number}")
    return number


def load_tokenizer_model(
    repository: ModelRepository,
    name: str,
    config: mc.ModelConfig,
    default_max_batch_size: int,
    abandoned: threading.Event | None = None,
) -> list[Model]:
    """Loads every version of a tokenizer model that its version policy selects.

    Raises:
        ModelLoadError: unsupported config fields, no tokenizer.json, an unreadable tokenizer,
            a config that contradicts the tokenizer's tensors; VersionLoadError for one version.
    """
    model_config.check_supported(config)
    max_length = _int_parameter(config, "max_length")
    pad_multiple = _int_parameter(config, "pad_to_multiple_of")

    def load(version: int, path: Path, served: mc.ModelConfig) -> Model:
        count = model_config.instance_count(served)
        instances = [TokenizerRuntime(path, max_length, pad_multiple) for _ in range(count)]
        first = instances[0]
        model_config.complete_config(served, first.inputs, first.outputs, default_max_batch_size)
        served.platform = ""  # complete_config names ONNX Runtime; this is the tokenizer backend
        del served.instance_group[:]
        served.instance_group.add(count=len(instances), kind=mc.ModelInstanceGroup.KIND_CPU)
        served.parameters["execution_provider"].string_value = PROVIDER
        inputs, outputs = model_config.tensor_specs(served)
        signature = ModelSignature(inputs, outputs, served.max_batch_size)
        warm_up(served, signature, instances, repository.model_dir(name))
        scheduling = model_config.scheduler_config(served, HARD_QUEUE_LIMIT)
        logger.info("loaded tokenizer model '%s' version %d (max_length %d)", name, version, first.max_length)
        return TokenizerModel(name, version, TOKENIZER_BACKEND, signature, instances, scheduling, served)

    return load_versions(repository, name, config, TOKENIZER_FILENAME, load, abandoned)
