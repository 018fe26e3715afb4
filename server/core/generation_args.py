"""Text-generation requests in Triton's tensor convention, read into a prompt and SamplingParams.

Kept apart from the scheduler: reading a request is the same whatever runs it, and its
rules (where each setting may come from, what types it takes) change on their own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.errors import InvalidInputError, quoted
from server.core.sampling import MAX_STOP_STRINGS, MODEL_DEFAULTED, SamplingParams
from server.core.types import InferRequest, ParamValue


@dataclass(frozen=True)
class GenerationArgs:
    """A text-generation request in Triton's tensor convention, decoded.

    Inputs: `text_input` (BYTES), and optionally `max_tokens` (INT32), `stream` (BOOL),
    `sampling_parameters` (BYTES, a JSON object), `exclude_input_in_output` (BOOL),
    `min_length` (INT32, TensorRT-LLM's name for min_tokens).
    """

    prompt: bytes
    params: SamplingParams
    stream: bool
    exclude_input: bool
    empty_final: bool = False  # request parameter triton_enable_empty_final_response


# What each sampling setting must be; the same names in the JSON `sampling_parameters` and as
# request parameters (Triton's vLLM backend accepts both).
_SETTINGS = {
    "max_tokens": "int", "temperature": "number", "top_k": "int", "top_p": "number",
    "repetition_penalty": "number", "seed": "int", "ignore_eos": "bool", "min_tokens": "int", "stop": "stop",
}
# Request options that also have their own input tensors; the JSON may give them too.
_OPTIONS = {"stream": "bool", "exclude_input_in_output": "bool"}
# Request parameters clients send that are not sampling settings.
_EMPTY_FINAL = "triton_enable_empty_final_response"
_UNSUPPORTED_UNLESS_ZERO = ("priority", "timeout")  # tritonclient sends them only when set
# The JSON holds a few numbers and at most MAX_STOP_STRINGS short strings.
MAX_SAMPLING_JSON_BYTES = 16384


def _convert(where: str, kind: str, value: Any) -> Any:
    """A setting's value in the type SamplingParams wants; InvalidInputError when it is not one."""
    if isinstance(value, np.generic):
        value = value.item()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise InvalidInputError(f"{where} must be true or false, got {quoted(value)}")
    if kind == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidInputError(f"{where} must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidInputError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        return tuple(stops)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{where} must be a number, got {quoted(value)}")
    if not math.isfinite(value):
        raise InvalidInputError(f"{where} must be a finite number, got {value}")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidInputError(f"{where} must be an integer, got {value}")
            value = int(value)
        return value
    return float(value)


def _parse_json_object(raw: Any) -> dict[str, Any]:
    """The JSON `sampling_parameters`: a flat object with no repeated keys."""
    data = bytes(raw)
    if len(data) > MAX_SAMPLING_JSON_BYTES:
        raise InvalidInputError(
            f"sampling_parameters is {len(data)} bytes; at most {MAX_SAMPLING_JSON_BYTES} are allowed"
        )

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise InvalidInputError(f"sampling_parameters gives {quoted(key)} more than once")
            out[key] = value
        return out

    try:
        parsed = json.loads(data.decode("utf-8"), object_pairs_hook=pairs)
    except RecursionError as exc:  # deep nesting: json's parser recurses once per level
        raise InvalidInputError("sampling_parameters is nested too deeply; it must be a flat JSON object") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInputError("sampling_parameters is not UTF-8 text") from exc
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
        raise InvalidInputError(f"sampling_parameters is not valid JSON: {quoted(exc)}") from exc
    if not isinstance(parsed, dict):
        raise InvalidInputError("sampling_parameters must be a JSON object")
    for key, value in parsed.items():
        if isinstance(value, dict) or (isinstance(value, list) and key != "stop"):
            raise InvalidInputError(f"sampling_parameters.{key} must be a plain value; the object must be flat")
    return parsed


def request_args(
    request: InferRequest, validate: Callable[[InferRequest], object], default_stream: bool
) -> GenerationArgs:
    """generation_args() of a decoded ModelInfer request, after `validate` (the model's signature check).

    Scalar inputs may be shaped [1] or [1, 1]: TensorRT-LLM's models batch, so Triton clients
    written for them send every scalar with a batch dimension of one.
    """
    for tensor in request.inputs:
        if tuple(tensor.shape) == (1, 1):
            tensor.shape = (1,)
            tensor.data = tensor.data.reshape(1)
    validate(request)
    return generation_args({t.name: t.data for t in request.inputs}, default_stream, request.parameters)


def generation_args(
    inputs: dict[str, np.ndarray], default_stream: bool, parameters: Mapping[str, ParamValue] | None = None
) -> GenerationArgs:
    """Reads the text-generation tensors and request parameters of a request.

    A setting may come from an input tensor (`max_tokens`, `min_length`, `stream`,
    `exclude_input_in_output`), from the JSON `sampling_parameters`, or from a request
    parameter of the same name; given in more than one place, the values must agree.

    Raises:
        InvalidInputError: missing prompt, bad JSON, unknown settings or request parameters,
            values of the wrong type or out of bounds, a setting given twice differently.
    """
    def scalar(name: str) -> Any:
        value = inputs.get(name)
        if value is None:
            return None
        if value.size != 1:
            raise InvalidInputError(f"input '{name}' must hold exactly one element, got {value.size}")
        return value.reshape(-1)[0]

    prompt = scalar("text_input")
    if prompt is None:
        raise InvalidInputError("missing input 'text_input' (BYTES)")
    given: dict[str, tuple[str, Any]] = {}  # setting -> (where it came from, value)

    def give(key: str, where: str, value: Any) -> None:
        earlier = given.get(key)
        if earlier is not None and earlier[1] != value:
            raise InvalidInputError(
                f"{key} is given twice with different values ({earlier[0]}: {quoted(earlier[1])}, "
                f"{where}: {quoted(value)})"
            )
        given[key] = (where, value)

    for name, key, kind in (
        ("max_tokens", "max_tokens", "int"), ("min_length", "min_tokens", "int"),
        ("stream", "stream", "bool"), ("exclude_input_in_output", "exclude_input_in_output", "bool"),
    ):
        value = scalar(name)
        if value is not None:
            give(key, f"input '{name}'", _convert(f"input '{name}'", kind, value))
    raw_json = scalar("sampling_parameters")
    if raw_json is not None:
        for key, value in _parse_json_object(raw_json).items():
            json_kind = _SETTINGS.get(key) or _OPTIONS.get(key)
            if json_kind is None:
                raise InvalidInputError(
                    f"unknown sampling parameter {quoted(key)}; known: {', '.join([*_SETTINGS, *_OPTIONS])}"
                )
            give(key, "sampling_parameters", _convert(f"sampling_parameters.{key}", json_kind, value))
    empty_final = False
    for key, value in (parameters or {}).items():
        if key in _SETTINGS:
            give(key, "request parameter", _convert(f"request parameter '{key}'", _SETTINGS[key], value))
        elif key == _EMPTY_FINAL:
            empty_final = _convert(f"request parameter '{key}'", "bool", value)
        elif key in _UNSUPPORTED_UNLESS_ZERO:
            if value != 0 or isinstance(value, bool):
                raise InvalidInputError(
                    f"request parameter '{key}' is not supported by text-generation models (got {quoted(value)})"
                )
        else:
            raise InvalidInputError(
                f"unknown request parameter {quoted(key)} for a text-generation model; known: "
                f"{', '.join([*_SETTINGS, _EMPTY_FINAL])}"
            )
    options = {key: value for key, (_, value) in given.items() if key in _SETTINGS}
    params = SamplingParams(**options, unset=frozenset(MODEL_DEFAULTED) - set(options))
    params.check()
    stream = given.get("stream")
    exclude = given.get("exclude_input_in_output")
    return GenerationArgs(
        prompt=bytes(prompt),
        params=params,
        stream=default_stream if stream is None else bool(stream[1]),
        exclude_input=False if exclude is None else bool(exclude[1]),
        empty_final=bool(empty_final),
    )
