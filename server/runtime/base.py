"""The contract between the scheduler and an execution backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GraphTensor:
    """A tensor as the model file itself declares it.

    Attributes:
        name: Tensor name.
        datatype: Protocol datatype string, or "" if the protocol cannot carry the type.
        type_name: The backend's own type name, for error messages.
        shape: Dimensions; -1 for a symbolic or unknown dimension.
    """

    name: str
    datatype: str
    type_name: str
    shape: tuple[int, ...]


class Runtime(ABC):
    """One loaded copy of a model (one model instance) that can run a batch.

    Each implementation sets the three attributes when it is created; they do not change afterwards.

    Attributes:
        inputs: The graph's inputs.
        outputs: The graph's outputs.
        providers: The execution providers actually in use, best first.
    """

    inputs: Sequence[GraphTensor]
    outputs: Sequence[GraphTensor]
    providers: Sequence[str]
    # True when a run only computes on this CPU (waits on no device, lock or gate), so that a short one may
    # run on the event loop itself; the scheduler decides when, from measured run times and load.
    may_run_on_loop: bool = False

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Runs the graph; blocks, so callers run it off the event loop.

        BYTES tensors go in and come out as object arrays of `bytes`.
        """

    def close(self) -> None:  # noqa: B027 - a hook with a default: a runtime holding nothing need not override it
        """Releases the instance's resources."""
