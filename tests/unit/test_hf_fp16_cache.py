"""A decoder with FP16 key/value caches (exporters.hf_decoder's cache_dtype="float16") batches like FP32 ones.

The scheduler reads the caches' type from the graph: prefill caches, padding and merges are
all FP16, and streams decoding together get the tokens each gets alone.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from server.core.generation import GenerationScheduler
from server.core.sampling import SamplingParams
from server.runtime.onnx import OnnxRuntimeSession, SessionOptions
from tests.hf_models import build_llama

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["x", "def f(x):\n    return x", "import os\n"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters.hf_decoder import export_decoder

    work = tmp_path_factory.mktemp("fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and torch's own notes while tracing
        return export_decoder(build_llama(work / "src"), work / "repo", "llama16", cache_dtype="float16")


def alone(session: OnnxRuntimeSession, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding of one row, cache fed back step by step: no batching, no padding."""
    names = [t.name for t in session.outputs]
    layers = (len(names) - 1) // 2
    heads, head_dim = session.inputs[3].shape[1], session.inputs[3].shape[3]
    past = [np.zeros((1, heads, 0, head_dim), np.float16) for _ in range(2 * layers)]
    feed_ids, out = np.array([ids], np.int64), []
    for _ in range(steps):
        length = past[0].shape[2] + feed_ids.shape[1]
        positions = np.arange(past[0].shape[2], length, dtype=np.int64)[None]
        feed = {"input_ids": feed_ids, "attention_mask": np.ones((1, length), np.int64), "position_ids": positions}
        feed.update({t.name: p for t, p in zip(session.inputs[3:], past, strict=True)})
        logits, *past = session.run(feed, names)
        out.append(int(logits[0, -1].argmax()))
        feed_ids = np.array([[out[-1]]], np.int64)
    return out


async def test_fp16_caches_batch_like_fp32_ones(model_dir: Path) -> None:
    session = OnnxRuntimeSession((model_dir / "1" / "model.onnx").read_bytes(), model_dir, SessionOptions())
    assert {t.datatype for t in session.inputs if t.name.startswith("past_")} == {"FP16"}
    info = json.loads((model_dir / "generation.json").read_text())
    scheduler = GenerationScheduler(session, info, model_dir=model_dir)
    assert scheduler.layout.cache_dtype == np.float16 and scheduler.layout.kv_heads == 2

    async def ids(prompt: str) -> list[int]:
        return [t async for chunk in scheduler.generate(prompt, GREEDY) for t in chunk.token_ids]

    together = await asyncio.gather(*(ids(p) for p in PROMPTS))
    scheduler.close()
    for prompt, got in zip(PROMPTS, together, strict=True):
        assert got == alone(session, scheduler.tokenizer.encode(prompt), GREEDY.max_tokens), prompt
