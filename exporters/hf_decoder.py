"""Exports a local `transformers` causal language model with its key/value cache, ready to serve.

    python -m exporters.hf MODEL_DIR --task text-generation-with-past --repository DIR --name NAME

The graph takes `input_ids` [B, S], `attention_mask` [B, P+S], `position_ids` [B, S] and
`past_key_values.{i}.key|value` [B, KV heads, P, head size], and returns `logits` [B, S, V]
and `present.{i}.key|value` [B, KV heads, P+S, head size]: the layout Hugging Face Optimum's
`text-generation-with-past` writes, which the server reads from the graph
(server/core/decoder_layout.py). The tokenizer files are copied beside it and
generation.json names them.

`transformers` 5 keeps the cache in a Cache object, which a traced graph cannot take or
return, and its forward() takes most arguments by keyword (a positional tracer call fails
with "got multiple values for argument 'use_cache'"). FlatCacheDecoder wraps the model in a
module whose forward() takes and returns plain tensors in the order above.

Before anything is written, ONNX Runtime is checked against PyTorch (logits and caches, on
sizes other than the traced ones), the cached step against a full pass, and a left-padded row
against the same row alone: the three things continuous batching relies on.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from exporters.export import ExportError, ExportMismatchError, ExportSpec, build_config, to_onnx, write_model
from server.runtime import onnx as ort_runtime

# Copied beside the model when present; the server reads the first three (server/core/tokenizer.py)
# and the chat template. Not config.json: in a model repository that name is a model config.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
    "chat_template.jinja",
)
# Tolerances of the checks: FP32 ONNX Runtime against FP32 PyTorch, and the graph against itself.
ATOL = 1e-4
RTOL = 1e-3


class FlatCacheDecoder(torch.nn.Module):
    """A causal LM as a module of plain tensors: (ids, mask, positions, *past) -> (logits, *presents)."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        # transformers 5 names the cache argument `cache`; 4.x called it `past_key_values`.
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{self.cache_argument: cache},
        )
        return (_logits_of(out), *_flat_presents(out, self.layers))


def _logits_of(out: Any) -> torch.Tensor:
    logits = out.get("logits") if isinstance(out, Mapping) else None
    if not isinstance(logits, torch.Tensor):
        kind = type(out).__name__
        keys = list(out.keys()) if isinstance(out, Mapping) else []
        raise ExportError(f"the model returns {kind} {keys}, not a result with `logits`; it is not a causal LM")
    return logits


def _flat_presents(out: Any, layers: int) -> list[torch.Tensor]:
    """The presents as [key0, value0, key1, ...], from whichever cache object the model returned."""
    cache = out.get("cache") if isinstance(out, Mapping) and out.get("cache") is not None else None
    if cache is None and isinstance(out, Mapping):
        cache = out.get("past_key_values")
    if hasattr(cache, "layers"):  # transformers 5's Cache: one layer object with .keys/.values each
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    elif isinstance(cache, (tuple, list)):
        pairs = [tuple(pair) for pair in cache]
    else:
        raise ExportError(
            f"the model returns no key/value cache it can be mapped from (got {type(cache).__name__}); "
            "only models with a per-layer key and value cache export with --task text-generation-with-past"
        )
    flat = [t for pair in pairs for t in pair]
    if len(pairs) != layers or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in flat):
        raise ExportError(
            f"the model's cache has {len(pairs)} layers of {[getattr(t, 'shape', None) for t in flat[:2]]}; "
            f"expected {layers} layers of a key and a value [batch, heads, length, head size] (sliding-window "
            "or state-space caches are not supported)"
        )
    return flat


def load_causal_lm(model_dir: Path) -> tuple[torch.nn.Module, Any]:
    """The model in eval mode, FP32, with eager attention (what the tracer records exactly), and its config.

    Raises:
        ExportError: not a transformers directory, or not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} has no config.json; expected a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load {model_dir} as a causal language model: {exc}") from exc
    model.eval()
    return model, config


def _example(
    layers: int, kv_heads: int, head_dim: int, vocab: int, batch: int, new: int, past: int, seed: int
) -> list[torch.Tensor]:
    """Inputs with random ids and caches; row 0 is left-padded by one column (so the traced
    mask handling is the general one, not a path specialised for an all-ones mask)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, new), generator=generator)
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    mask[0, 0] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]
    caches = [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * layers)]
    return [ids, mask, positions, *caches]


def decoder_spec(layers: int) -> ExportSpec:
    """Names and dynamic axes of the common decoder layout."""
    past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    return ExportSpec(
        ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present],
        dynamic_batch=False, dynamic_axes=axes, atol=ATOL, rtol=RTOL,
    )


def _compare(what: str, expected: np.ndarray, actual: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> float:
    if expected.shape != actual.shape:
        raise ExportMismatchError(f"{what}: shape {actual.shape}, expected {expected.shape}")
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    if not np.all(diff <= atol + rtol * np.abs(expected.astype(np.float64))):
        raise ExportMismatchError(f"{what}: differs by up to {float(diff.max()):.3g} (atol {atol}, rtol {rtol})")
    return float(diff.max()) if diff.size else 0.0


class _Graph:
    """The exported graph in ONNX Runtime, fed by name."""

    def __init__(self, model: onnx.ModelProto, spec: ExportSpec) -> None:
        options = ort_runtime.SessionOptions()
        self.session = ort_runtime.OnnxRuntimeSession(model.SerializeToString(), Path("."), options)
        self.spec = spec

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(dict(zip(self.spec.input_names, inputs, strict=True)), self.spec.output_names)
        except Exception as exc:  # ORT raises its own types; a failure here means a frozen or broken graph
            raise ExportError(
                f"ONNX Runtime cannot run the exported decoder at shapes {[x.shape for x in inputs[:3]]} "
                f"(a dimension may have been frozen by tracing): {str(exc).splitlines()[0][:300]}"
            ) from exc


def check_decoder(
    module: FlatCacheDecoder, graph: _Graph, layers: int, kv_heads: int, head_dim: int, vocab: int, seed: int = 1
) -> dict[str, float]:
    """The three checks of the module docstring; returns the largest difference of each.

    Raises:
        ExportMismatchError: a check failed (which one, and by how much).
        ExportError: ONNX Runtime could not run the graph at sizes other than the traced ones.
    """
    worst: dict[str, float] = {}
    # 1. PyTorch against ONNX Runtime, at batch, new and past lengths other than the traced ones.
    inputs = _example(layers, kv_heads, head_dim, vocab, batch=3, new=5, past=6, seed=seed)
    with torch.no_grad():
        expected = module(*inputs)
    actual = graph.run([x.numpy() for x in inputs])
    real = inputs[1][:, -5:].bool().numpy()  # logits of padded positions are not used
    worst["torch"] = _compare("logits against PyTorch", expected[0].numpy()[real], actual[0][real])
    for name, want, got in zip(graph.spec.output_names[1:], expected[1:], actual[1:], strict=True):
        worst["torch"] = max(worst["torch"], _compare(f"{name} against PyTorch", want.numpy(), got))
    # 2. A cached step against a full pass over the same ids.
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (1, 9), dtype=np.int64)
    empty = [np.zeros((1, kv_heads, 0, head_dim), np.float32) for _ in range(2 * layers)]
    full = graph.run([ids, np.ones((1, 9), np.int64), np.arange(9, dtype=np.int64)[None], *empty])
    head = graph.run([ids[:, :8], np.ones((1, 8), np.int64), np.arange(8, dtype=np.int64)[None], *empty])
    step = graph.run([ids[:, 8:], np.ones((1, 9), np.int64), np.array([[8]], np.int64), *head[1:]])
    worst["cached_step"] = _compare("the cached step against a full pass", full[0][:, -1], step[0][:, -1])
    # 3. A row left-padded beside a longer one, then one cached step, against the row alone.
    short = ids[:, :4]
    mask = np.array([[0] * 5 + [1] * 4, [1] * 9], np.int64)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    padded_ids = np.concatenate([np.concatenate([np.zeros((1, 5), np.int64), short], axis=1), ids])
    empty2 = [np.zeros((2, kv_heads, 0, head_dim), np.float32) for _ in range(2 * layers)]
    batch = graph.run([padded_ids, mask, positions, *empty2])
    alone = graph.run([short, np.ones((1, 4), np.int64), np.arange(4, dtype=np.int64)[None], *empty])
    worst["left_padding"] = _compare("a left-padded row against the row alone", alone[0][:, -1], batch[0][:1, -1])
    nxt = np.array([[int(alone[0][0, -1].argmax())], [int(full[0][0, -1].argmax())]], np.int64)
    batch_step = graph.run([nxt, np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
                            np.array([[4], [9]], np.int64), *batch[1:]])
    alone_step = graph.run([nxt[:1], np.ones((1, 5), np.int64), np.array([[4]], np.int64), *alone[1:]])
    worst["left_padding"] = max(worst["left_padding"], _compare(
        "a left-padded row's cached step against the row alone", alone_step[0][:, -1], batch_step[0][:1, -1]
    ))
    return worst


def _ids(value: Any) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return [int(value)] if isinstance(value, int) and not isinstance(value, bool) else []


def generation_info(model_dir: Path, config: Any, layers: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
    """generation.json: the tokenizer, the context, and (for reading, not trusted by the server) the cache shape."""
    generation: dict[str, Any] = {}
    if (model_dir / "generation_config.json").is_file():
        generation = json.loads((model_dir / "generation_config.json").read_text())
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(context, int) or context <= 0:
        raise ExportError("config.json names no context length (max_position_embeddings or n_positions)")
    eos = _ids(generation.get("eos_token_id")) or _ids(getattr(config, "eos_token_id", None))
    info: dict[str, Any] = {
        "tokenizer": "tokenizer.json",
        "context_length": context,
        "eos_token_id": eos,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
        "source": {"model_type": getattr(config, "model_type", ""), "exporter": "exporters.hf_decoder"},
    }
    bos = _ids(generation.get("bos_token_id")) or _ids(getattr(config, "bos_token_id", None))
    if bos:
        info["bos_token_id"] = bos[0]
    return info


def half_caches(model: onnx.ModelProto, layers: int) -> onnx.ModelProto:
    """The graph with FP16 cache inputs and outputs, computing in FP32 as before.

    Caches are most of a decoder's memory at serving time: stored in FP16 they take half,
    while the arithmetic (FP16 kernels are few on CPUs) stays FP32. A Cast follows each past
    input and precedes each present output.
    """
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    renames: dict[str, str] = {}
    casts = []
    for value in graph.input:
        if value.name.startswith("past_key_values."):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
            renames[value.name] = f"{value.name}_fp32"
            casts.append(helper.make_node("Cast", [value.name], [renames[value.name]], to=TensorProto.FLOAT))
    presents = [o for o in graph.output if o.name.startswith("present.")]
    for value in presents:
        renames[value.name] = f"{value.name}_fp32"
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) if n.startswith("present.") else n for n in node.output]
    for value in presents:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
        casts.append(helper.make_node("Cast", [renames[value.name]], [value.name], to=TensorProto.FLOAT16))
    if len(casts) != 4 * layers:
        raise ExportError(f"expected {2 * layers} cache inputs and outputs to cast, found {len(casts) // 2}")
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts[: 2 * layers] + nodes + casts[2 * layers :])
    onnx.checker.check_model(out)
    return out


def _check_half(full: _Graph, half: _Graph, layers: int, kv_heads: int, head_dim: int, vocab: int) -> float:
    """The FP16-cache graph's cached step against the FP32 graph's, within FP16's precision."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, vocab, (2, 6), dtype=np.int64)
    mask = np.ones((2, 6), np.int64)
    positions = np.arange(6, dtype=np.int64)[None].repeat(2, 0)
    results = []
    for graph, dtype in ((full, np.float32), (half, np.float16)):
        empty = [np.zeros((2, kv_heads, 0, head_dim), dtype) for _ in range(2 * layers)]
        first = graph.run([ids, mask, positions, *empty])
        results.append(graph.run([ids[:, -1:], np.ones((2, 7), np.int64), np.full((2, 1), 6, np.int64), *first[1:]]))
    return _compare("the FP16-cache step against the FP32 one", results[0][0], results[1][0], atol=1e-2, rtol=1e-2)


def export_decoder(
    model_dir: Path, repository: Path, name: str, version: int = 1, opset: int = 17, cache_dtype: str = "float32"
) -> Path:
    """Exports the causal LM in `model_dir` as model `name` of `repository`; returns the model's directory.

    Args:
        cache_dtype: "float32", or "float16" for FP16 key/value cache tensors (half the cache
            memory; the graph computes in FP32 and casts at the cache's edges).

    Raises:
        ExportError: not a causal LM with a per-layer key/value cache, no tokenizer.json, or a
            check failed (ExportMismatchError); nothing is written then.
    """
    if cache_dtype not in ("float32", "float16"):
        raise ExportError(f"cache_dtype must be float32 or float16, got {cache_dtype!r}")
    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; the server tokenizes with it")
    model, config = load_causal_lm(model_dir)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    if layers <= 0:
        raise ExportError("config.json names no num_hidden_layers")
    vocab = int(config.vocab_size)
    module = FlatCacheDecoder(model, layers)
    # The cache's head count and head size come from a real run, not the config's arithmetic.
    with torch.no_grad():
        probe = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True, return_dict=True)
        presents = _flat_presents(probe, layers)
    kv_heads, head_dim = int(presents[0].shape[1]), int(presents[0].shape[3])
    spec = decoder_spec(layers)
    spec.opset = opset
    example = _example(layers, kv_heads, head_dim, vocab, batch=2, new=3, past=4, seed=0)
    onnx_model = to_onnx(module, example, spec)
    graph = _Graph(onnx_model, spec)
    check_decoder(module, graph, layers, kv_heads, head_dim, vocab)
    if cache_dtype == "float16":
        onnx_model = half_caches(onnx_model, layers)
        _check_half(graph, _Graph(onnx_model, spec), layers, kv_heads, head_dim, vocab)
    model_config = build_config(onnx_model, name, spec)
    path = write_model(onnx_model, model_config, repository, version)
    for file in TOKENIZER_FILES:
        if (model_dir / file).is_file():
            shutil.copyfile(model_dir / file, path / file)
    info = generation_info(model_dir, config, layers, kv_heads, head_dim)
    (path / "generation.json").write_text(json.dumps(info, indent=2) + "\n")
    return path
