"""SignatureValidator remembers the input layouts it found valid; everything invalid is refused every time."""

from __future__ import annotations

import numpy as np
import pytest

from server.core import model as model_module
from server.core.errors import InvalidInputError
from server.core.model import ModelSignature, SignatureValidator, _scheduling_parameters
from server.core.types import InferRequest, InputTensor, RequestedOutput, TensorSpec


def validator() -> SignatureValidator:
    signature = ModelSignature(
        [TensorSpec("x", "FP32", (4,)), TensorSpec("n", "INT64", (-1,)), TensorSpec("o", "FP32", (1,), optional=True)],
        [TensorSpec("y", "FP32", (4,)), TensorSpec("z", "FP32", (1,))],
        8,
    )
    return SignatureValidator("m", signature)


def request(*tensors: tuple[str, str, tuple[int, ...]]) -> InferRequest:
    inputs = []
    for name, datatype, shape in tensors:
        dtype = np.float32 if datatype == "FP32" else np.int64
        inputs.append(InputTensor(name, datatype, shape, np.zeros(shape, dtype)))
    return InferRequest("m", inputs=inputs)


VALID = (("x", "FP32", (2, 4)), ("n", "INT64", (2, 3)))


def test_a_valid_layout_is_checked_once_and_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    checking = validator()
    assert checking.validate(request(*VALID)) == 2
    monkeypatch.setattr(checking, "_check", lambda r: pytest.fail("checked again"))
    assert checking.validate(request(*VALID)) == 2
    # Another layout is a new question.
    monkeypatch.undo()
    assert checking.validate(request(("x", "FP32", (3, 4)), ("n", "INT64", (3, 7)))) == 3


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ((("x", "FP32", (2, 5)), ("n", "INT64", (2, 3))), "has shape [2, 5]"),
        ((("x", "FP32", (9, 4)), ("n", "INT64", (9, 3))), "over model 'm''s max_batch_size 8"),
        ((("x", "FP32", (2, 4)), ("n", "INT64", (3, 3))), "disagree on the batch size"),
        ((("x", "FP32", (2, 4)), ("n", "FP32", (2, 3))), "has datatype 'FP32'"),
        ((("x", "FP32", (2, 4)),), "missing input(s) n"),
        ((("x", "FP32", (2, 4)), ("n", "INT64", (2, 3)), ("x", "FP32", (2, 4))), "given more than once"),
        ((("x", "FP32", (2, 4)), ("n", "INT64", (2, 3)), ("w", "FP32", (2, 1))), "unexpected input 'w'"),
        ((("x", "FP32", (0, 4)), ("n", "INT64", (0, 3))), "batch dimension of at least 1"),
    ],
)
def test_an_invalid_layout_is_refused_every_time_beside_a_remembered_valid_one(
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...], message: str
) -> None:
    checking = validator()
    assert checking.validate(request(*VALID)) == 2
    for _ in range(3):
        with pytest.raises(InvalidInputError) as refused:
            checking.validate(request(*tensors))
        assert message in str(refused.value)
    assert checking.validate(request(*VALID)) == 2


def test_a_shape_given_as_a_list_is_checked_and_not_remembered() -> None:
    checking = validator()
    listed = request(*VALID)
    listed.inputs[0].shape = [2, 4]  # type: ignore[assignment]
    assert checking.validate(listed) == 2
    listed.inputs[0].shape = [2, 5]  # type: ignore[assignment]
    with pytest.raises(InvalidInputError):
        checking.validate(listed)


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "VALID_LAYOUTS_KEPT", 4)
    checking = validator()
    for length in range(1, 12):
        assert checking.validate(request(("x", "FP32", (1, 4)), ("n", "INT64", (1, length)))) == 1
        assert len(checking._valid_layouts) <= 4


def test_requested_outputs_default_to_all_and_are_checked_when_given() -> None:
    checking = validator()
    assert [o.name for o in checking.requested_outputs([])] == ["y", "z"]
    assert [o.name for o in checking.requested_outputs([RequestedOutput("z")])] == ["z"]
    with pytest.raises(InvalidInputError, match="unknown output 'q'"):
        checking.requested_outputs([RequestedOutput("q")])
    assert [o.name for o in checking.requested_outputs([])] == ["y", "z"]  # the shared default is unchanged


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, (0, 0)),
        ({"triton_enable_empty_final_response": True, "sequence_id": 3}, (0, 0)),
        ({"priority": 2}, (2, 0)),
        ({"timeout": 500}, (0, 500)),
        ({"priority": 1, "timeout": 7}, (1, 7)),
    ],
)
def test_scheduling_parameters(parameters: dict, expected: tuple[int, int]) -> None:
    assert _scheduling_parameters(parameters) == expected


@pytest.mark.parametrize("parameters", [{"priority": -1}, {"timeout": "soon"}, {"priority": True}, {"timeout": 1.5}])
def test_bad_scheduling_parameters_are_refused(parameters: dict) -> None:
    with pytest.raises(InvalidInputError, match="must be a non-negative integer"):
        _scheduling_parameters(parameters)
