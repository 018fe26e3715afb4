"""Exports a `transformers` encoder (BERT family) as a text-in pipeline: tokenizer -> encoder.

    python -m exporters.hf MODEL_DIR --task feature-extraction --repository DIR --name minilm
    python -m exporters.hf MODEL_DIR --task text-classification --repository DIR --name sentiment

writes three models into the repository:

- `<name>_tokenizer`: the model's tokenizer.json served by the tokenizer backend (text -> token ids);
- `<name>_encoder`: the ONNX encoder. For feature-extraction it is a sentence-transformers model
  with its pooling (mean or CLS, read from `modules.json` and `1_Pooling/config.json`) and,
  when `modules.json` lists it, L2 normalisation inside the graph: output `embedding` [batch, dim].
  For text-classification, a sequence-classification model: output `logits` [batch, labels];
- `<name>`: the ensemble that chains them: `text` (BYTES) -> `embedding` (FP32) or `logits`
  (FP32, with the model's labels, so the classification extension answers label names).

Batch and sequence are dynamic. ONNX Runtime is checked against PyTorch on real text at
several batch sizes and lengths, padded rows included, before anything is written.
"""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from exporters.export import (
    ExportError,
    ExportSpec,
    build_config,
    compare_outputs,
    remove_model,
    to_onnx,
    write_ensemble,
    write_model,
)
from server.runtime import onnx as ort_runtime
from server.runtime.tokenizer_runtime import TokenizerRuntime

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# sentence-transformers modules this exporter can put into the graph.
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens")
# Texts of many lengths for the parity check (one is long enough to be truncated at 256 tokens).
CHECK_TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime serves the encoder; PyTorch is the reference it must match.",
    "a",
    "Embeddings of padded rows must equal the embeddings of the same rows alone, " * 3,
    "Ünïcödé, emoji 🙂 and CJK 漢字 go through the same tokenizer.",
    "word " * 300,
]
CHECK_BATCHES = (1, 3, len(CHECK_TEXTS))
# NOTE: the encoder batches without a queue delay: at concurrency 64 on 2 CPU cores, a 2 ms
# delay changed nothing (about 240 sentences/s either way; the busy instance batches anyway)
# and it would add 2 ms to every request on an idle server.
MAX_BATCH_SIZE = 64


def export_encoder(model_dir: Path, task: str, repository: Path, name: str) -> Path:
    """Exports `model_dir` for `task` as the ensemble `name` (plus its two steps) in `repository`.

    Returns:
        The ensemble's directory.

    Raises:
        ExportError: an unsupported model, pooling or module list, a missing tokenizer.json,
            or ONNX Runtime disagreeing with PyTorch (nothing is written then).
    """
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} has no config.json: not a transformers model directory")
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json (a fast tokenizer); the server tokenizes with it")
    if task == "feature-extraction":
        module, output, max_length, labels = _embedding_module(model_dir)
    elif task == "text-classification":
        module, output, max_length, labels = _classifier_module(model_dir)
    else:
        raise ExportError(f"task {task!r} is not an encoder task")
    inputs = [n for n in TOKEN_INPUTS if n in _forward_arguments(module.encoder)]
    tokenizer = TokenizerRuntime(tokenizer_file, max_length)
    spec = ExportSpec(
        input_names=inputs,
        output_names=[output],
        max_batch_size=MAX_BATCH_SIZE,
        dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in inputs}, output: {0: "batch"}},
        dynamic_batching=True,
        labels=labels,
        label_output=output,
        atol=1e-4,
        # Requests of different token counts share a run, padded with zeros (masked out) to the longest.
        extra_config=f'parameters {{ key: "pad_batch_inputs" value {{ string_value: "{",".join(inputs)}" }} }}\n',
    )
    example = _tokens(tokenizer, CHECK_TEXTS[:2], inputs)
    onnx_model = to_onnx(module, [_torch(example[n]) for n in inputs], spec)
    worst = check_encoder(module, onnx_model.SerializeToString(), tokenizer, spec)
    for model in (name, f"{name}_encoder", f"{name}_tokenizer"):
        remove_model(repository, model)
    write_model(onnx_model, build_config(onnx_model, f"{name}_encoder", spec), repository, 1, labels)
    write_tokenizer(repository, f"{name}_tokenizer", tokenizer_file, tokenizer.max_length)
    write_ensemble(repository, name, pipeline_config(name, inputs, output, _output_dim(module, output)), labels)
    print(f"{name}: ONNX Runtime matches PyTorch within {worst:.2e}")
    return repository / name


def _forward_arguments(module: Any) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def _load_transformers(model_dir: Path, auto_class: str) -> Any:
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        # Eager attention traces into plain ops; the fused kernels do not export.
        model = cls.from_pretrained(model_dir, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"transformers cannot load {model_dir} as {auto_class}: {exc}") from exc
    return model.eval()


def _embedding_module(model_dir: Path) -> tuple[Any, str, int, list[str]]:
    """The encoder with its pooling (and normalisation) as one module, from the sentence-transformers files."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        raise ExportError(
            f"{model_dir} has no modules.json: feature-extraction exports sentence-transformers models, "
            "whose pooling it reads from there"
        )
    modules = json.loads(modules_file.read_text())
    kinds = [m.get("type", "") for m in modules]
    if kinds not in ([_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE]):
        raise ExportError(
            f"modules.json lists {kinds}; supported: Transformer, Pooling and optionally Normalize, in that order"
        )
    pooling_dir = model_dir / modules[1].get("path", "1_Pooling")
    pooling = json.loads((pooling_dir / "config.json").read_text())
    enabled = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    if len(enabled) != 1 or enabled[0] not in _POOLING_MODES:
        raise ExportError(f"pooling {enabled} is not supported; one of {', '.join(_POOLING_MODES)}")
    if pooling.get("include_prompt") is False:
        raise ExportError("pooling with include_prompt false is not supported")
    settings_file = model_dir / "sentence_bert_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    encoder = _load_transformers(model_dir, "AutoModel")
    max_length = int(settings.get("max_seq_length") or encoder.config.max_position_embeddings)
    module = _pooled_encoder(encoder, mean=enabled[0] == "pooling_mode_mean_tokens", normalize=len(kinds) == 3)
    return module, "embedding", max_length, []


def _classifier_module(model_dir: Path) -> tuple[Any, str, int, list[str]]:
    """A sequence-classification model returning its logits, with its labels in id order."""
    encoder = _load_transformers(model_dir, "AutoModelForSequenceClassification")
    id2label = {int(k): str(v) for k, v in (encoder.config.id2label or {}).items()}
    labels = [id2label.get(i, str(i)) for i in range(encoder.config.num_labels)]
    return _logits_module(encoder), "logits", int(encoder.config.max_position_embeddings), labels


def _pooled_encoder(encoder: Any, mean: bool, normalize: bool) -> Any:
    import torch

    class PooledEncoder(torch.nn.Module):
        """last_hidden_state [B, L, H] -> pooled [B, H]; padding (attention_mask 0) is left out of the mean."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *tokens: torch.Tensor) -> torch.Tensor:
            feed = dict(zip(self.input_names, tokens, strict=True))
            hidden = self.encoder(**feed).last_hidden_state
            if mean:
                mask = feed["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
                # clamp as sentence-transformers does: an all-padding row divides by 1e-9, not 0
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            else:
                pooled = hidden[:, 0]
            return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled

    module = PooledEncoder()
    module.input_names = [n for n in TOKEN_INPUTS if n in _forward_arguments(encoder)]
    return module.eval()


def _logits_module(encoder: Any) -> Any:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, *tokens: torch.Tensor) -> torch.Tensor:
            return self.encoder(**dict(zip(self.input_names, tokens, strict=True))).logits

    module = Logits()
    module.input_names = [n for n in TOKEN_INPUTS if n in _forward_arguments(encoder)]
    return module.eval()


def _output_dim(module: Any, output: str) -> int:
    config = module.encoder.config
    return int(config.num_labels if output == "logits" else config.hidden_size)


def _tokens(tokenizer: TokenizerRuntime, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    batch = np.array([[t.encode()] for t in texts], dtype=object)
    return dict(zip(names, tokenizer.run({"text": batch}, names), strict=True))


def _torch(array: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def check_encoder(module: Any, onnx_bytes: bytes, tokenizer: TokenizerRuntime, spec: ExportSpec) -> float:
    """ONNX Runtime against PyTorch on real text: several batch sizes and lengths, each row also alone.

    A row padded inside a batch must give what it gives alone (the attention mask at work),
    and a long text must come out truncated, not refused.

    Returns:
        The largest absolute difference seen.

    Raises:
        ExportMismatchError: a shape or a value differs beyond the spec's tolerance.
    """
    import torch

    session = ort_runtime.OnnxRuntimeSession(onnx_bytes, Path("."), ort_runtime.SessionOptions())
    worst = 0.0
    cases = [CHECK_TEXTS[:size] for size in CHECK_BATCHES] + [[text] for text in CHECK_TEXTS]
    alone: dict[str, np.ndarray] = {}
    for texts in cases:
        feed = _tokens(tokenizer, texts, spec.input_names)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = module(*[_torch(feed[n]) for n in spec.input_names])
        actual = session.run(feed, spec.output_names)
        worst = max(worst, compare_outputs(spec, [expected], actual))
        if len(texts) == 1:
            alone[texts[0]] = actual[0][0]
    batched = session.run(_tokens(tokenizer, CHECK_TEXTS, spec.input_names), spec.output_names)[0]
    for row, text in zip(batched, CHECK_TEXTS, strict=True):
        padded = ExportSpec(spec.input_names, [f"{spec.output_names[0]} (padded row vs alone)"], atol=spec.atol)
        worst = max(worst, compare_outputs(padded, [_torch(alone[text])], [row]))
    return worst


def write_tokenizer(repository: Path, name: str, tokenizer_file: Path, max_length: int) -> Path:
    """The tokenizer step: tokenizer.json in version 1, a batching config with its max_length."""
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file, version_dir / "tokenizer.json")
    (repository / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "tokenizer"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
        'input { name: "text" data_type: TYPE_STRING dims: 1 }\n'
        f'parameters {{ key: "max_length" value {{ string_value: "{max_length}" }} }}\n'
        "dynamic_batching { }\n"
    )
    return repository / name


def pipeline_config(name: str, inputs: list[str], output: str, dim: int) -> str:
    """The ensemble `text -> <name>_tokenizer -> <name>_encoder -> output`, with the token count beside it."""
    token_maps = "".join(f'input_map {{ key: "{n}" value: "{n}" }} ' for n in inputs)
    token_outputs = "".join(f'output_map {{ key: "{n}" value: "{n}" }} ' for n in inputs)
    label = ' label_filename: "labels.txt"' if output == "logits" else ""
    return f"""
name: "{name}"
platform: "ensemble"
max_batch_size: {MAX_BATCH_SIZE}
input {{ name: "text" data_type: TYPE_STRING dims: 1 }}
output {{ name: "{output}" data_type: TYPE_FP32 dims: {dim}{label} }}
output {{ name: "token_count" data_type: TYPE_INT64 dims: 1 }}
ensemble_scheduling {{
  step {{
    model_name: "{name}_tokenizer" model_version: -1
    input_map {{ key: "text" value: "text" }}
    {token_outputs}output_map {{ key: "token_count" value: "token_count" }}
  }}
  step {{
    model_name: "{name}_encoder" model_version: -1
    {token_maps}output_map {{ key: "{output}" value: "{output}" }}
  }}
}}
"""
