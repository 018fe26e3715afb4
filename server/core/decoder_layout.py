"""What a decoder's ONNX graph says about its key/value cache: layers, heads, head size, dtype.

The common layout (the one Hugging Face Optimum's `text-generation-with-past` export and
our exporters write): inputs `input_ids` [B, S], `attention_mask` [B, P+S], optionally
`position_ids` [B, S] (models that compute positions from the mask leave it out), and per
layer `past_key_values.{i}.key|value` [B, KV heads, P, head size]; outputs `logits` [B, S, V]
and `present.{i}.key|value`. The cache's head count may be smaller than the attention's
(grouped-query attention), and its element type FP32 or FP16: both are read from the graph
rather than assumed, with generation.json only filling dimensions the graph leaves symbolic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.core.errors import ModelLoadError
from server.runtime.base import GraphTensor

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_CACHE_TYPES = {"FP32": np.float32, "FP16": np.float16}


@dataclass(frozen=True)
class DecoderLayout:
    """The cache tensors of one decoder graph.

    Attributes:
        layers: Number of layers (each with a key and a value cache).
        kv_heads: Heads of the key/value cache (fewer than the query heads under GQA).
        head_dim: Size of one head.
        cache_dtype: The caches' numpy type (float32 or float16).
        position_ids: Whether the graph takes `position_ids`.
    """

    layers: int
    kv_heads: int
    head_dim: int
    cache_dtype: type[np.generic]
    position_ids: bool

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]

    def empty_caches(self, rows: int) -> list[np.ndarray]:
        """Past caches of length 0 (a prefill's), key then value for each layer."""
        shape = (rows, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.cache_dtype) for _ in range(2 * self.layers)]

    @classmethod
    def of(
        cls, inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor], info: Mapping[str, Any]
    ) -> DecoderLayout:
        """Reads the layout from a graph's signature, and generation.json for symbolic dimensions.

        Raises:
            ModelLoadError: a required tensor is missing, the layers are not numbered 0..n-1 with
                a key and a value each, the caches disagree in shape or type, or a head dimension
                is neither in the graph nor in generation.json.
        """
        names = {t.name: t for t in inputs}
        missing = [n for n in ("input_ids", "attention_mask") if n not in names]
        out_names = {t.name for t in outputs}
        if missing or "logits" not in out_names:
            raise ModelLoadError(
                "a generation model needs inputs input_ids and attention_mask and the output logits "
                f"(missing: {', '.join(missing + ([] if 'logits' in out_names else ['logits']))})"
            )
        past = {(int(m.group(1)), m.group(2)): names[n] for n in names if (m := _PAST.match(n))}
        layers = len(past) // 2
        expected = {(i, k) for i in range(layers) for k in ("key", "value")}
        if not past or set(past) != expected:
            raise ModelLoadError(
                "a generation model needs inputs past_key_values.{i}.key and .value for layers 0..n-1; found "
                f"{sorted(n for n in names if n.startswith('past_key_values'))[:8]}"
            )
        wanted_outputs = {f"present.{i}.{k}" for i, k in expected}
        if not wanted_outputs <= out_names:
            raise ModelLoadError(f"a generation model needs outputs present.{{i}}.key|value for {layers} layers")
        tensors = list(past.values())
        shapes = {t.shape for t in tensors}
        types = {t.datatype for t in tensors}
        if len(types) != 1 or next(iter(types)) not in _CACHE_TYPES:
            raise ModelLoadError(f"the cache tensors must all be FP32 or all FP16; found {sorted(types)}")
        if len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ModelLoadError(f"the cache tensors must share one 4-dimensional shape; found {sorted(shapes)}")
        shape = next(iter(shapes))
        kv_heads = _dimension(shape[1], info, ("num_kv_heads", "num_key_value_heads", "num_heads"), "heads")
        head_dim = _dimension(shape[3], info, ("head_dim",), "head size")
        return cls(layers, kv_heads, head_dim, _CACHE_TYPES[next(iter(types))], "position_ids" in names)


def _dimension(graph_value: int, info: Mapping[str, Any], keys: Sequence[str], what: str) -> int:
    if graph_value > 0:
        return graph_value
    for key in keys:
        value = info.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ModelLoadError(
        f"the cache's {what} is symbolic in the graph and generation.json has no {' or '.join(keys)}"
    )
