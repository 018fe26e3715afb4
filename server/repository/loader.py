"""Builds served Model objects from a repository entry."""

from __future__ import annotations

import logging

from server.core.errors import ModelLoadError
from server.core.model import Model, ModelSignature
from server.repository import config as model_config
from server.repository.repository import DEFAULT_MODEL_FILENAME, ModelRepository
from server.runtime import onnx as ort_runtime
from server.rpc.pb import model_config_pb2 as mc

logger = logging.getLogger(__name__)

# Queued requests per model version whatever the config says: bounds memory.
HARD_QUEUE_LIMIT = 10_000


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


def load_model(repository: ModelRepository, name: str, device: str, default_max_batch_size: int) -> list[Model]:
    """Loads every version of `name` that its version policy selects.

    Raises:
        ModelLoadError: with the reason, for anything that stops the model loading.
        ModelNotFoundError / InvalidInputError: for a missing or invalid name.
    """
    config = repository.read_config(name)
    if config.platform == "ensemble" or config.HasField("ensemble_scheduling"):
        raise ModelLoadError("ensemble models are not supported by this server version")
    if config.platform not in ("", model_config.ONNX_PLATFORM) or config.backend not in ("", model_config.ONNX_BACKEND):
        raise ModelLoadError(
            f"platform '{config.platform or config.backend}' is not supported; ortserve serves ONNX models"
        )
    filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise ModelLoadError(f"default_model_filename must be a plain file name, got {filename!r}")
    available = repository.version_dirs(name, filename)
    if not available:
        raise ModelLoadError(f"no numbered version directory holds {filename}")
    versions = select_versions(config.version_policy, list(available))
    models = []
    try:
        for version in versions:
            version_config = mc.ModelConfig()
            version_config.CopyFrom(config)
            models.append(_load_version(repository, name, version, available[version] / filename, version_config, device, default_max_batch_size))
    except BaseException:
        for model in models:
            model.close()
        raise
    return models


def _load_version(
    repository: ModelRepository,
    name: str,
    version: int,
    model_path,
    config: mc.ModelConfig,
    device: str,
    default_max_batch_size: int,
) -> Model:
    options = model_config.session_options(config, device)
    # Read the file once: sessions are made from these bytes, never from the path.
    model_bytes = model_path.read_bytes()
    instances = [ort_runtime.OnnxRuntimeSession(model_bytes, model_path.parent, options)]
    try:
        first = instances[0]
        model_config.complete_config(config, first.inputs, first.outputs, default_max_batch_size)
        for _ in range(model_config.instance_count(config) - 1):
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
        scheduling = model_config.scheduler_config(config, HARD_QUEUE_LIMIT)
        model = Model(name, version, config.platform, signature, instances, scheduling, config)
    except BaseException:
        for instance in instances:
            instance.close()
        raise
    logger.info(
        "loaded model '%s' version %d on %s (%d instance(s), max_batch_size %d)",
        name, version, first.providers[0], len(instances), config.max_batch_size,
    )
    return model
