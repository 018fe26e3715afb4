"""Plain request and response types that flow between the front ends, the data plane and the core."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ParamValue = bool | int | float | str


@dataclass
class InputTensor:
    """One input of a request, already decoded into a numpy array.

    Fixed-size types are views over the received bytes; BYTES is an object array of
    `bytes` elements.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class RequestedOutput:
    """An output the client asked for; classification_count > 0 asks for top-k labels."""

    name: str
    classification_count: int = 0


@dataclass
class InferRequest:
    """A decoded ModelInfer request."""

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass
class OutputTensor:
    """One output of a response."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class InferResponse:
    """The result of one request."""

    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor] = field(default_factory=list)
    parameters: dict[str, ParamValue] = field(default_factory=dict)


# The response parameter that flags the last response of a decoupled series (Triton's name).
FINAL_PARAMETER = "triton_final_response"


@dataclass(frozen=True)
class TextResponse:
    """One response of Triton's text-generation convention (see Model.text_responses).

    Attributes:
        text: The `text_output`; None for the empty final response (no output at all).
        final: Whether this is the last response of a decoupled series; None for a unary
            answer, which is not one of a series (no `triton_final_response` parameter).
    """

    model_name: str
    model_version: str
    id: str
    text: str | None
    final: bool | None

    def to_infer_response(self) -> InferResponse:
        """The same response as a tensor response: `text_output` a BYTES [1] tensor."""
        response = InferResponse(self.model_name, self.model_version, self.id)
        if self.final is not None:
            response.parameters[FINAL_PARAMETER] = self.final
        if self.text is not None:
            data = np.array([self.text.encode("utf-8")], dtype=object)
            response.outputs.append(OutputTensor("text_output", "BYTES", (1,), data))
        return response


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the model configuration declares it.

    Attributes:
        name: Tensor name.
        datatype: Protocol datatype string.
        dims: Shape without the batch dimension when the model batches; -1 is variable.
        label_filename: For outputs, the label file named by the config ("" if none).
        optional: For inputs, whether a request may leave it out.
        reshape: The model's own shape (after the batch dimension) when the config's
            `reshape` differs from `dims`; None when the model has `dims`.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    label_filename: str = ""
    optional: bool = False
    reshape: tuple[int, ...] | None = None
