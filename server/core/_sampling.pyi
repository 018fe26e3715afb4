"""Types of the compiled draw in _sampling.c (see sampling.draw)."""

from collections.abc import Sequence
from typing import Any

def sample_rows(
    logits: Any,
    allowed: Sequence[int],
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    penalty: Sequence[float],
    seen: Sequence[Sequence[int]],
    uniform: Sequence[float],
) -> list[int]: ...
