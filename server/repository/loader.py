"""Builds served Model objects from a repository entry."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from server.core import bytes_codec, datatypes
from server.core.batcher import HARD_QUEUE_LIMIT, SchedulerConfig
from server.core.errors import ModelLoadError, first_line
from server.core.generation import GenerationScheduler
from server.core.model import Model, ModelSignature, to_model_shape
from server.core.types import TensorSpec
from server.repository import config as model_config
from server.repository.ensembles import is_ensemble
from server.repository.repository import (
    DEFAULT_MODEL_FILENAME,
    LoadAbandonedError,
    ModelRepository,
    VersionLoadError,
)
from server.runtime import gate
from server.runtime import onnx as ort_runtime
from server.runtime.base import Runtime
from server.schema import model_config_pb2 as mc

logger = logging.getLogger(__name__)


def select_versions(policy: mc.ModelVersionPolicy, available: list[int]) -> list[int]:
    """Applies Triton's version_policy; the default serves the latest version only."""
    available = sorted(available)
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        wanted = set(policy.specific.versions)
        missing = sorted(wanted - set(available))
        if missing:
            raise ModelLoadError(f"version_policy asks for version(s) {missing}, which are not in the repository")
        return sorted(wanted)
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions > 0 else 1
    return available[-count:]


def load_model(
    repository: ModelRepository,
    name: str,
    device: str,
    default_max_batch_size: int,
    config_override: mc.ModelConfig | None = None,
    abandoned: threading.Event | None = None,
) -> list[Model]:
    """Loads, and warms up, every version of `name` that its version policy selects.

    Args:
        repository: Where the model lives.
        name: Model name.
        device: The server's --device.
        default_max_batch_size: For fully auto-completed configs.
        config_override: Used instead of the config file (RepositoryModelLoad's `config`).
        abandoned: Set when nobody waits for this load any more: the load stops between
            instances and releases what it built (LoadAbandonedError).

    Raises:
        ModelLoadError: with the reason, for anything that stops the model loading;
            VersionLoadError when one version is at fault.
        ModelNotFoundError / InvalidInputError: for a missing or invalid name.
    """
    if config_override is not None:
        repository.model_dir(name)
        config = mc.ModelConfig()
        config.CopyFrom(config_override)
        if config.name and config.name != name:
            raise ModelLoadError(f"config names model '{config.name}' but the request loads '{name}'")
        config.name = name
    else:
        config = repository.read_config(name)
    if is_ensemble(config):
        raise ModelLoadError("an ensemble is loaded by the registry, not as an ONNX model")
    if config.backend == "tokenizer":  # a tokenizer.json served as a model (tokenizer_models.py)
        from server.repository.tokenizer_models import load_tokenizer_model

        return load_tokenizer_model(repository, name, config, default_max_batch_size, abandoned)
    if config.platform not in ("", model_config.ONNX_PLATFORM) or config.backend not in ("", model_config.ONNX_BACKEND):
        raise ModelLoadError(
            f"platform '{config.platform or config.backend}' is not supported; ortserve serves ONNX models"
        )
    # Before any session is built: refused features and unbounded values cost nothing.
    model_config.check_supported(config, generation=(repository.model_dir(name) / GENERATION_FILE).is_file())

    def load(version: int, path: Path, version_config: mc.ModelConfig) -> Model:
        return _load_version(
            repository, name, version, path, version_config, device, default_max_batch_size, abandoned
        )

    return load_versions(repository, name, config, DEFAULT_MODEL_FILENAME, load, abandoned)


def load_versions(
    repository: ModelRepository,
    name: str,
    config: mc.ModelConfig,
    default_filename: str,
    load_one: Callable[[int, Path, mc.ModelConfig], Model],
    abandoned: threading.Event | None = None,
) -> list[Model]:
    """Every version the config's policy selects, each built by `load_one(version, model file, its own config
    copy)`; on any failure the versions already built are closed.

    Raises:
        ModelLoadError: a bad default_model_filename, or no version folder holds the file;
            VersionLoadError for the version at fault; LoadAbandonedError when nobody waits any more.
    """
    filename = config.default_model_filename or default_filename
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise ModelLoadError(f"default_model_filename must be a plain file name, got {filename!r}")
    available, refused = repository.scan_versions(name, filename)
    if not available and not refused:
        raise ModelLoadError(f"no numbered version directory holds {filename}")
    # Refused versions (symlinks out of the model directory) count for the version policy,
    # so a refused newest version is reported as failing rather than skipped silently.
    versions = select_versions(config.version_policy, list(available) + list(refused))
    models: list[Model] = []
    try:
        for version in versions:
            if version in refused:
                raise VersionLoadError(version, refused[version])
            if abandoned is not None and abandoned.is_set():
                raise LoadAbandonedError("load abandoned")
            version_config = mc.ModelConfig()
            version_config.CopyFrom(config)
            try:
                models.append(load_one(version, available[version] / filename, version_config))
            except LoadAbandonedError:
                raise
            except ModelLoadError as exc:
                raise VersionLoadError(version, str(exc)) from exc
    except BaseException:
        for model in models:
            model.close()
        raise
    return models


def _load_version(
    repository: ModelRepository,
    name: str,
    version: int,
    model_path: Path,
    config: mc.ModelConfig,
    device: str,
    default_max_batch_size: int,
    abandoned: threading.Event | None = None,
) -> Model:
    # A text-generation model keeps every CPU of the process whatever the worker count: a stream's steps
    # run one after another, and one thread per step costs a single stream 36-43% more time per token.
    generation_file = repository.model_dir(name) / GENERATION_FILE
    options = model_config.session_options(config, device, share_with_workers=not generation_file.is_file())
    # Read the files once: sessions are made from these bytes, never from the paths.
    model_bytes = read_model_bytes(model_path)
    instances = [ort_runtime.OnnxRuntimeSession(model_bytes, model_path.parent, options)]
    try:
        first = instances[0]
        model_config.complete_config(config, first.inputs, first.outputs, default_max_batch_size)
        for _ in range(model_config.instance_count(config) - 1):
            # Building a session is slow blocking work: stop as soon as nobody waits for it.
            if abandoned is not None and abandoned.is_set():
                raise LoadAbandonedError("load abandoned")
            instances.append(ort_runtime.OnnxRuntimeSession(model_bytes, model_path.parent, options))
        inputs, outputs = model_config.tensor_specs(config)
        labels = {o.name: repository.label_file(name, o.label_filename) for o in outputs if o.label_filename}
        used_gpu = ort_runtime.CUDA in first.providers or ort_runtime.TENSORRT in first.providers
        if not config.instance_group:
            config.instance_group.add(count=1)
        for group in config.instance_group:
            group.kind = mc.ModelInstanceGroup.KIND_GPU if used_gpu else mc.ModelInstanceGroup.KIND_CPU
            group.count = max(group.count, 1)
        config.parameters["execution_provider"].string_value = first.providers[0]
        signature = ModelSignature(inputs, outputs, config.max_batch_size, labels)
        scheduling = _with_padding(model_config.scheduler_config(config, HARD_QUEUE_LIMIT), config, signature)
        warm_up(config, signature, instances, repository.model_dir(name))
        # After warm-up: a test gate holds only the runs of real requests.
        served = gate.wrap(instances, gate.gate_dir_from({k: v.string_value for k, v in config.parameters.items()}))
        generator = None
        if generation_file.is_file():
            generator, signature = _generation_setup(config, served[0], generation_file)
        model = Model(name, version, config.platform, signature, served, scheduling, config, generator)
    except BaseException:
        for instance in instances:
            instance.close()
        raise
    logger.info(
        "loaded model '%s' version %d on %s (%d instance(s), max_batch_size %d, intra-op threads %s)",
        name, version, first.providers[0], len(instances), config.max_batch_size,
        options.intra_op_threads or "ONNX Runtime's default",
    )
    return model


GENERATION_FILE = "generation.json"
TEXT_INPUTS = [
    ("text_input", "BYTES", False),
    ("max_tokens", "INT32", True),
    ("stream", "BOOL", True),
    ("sampling_parameters", "BYTES", True),
    ("exclude_input_in_output", "BOOL", True),
    ("min_length", "INT32", True),
]


def _generation_setup(
    config: mc.ModelConfig, runtime: Runtime, path: Path
) -> tuple[GenerationScheduler, ModelSignature]:
    """A decoder with generation.json is served as text in, text out (Triton's convention), decoupled.

    The graph must be in the common decoder layout (server/core/decoder_layout.py); the
    tokenizer is the one generation.json's `tokenizer` names (server/core/tokenizer.py).
    """
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("it must hold a JSON object")
        params = {k: v.string_value for k, v in config.parameters.items()}
        scheduler = GenerationScheduler(
            runtime,
            info,
            max_num_seqs=int(params.get("max_num_seqs", "32")),
            max_queued=int(params.get("max_queued_generations", "256")),
            max_batch_tokens=int(params.get("max_batch_tokens", "0")),
            stream_interval=int(params.get("stream_interval", "0")),
            model_dir=path.parent,  # the tokenizer's files lie beside generation.json
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{GENERATION_FILE} is not usable: {exc}") from exc
    del config.input[:]
    del config.output[:]
    config.max_batch_size = 0
    for name, datatype, optional in TEXT_INPUTS:
        config.input.add(name=name, data_type=model_config.config_type(datatype), dims=[1], optional=optional)
    config.output.add(name="text_output", data_type=model_config.config_type("BYTES"), dims=[-1])
    config.model_transaction_policy.decoupled = True
    config.parameters["max_num_seqs"].string_value = str(scheduler.max_num_seqs)
    inputs, outputs = model_config.tensor_specs(config)
    return scheduler, ModelSignature(inputs, outputs, 0)


def read_model_bytes(path: Path) -> bytes:
    """The model file with any external weight files folded in, all read now.

    External data must lie inside the version directory: a model may not read
    files elsewhere on the machine. The folded model must fit protobuf's 2 GiB.

    Raises:
        ModelLoadError: unreadable file, external data outside the directory, too big.
    """
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and others for garbage
        raise ModelLoadError(f"{path.name} is not an ONNX model: {type(exc).__name__}") from exc
    external = [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
    if not external:
        return data
    base = path.parent.resolve()
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base) or not target.is_file():
            raise ModelLoadError(f"external data '{location}' of '{tensor.name}' is not a file inside {base.name}/")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
        return model.SerializeToString()
    except ValueError as exc:
        raise ModelLoadError(f"model with external data is too large to hold in memory: {exc}") from exc


def _warmup_array(name: str, spec: TensorSpec, entry: mc.ModelWarmup.Input, batch: int, model_dir: Path) -> np.ndarray:
    dims = list(entry.dims) or [d if d > 0 else 1 for d in spec.dims]
    shape = ([batch] if batch > 0 else []) + dims
    dtype = datatypes.BY_NAME[spec.datatype]
    count = math.prod(shape)
    if count > model_config.MAX_WARMUP_ELEMENTS:
        raise ModelLoadError(
            f"warm-up input '{name}' of shape {shape[:8]} has {count} elements; at most "
            f"{model_config.MAX_WARMUP_ELEMENTS} are allowed"
        )
    kind = entry.WhichOneof("input_data_type")
    if kind == "input_data_file":
        path = (model_dir / "warmup" / entry.input_data_file).resolve()
        if not path.is_relative_to(model_dir / "warmup") or not path.is_file():
            raise ModelLoadError(f"warm-up file '{entry.input_data_file}' is not in {model_dir.name}/warmup/")
        raw = path.read_bytes()
        if spec.datatype == "BYTES":
            one = bytes_codec.decode_bytes(raw, count // max(batch, 1), name)
            return np.concatenate([one] * max(batch, 1)).reshape(shape)
        single = np.frombuffer(raw, dtype=dtype.numpy_dtype)
        return np.concatenate([single] * max(batch, 1)).reshape(shape)
    if spec.datatype == "BYTES":
        return np.full(shape, b"", dtype=object)
    if kind == "random_data":
        rng = np.random.default_rng(0)
        if dtype.numpy_dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype.numpy_dtype)
        if dtype.numpy_dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(bool)
        return rng.integers(0, 8, shape).astype(dtype.numpy_dtype)
    return np.zeros(shape, dtype=dtype.numpy_dtype)


def warm_up(config: mc.ModelConfig, signature: ModelSignature, instances: Sequence[Runtime], model_dir: Path) -> None:
    """Runs Triton's model_warmup samples on every instance before the model is ready.

    Raises:
        ModelLoadError: a sample names unknown inputs or its run fails.
    """
    specs = {s.name: s for s in signature.inputs}
    outputs = [o.name for o in signature.outputs]
    for sample in config.model_warmup:
        unknown = sorted(set(sample.inputs) - set(specs))
        if unknown:
            raise ModelLoadError(f"warm-up '{sample.name}' names unknown input(s) {unknown}")
        batch = max(sample.batch_size, 1) if signature.max_batch_size > 0 else 0
        if batch > signature.max_batch_size:
            raise ModelLoadError(
                f"warm-up '{sample.name}' batch_size {batch} is over max_batch_size {signature.max_batch_size}"
            )
        try:
            # Warm-up dims are the config's dims, as requests carry them; the model gets its reshape.
            feed = {
                n: to_model_shape(specs[n], _warmup_array(n, specs[n], e, batch, model_dir), batch > 0)
                for n, e in sample.inputs.items()
            }
            for instance in instances:
                for _ in range(max(sample.count, 1)):
                    instance.run(feed, outputs)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"warm-up '{sample.name}' failed: {first_line(exc)}") from exc


PAD_PARAMETER = "pad_batch_inputs"


def _with_padding(scheduling: SchedulerConfig, config: mc.ModelConfig, signature: ModelSignature) -> SchedulerConfig:
    """The `pad_batch_inputs` parameter (ours): inputs whose sequence dimension may differ within a run.

    Requests of different lengths then share a run, each padded with zeros to the longest; the outputs
    are returned as the model computes them, so only models whose outputs do not depend on the padded
    length (pooled embeddings, classifier logits, with an attention mask that zeros out the padding)
    may use it: an output with a variable dimension is refused.

    Raises:
        ModelLoadError: unknown inputs, inputs without a variable first dimension, no dynamic batching,
            or outputs of variable shape.
    """
    entry = config.parameters.get(PAD_PARAMETER)
    names = frozenset(n.strip() for n in (entry.string_value if entry is not None else "").split(",") if n.strip())
    if not names:
        return scheduling
    where = f"parameters {PAD_PARAMETER}"
    if not scheduling.dynamic_batching:
        raise ModelLoadError(f"{where} needs dynamic_batching")
    specs = {spec.name: spec for spec in signature.inputs}
    for name in sorted(names):
        spec = specs.get(name)
        if spec is None:
            raise ModelLoadError(f"{where} names {name!r}, which is not an input")
        if not spec.dims or spec.dims[0] != -1:
            raise ModelLoadError(f"{where}: input {name!r} has no variable first dimension to pad ({list(spec.dims)})")
    varying = [o.name for o in signature.outputs if -1 in o.dims]
    if varying:
        raise ModelLoadError(f"{where}: outputs {varying} have a variable dimension; padding would show in them")
    return dataclasses.replace(scheduling, padded_inputs=names)

