"""A small decoder-only transformer over bytes, trained on the Python standard library's own source.

Exported with a key/value cache: inputs `input_ids` [B, S], `attention_mask` [B, P+S],
`position_ids` [B, S] and `past_key_values.{i}.key|value` [B, H, P, D]; outputs `logits`
[B, S, V] and `present.{i}.key|value` [B, H, P+S, D]. Batch, sequence and past length
are dynamic, and the attention mask makes left-padded rows exact.
"""

from __future__ import annotations

import json
import math
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm import tqdm

from exporters.export import ExportSpec, build_config, compare_outputs, to_onnx, write_model
from server.runtime import onnx as ort_runtime

BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257


@dataclass
class DecoderConfig:
    """Model shape and training settings (the defaults give about 4.8M parameters)."""

    vocab_size: int = 258  # 256 byte values, then BOS and EOS
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 1024
    context_length: int = 256
    seed: int = 0
    train_steps: int = 300
    batch_size: int = 16
    train_sequence: int = 128
    learning_rate: float = 3e-3

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_heads * self.head_dim, dim=2)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = torch.cat([past_key, k.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)], dim=2)
        v = torch.cat([past_value, v.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)], dim=2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + bias  # [B, H, S, P+S]
        y = torch.softmax(scores, dim=-1) @ v  # [B, H, S, D]
        return self.out(y.transpose(1, 2).reshape(batch, seq, -1)), k, v


class Block(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff), nn.GELU(), nn.Linear(config.d_ff, config.d_model)
        )

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, key, value = self.attn(self.ln1(x), bias, past_key, past_value)
        x = x + attended
        return x + self.mlp(self.ln2(x)), key, value


class Decoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.context_length, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        seq = input_ids.shape[1]
        total = attention_mask.shape[1]
        past_len = total - seq
        # Query i sits at absolute index past_len + i and sees keys 0..past_len + i that the mask keeps.
        key_index = torch.arange(total, device=input_ids.device)
        query_index = torch.arange(seq, device=input_ids.device) + past_len
        causal = key_index[None, :] <= query_index[:, None]  # [S, T]
        allowed = causal[None, :, :] & (attention_mask[:, None, :] > 0)  # [B, S, T]
        bias = torch.where(allowed, 0.0, -1e9)[:, None, :, :]  # [B, 1, S, T]
        x = self.tokens(input_ids) + self.positions(position_ids)
        present: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, key, value = block(x, bias, past[2 * i], past[2 * i + 1])
            present += [key, value]
        return (self.head(self.ln(x)), *present)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        shape = (batch, self.config.n_heads, 0, self.config.head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.config.n_layers)]


def input_names(config: DecoderConfig) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(config.n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(config: DecoderConfig) -> list[str]:
    names = ["logits"]
    for i in range(config.n_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def stdlib_corpus(limit_bytes: int = 8 << 20) -> bytes:
    """The Python standard library's own .py files (every Python install has them), sorted, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes() + b"\n"
        if len(data) >= limit_bytes:
            break
    return bytes(data)


def train(config: DecoderConfig, progress: bool = True) -> tuple[Decoder, float]:
    """Trains deterministically on the stdlib corpus; returns the model and its last loss."""
    torch.manual_seed(config.seed)
    corpus = torch.from_numpy(np.frombuffer(stdlib_corpus(), dtype=np.uint8).astype(np.int64))
    model = Decoder(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.learning_rate, total_steps=config.train_steps)
    generator = torch.Generator().manual_seed(config.seed)
    span = config.train_sequence + 1
    loss_value = float("nan")
    bar = tqdm(range(config.train_steps), desc="training byte decoder", unit="step", disable=not progress)
    model.train()
    for _ in bar:
        starts = torch.randint(0, len(corpus) - span, (config.batch_size,), generator=generator)
        windows = torch.stack([corpus[s : s + span] for s in starts.tolist()])
        inputs, targets = windows[:, :-1], windows[:, 1:]
        mask = torch.ones_like(inputs)
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)
        logits = model(inputs, mask, positions, *model.empty_past(inputs.shape[0]))[0]
        loss = nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        loss_value = float(loss.item())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return model, loss_value


def generation_info(config: DecoderConfig) -> dict[str, object]:
    """What the server needs to generate with the exported model (written as generation.json)."""
    return {
        "tokenizer": "bytes",
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "context_length": config.context_length,
        "vocab_size": config.vocab_size,
        "num_layers": config.n_layers,
        "num_heads": config.n_heads,
        "head_dim": config.head_dim,
        "model": asdict(config),
    }


def write_generation_info(model_dir: Path, config: DecoderConfig) -> None:
    (model_dir / "generation.json").write_text(json.dumps(generation_info(config), indent=2) + "\n")


def _example_inputs(config: DecoderConfig, batch: int, seq: int, past: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = (torch.arange(seq) + past).expand(batch, seq).contiguous()
    shape = (batch, config.n_heads, past, config.head_dim)
    pasts = [torch.randn(shape, generator=generator) for _ in range(2 * config.n_layers)]
    return [ids, mask, positions, *pasts]


def export_spec(config: DecoderConfig) -> ExportSpec:
    """Names and dynamic axes of the exported decoder."""
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for i in range(config.n_layers):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past_sequence"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total_sequence"}
    return ExportSpec(input_names(config), output_names(config), dynamic_batch=False, dynamic_axes=axes, atol=1e-4)


def check_decoder(model: Decoder, onnx_model: onnx.ModelProto, spec: ExportSpec, seed: int = 1) -> float:
    """ONNX Runtime against PyTorch on fresh inputs of other sizes than the trace's (past length 0 too).

    Raises:
        ExportMismatchError: a shape or value differs beyond the spec's tolerance.
    """
    session = ort_runtime.OnnxRuntimeSession(onnx_model.SerializeToString(), Path("."), ort_runtime.SessionOptions())
    worst = 0.0
    for batch, seq, past in ((3, 5, 0), (1, 1, 7), (2, 4, 3)):
        inputs = _example_inputs(model.config, batch, seq, past, seed)
        with torch.no_grad():
            expected = model(*inputs)
        actual = session.run({n: t.numpy() for n, t in zip(spec.input_names, inputs, strict=True)}, spec.output_names)
        worst = max(worst, compare_outputs(spec, expected, actual))
    return worst


def export(model: Decoder, repository: Path, name: str = "bytes_decoder", version: int = 1) -> Path:
    """Exports with a KV cache, checks against PyTorch, writes the model, its config and generation.json."""
    spec = export_spec(model.config)
    onnx_model = to_onnx(model, _example_inputs(model.config, 2, 3, 2, seed=0), spec)
    check_decoder(model, onnx_model, spec)
    model_dir = write_model(onnx_model, build_config(onnx_model, name, spec), repository, version)
    write_generation_info(model_dir, model.config)
    return model_dir


def greedy_completion(
    session: ort_runtime.OnnxRuntimeSession, config: DecoderConfig, prompt: bytes, max_new_tokens: int
) -> bytes:
    """Greedy decoding with the exported model and its KV cache: a reference for the server's scheduler."""
    ids = np.array([[BOS_TOKEN_ID, *prompt]], np.int64)
    past = [np.zeros((1, config.n_heads, 0, config.head_dim), np.float32) for _ in range(2 * config.n_layers)]
    names = output_names(config)
    out = bytearray()
    position = 0
    for _ in range(max_new_tokens):
        length = ids.shape[1]
        if position + length > config.context_length:
            break
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, position + length), np.int64),
            "position_ids": np.arange(position, position + length, dtype=np.int64)[None],
        }
        for i in range(config.n_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        logits, *past = session.run(feed, names)
        position += length
        token = int(logits[0, -1].argmax())
        if token == EOS_TOKEN_ID:
            break
        if token < 256:
            out.append(token)
        ids = np.array([[token]], np.int64)
    return bytes(out)
