"""The byte decoder's export: ORT equals PyTorch, cached decoding equals a full pass, left padding is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.models import decoder as dec
from server.runtime.onnx import OnnxRuntimeSession, SessionOptions

TINY = dec.DecoderConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, context_length=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dec.Decoder, OnnxRuntimeSession, Path]:
    torch.manual_seed(0)
    model = dec.Decoder(TINY).eval()
    model_dir = dec.export(model, tmp_path_factory.mktemp("repo"))
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    return model, session, model_dir


def run(
    session: OnnxRuntimeSession, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
) -> list[np.ndarray]:
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for i in range(TINY.n_layers):
        feed[f"past_key_values.{i}.key"] = past[2 * i]
        feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
    return session.run(feed, dec.output_names(TINY))


def empty_past(batch: int) -> list[np.ndarray]:
    return [np.zeros((batch, TINY.n_heads, 0, TINY.head_dim), np.float32) for _ in range(2 * TINY.n_layers)]


def test_model_directory_describes_generation(exported) -> None:
    _, session, model_dir = exported
    info = json.loads((model_dir / "generation.json").read_text())
    assert info["tokenizer"] == "bytes" and info["eos_token_id"] == dec.EOS_TOKEN_ID
    assert info["context_length"] == 64 and info["num_layers"] == 2
    names = [t.name for t in session.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and len(names) == 3 + 2 * TINY.n_layers
    assert session.inputs[3].shape == (-1, TINY.n_heads, -1, TINY.head_dim)


def test_onnx_runtime_matches_pytorch(exported) -> None:
    model, session, _ = exported
    ids = torch.tensor([[72, 105, 33, 10, 100]])
    mask = torch.ones(1, 5, dtype=torch.int64)
    positions = torch.arange(5)[None]
    with torch.no_grad():
        expected = model(ids, mask, positions, *model.empty_past(1))[0].numpy()
    got = run(session, ids.numpy(), mask.numpy(), positions.numpy(), empty_past(1))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_token_by_token_with_the_cache_equals_a_full_pass(exported) -> None:
    _, session, _ = exported
    tokens = np.array([[dec.BOS_TOKEN_ID, 100, 101, 102, 32, 102, 40, 41, 58, 10]], np.int64)
    full = run(session, tokens, np.ones_like(tokens), np.arange(10)[None], empty_past(1))[0]
    prefix = 4
    outputs = run(session, tokens[:, :prefix], np.ones((1, prefix), np.int64), np.arange(prefix)[None], empty_past(1))
    np.testing.assert_allclose(outputs[0], full[:, :prefix], atol=1e-4)
    past = outputs[1:]
    for position in range(prefix, 10):
        step_mask = np.ones((1, position + 1), np.int64)
        step = run(session, tokens[:, position : position + 1], step_mask, np.array([[position]]), past)
        np.testing.assert_allclose(step[0][:, 0], full[:, position], atol=1e-4)
        past = step[1:]


def test_left_padded_row_equals_the_row_alone(exported) -> None:
    _, session, _ = exported
    long = [dec.BOS_TOKEN_ID, 105, 109, 112, 111, 114, 116]
    short = [dec.BOS_TOKEN_ID, 100, 101, 102]
    pad = len(long) - len(short)
    ids = np.array([long, [dec.EOS_TOKEN_ID] * pad + short], np.int64)
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)], np.int64)
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    batch = run(session, ids, mask, positions, empty_past(2))
    alone_mask = np.ones((1, len(short)), np.int64)
    alone = run(session, np.array([short]), alone_mask, np.arange(len(short))[None], empty_past(1))
    np.testing.assert_allclose(batch[0][1, pad:], alone[0][0], atol=1e-4)
    # One decode step on the padded batch still matches the row alone.
    next_ids = np.array([[32], [32]], np.int64)
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step_positions = positions[:, -1:] + 1
    batch_step = run(session, next_ids, step_mask, step_positions, batch[1:])
    alone_step_mask = np.ones((1, len(short) + 1), np.int64)
    alone_step = run(session, np.array([[32]]), alone_step_mask, np.array([[len(short)]]), alone[1:])
    np.testing.assert_allclose(batch_step[0][1], alone_step[0][0], atol=1e-4)


def test_a_decoder_with_generation_json_is_served_as_text_generation(exported) -> None:
    from server.repository.loader import load_model
    from server.repository.repository import ModelRepository

    _, _, model_dir = exported
    [model] = load_model(ModelRepository(model_dir.parent), model_dir.name, "cpu", 8)
    assert model.generator is not None
    assert [s.name for s in model.signature.inputs] == [
        "text_input", "max_tokens", "stream", "sampling_parameters", "exclude_input_in_output", "min_length"
    ]
    assert [(s.name, s.datatype) for s in model.signature.outputs] == [("text_output", "BYTES")]
    assert model.config.model_transaction_policy.decoupled
    model.close()


def test_a_text_model_keeps_every_cpu_beside_other_workers(exported, monkeypatch, caplog) -> None:
    """Tensor models divide the CPUs among workers; a decoder's single stream needs them all (one thread per
    step costs 36-43% more time per token), so its default intra-op threads are not divided."""
    from server.repository.loader import load_model
    from server.repository.repository import ModelRepository
    from server.runtime import cpus

    _, _, model_dir = exported
    monkeypatch.setattr(cpus, "usable_cpus", lambda *args: 4)
    monkeypatch.setattr(cpus, "machine_cpus", lambda: 4)
    monkeypatch.setattr(cpus, "_sharing_processes", 1)
    cpus.share_among(2)  # what a worker of --workers 2 declares
    with caplog.at_level("INFO", logger="server.repository.loader"):
        [model] = load_model(ModelRepository(model_dir.parent), model_dir.name, "cpu", 8)
    model.close()
    assert "intra-op threads ONNX Runtime's default)" in caplog.text, caplog.text


def test_greedy_completion_is_deterministic_and_bounded(exported) -> None:
    _, session, _ = exported
    first = dec.greedy_completion(session, TINY, b"def ", 12)
    assert first == dec.greedy_completion(session, TINY, b"def ", 12)
    assert len(first) <= 12
