"""Ensembles in the repository: telling an ensemble config apart, building it, checking its steps.

The registry decides when these run (a load builds off the event loop, then checks the steps
on it, just before the swap); what an acceptable ensemble is lives here, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from server.core.ensemble import ENSEMBLE_PLATFORM, MAX_ENSEMBLE_DEPTH, EnsembleModel, EnsembleStep, check_graph
from server.core.errors import ModelLoadError, quoted
from server.core.model import Model, ModelSignature
from server.repository import config as model_config
from server.repository.repository import VALID_MODEL_NAME, ModelRepository
from server.schema import model_config_pb2 as mc

if TYPE_CHECKING:  # the registry imports this module; its entries are only read here
    from server.repository.registry import ModelEntry

ServedModel = Model | EnsembleModel


def is_ensemble(config: mc.ModelConfig) -> bool:
    """Whether a config describes an ensemble: Triton accepts either the platform or the scheduling block."""
    return config.platform == ENSEMBLE_PLATFORM or config.HasField("ensemble_scheduling")


class StepNotReadyError(ModelLoadError):
    """An ensemble step names a model that is not loaded and ready; `models` says which."""

    def __init__(self, message: str, models: tuple[str, ...]) -> None:
        super().__init__(message)
        self.models = models


def build_ensemble(
    repository: ModelRepository, name: str, source: mc.ModelConfig, lookup: Callable[[str, str], ServedModel]
) -> EnsembleModel:
    """The served ensemble of a config, after the checks that need nothing else loaded.

    Args:
        repository: Where the ensemble's directory (labels, version numbers) lies.
        name: The ensemble's name.
        source: Its config (left unchanged).
        lookup: How a request finds each step's model (the registry's get).

    Raises:
        ModelLoadError: no inputs or outputs, unsupported fields, reshape, untyped tensors, a bad step graph.
    """
    config = mc.ModelConfig()
    config.CopyFrom(source)
    config.name = name
    config.platform = ENSEMBLE_PLATFORM
    if not config.input or not config.output:
        raise ModelLoadError("an ensemble config must list its inputs and outputs")
    model_config.check_supported(config)
    reshaped = [t.name for t in config.input if t.HasField("reshape")]
    reshaped += [t.name for t in config.output if t.HasField("reshape")]
    if reshaped:
        # An ensemble only passes tensors between steps; each step model reshapes its own.
        raise ModelLoadError(f"reshape on ensemble tensor(s) {reshaped[:5]} is not supported; set it on the step model")
    untyped = [t.name for t in config.input if t.data_type == mc.TYPE_INVALID]
    untyped += [t.name for t in config.output if t.data_type == mc.TYPE_INVALID]
    if untyped:
        raise ModelLoadError(f"ensemble tensor(s) {untyped} need a data_type")
    inputs, outputs = model_config.tensor_specs(config)
    steps = [
        EnsembleStep(s.model_name, int(s.model_version), dict(s.input_map), dict(s.output_map))
        for s in config.ensemble_scheduling.step
    ]
    check_graph([i.name for i in inputs], [o.name for o in outputs], steps)
    labels = {o.name: repository.label_file(name, o.label_filename) for o in outputs if o.label_filename}
    version = max(repository.numbered_dirs(name), default=1)
    signature = ModelSignature(inputs, outputs, config.max_batch_size, labels)
    return EnsembleModel(name, version, signature, steps, lookup, config)


def check_steps(model: EnsembleModel, entries: Mapping[str, ModelEntry]) -> None:
    """Refuses an ensemble whose steps name models that are not ready, itself, a cycle, or nest too deep.

    Args:
        model: The ensemble being loaded.
        entries: The registry's models by name, as they are at the swap.

    Raises:
        StepNotReadyError: a step's model is not loaded and ready (poll mode retries later).
        ModelLoadError: a step names the ensemble itself, a missing version, a cycle or too deep a nesting.
    """
    for index, step in enumerate(model.steps, 1):
        label = f"step {index} (model {quoted(step.model_name)})"
        if step.model_name == model.name:
            raise ModelLoadError(f"{label} is the ensemble itself: ensembles may not form a cycle")
        if not VALID_MODEL_NAME.match(step.model_name):
            raise ModelLoadError(f"{label} names an invalid model name")
        entry = entries.get(step.model_name)
        if entry is None or not entry.serving:
            why = "does not exist or is not loaded" if entry is None else f"is not ready ({entry.state.lower()})"
            raise StepNotReadyError(f"{label}: that model {why}", (step.model_name,))
        if 0 < step.model_version and step.model_version not in entry.versions:
            served = ", ".join(str(v) for v in sorted(entry.versions))
            raise ModelLoadError(
                f"{label} asks for version {step.model_version}, which is not served (serving: {served})"
            )
    _nesting(model.steps, (model.name,), {}, entries)


def _nesting(
    steps: list[EnsembleStep], chain: tuple[str, ...], known: dict[str, int], entries: Mapping[str, ModelEntry]
) -> int:
    """How many ensembles deep the steps nest below `chain`; refuses cycles and depths over the bound."""
    deepest = 0
    for step in steps:
        if step.model_name in chain:  # chain[0] is the model being loaded, with its new config
            raise ModelLoadError(f"ensembles may not form a cycle: {' -> '.join((*chain, step.model_name))}")
        entry = entries.get(step.model_name)
        for served in (entry.versions.values() if entry is not None else ()):
            if not isinstance(served, EnsembleModel):
                continue
            if served.name in chain:
                path = " -> ".join((*chain, served.name))
                raise ModelLoadError(f"ensembles may not form a cycle: {path}")
            if len(chain) >= MAX_ENSEMBLE_DEPTH:
                raise ModelLoadError(
                    f"ensembles nest more than {MAX_ENSEMBLE_DEPTH} deep: {' -> '.join((*chain, served.name))}"
                )
            if served.name not in known:
                known[served.name] = 1 + _nesting(served.steps, (*chain, served.name), known, entries)
            deepest = max(deepest, known[served.name])
    return deepest
