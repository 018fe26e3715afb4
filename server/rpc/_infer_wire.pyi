"""Types of the compiled module server/rpc/_infer_wire.c (see its header for the contract)."""

from collections.abc import Sequence
from typing import Any

InputEntry = tuple[str, str, tuple[int, ...], int, int]
# (name, datatype, shape, contents): contents is any C-contiguous buffer.
OutputEntry = tuple[str, str, tuple[int, ...], Any]

ParsedRequest = tuple[str, str, str, list[InputEntry], list[str], dict[str, bool | int | float | str]]

def parse_request(data: bytes, /) -> ParsedRequest | None: ...
def encode_response(model_name: str, model_version: str, id: str, outputs: Sequence[OutputEntry], /) -> bytes: ...
