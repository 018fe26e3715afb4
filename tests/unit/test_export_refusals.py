"""The exporters' refusals: each says what is wrong before anything is written."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch

from exporters.export import ExportError, ExportMismatchError, ExportSpec, check_shapes, export_torch
from tests.conftest import ROOT


class DictResult(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x * 2, "z": x + 1}


class TwoResults(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x + 1


class SequenceFrozen(torch.nn.Module):
    """Traces its sequence length as a constant: right at the traced size, wrong at any other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = int(x.shape[1])  # a Python int: frozen at 4 by the trace
        return x[:, :length].reshape(x.shape[0], length) * 2 + torch.arange(length, dtype=x.dtype)


def test_a_dict_result_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"returns a dict with keys \['y', 'z'\].*tuple in output_names order"):
        export_torch(DictResult(), (torch.zeros(2, 3),), ExportSpec(["x"], ["y", "z"]), tmp_path, "d")
    assert not (tmp_path / "d").exists()


def test_a_model_output_result_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    from transformers.utils import ModelOutput

    class Wrapped(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> ModelOutput:
            return ModelOutput(logits=x * 2)

    with pytest.raises(ExportError, match="ModelOutput with keys \\['logits'\\]"):
        export_torch(Wrapped(), (torch.zeros(2, 3),), ExportSpec(["x"], ["logits"]), tmp_path, "m")


def test_outputs_the_spec_does_not_name_are_refused(tmp_path: Path) -> None:
    # The check's result count catches it first in export_torch; to_onnx refuses the invented name too.
    from exporters.export import to_onnx

    with pytest.raises(ExportError, match="returns 2 tensors but the spec names 1"):
        export_torch(TwoResults(), (torch.zeros(2, 3),), ExportSpec(["x"], ["y"]), tmp_path, "t")
    with pytest.raises(ExportError, match=r"invent the name\(s\) \['onnx::|invent the name\(s\) \['"):
        to_onnx(TwoResults(), (torch.zeros(2, 3),), ExportSpec(["x"], ["y"]))


def test_a_sequence_dimension_frozen_by_tracing_is_caught(tmp_path: Path) -> None:
    spec = ExportSpec(["x"], ["y"], dynamic_axes={"x": {0: "batch", 1: "sequence"}, "y": {0: "batch", 1: "sequence"}})
    # Only the batch would be varied by the old check: this export passed it and failed at serve time.
    assert check_shapes([torch.zeros(2, 4)], spec) == [[3, 6]]
    with pytest.raises(ExportMismatchError, match="frozen by tracing|shape"):
        export_torch(SequenceFrozen(), (torch.zeros(2, 4),), spec, tmp_path, "frozen")
    assert not (tmp_path / "frozen").exists()


def test_a_transformers_model_is_sent_to_the_hf_exporter(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    with pytest.raises(ExportError, match="python -m exporters.hf"):
        ids = torch.zeros(1, 4, dtype=torch.int64)
        export_torch(model, (ids,), ExportSpec(["input_ids"], ["logits"]), tmp_path, "g")


def test_the_command_line_exports_and_refuses(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "exporters.export", "torch.nn:Identity", "--repository", str(tmp_path),
         "--name", "same", "--input", "x:2x5:float32", "--output", "y", "--dynamic", "x:0=batch,1=width",
         "--dynamic", "y:0=batch,1=width"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    graph = onnx.load(tmp_path / "same" / "1" / "model.onnx").graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "width"]
    bad = subprocess.run(
        [sys.executable, "-m", "exporters.export", "torch.nn:Identity", "--repository", str(tmp_path),
         "--name", "bad", "--input", "x:2x5:complex", "--output", "y"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0 and "NAME:SHAPE:DTYPE" in bad.stderr


def test_the_decoder_exporter_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    from exporters.hf_decoder import export_decoder

    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_decoder(tmp_path, tmp_path / "repo", "x")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ExportError, match="no config.json"):
        export_decoder(tmp_path, tmp_path / "repo", "x")
    # An encoder loads as BERT's LM head, but returns no key/value cache to map.
    from transformers import BertConfig, BertModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=8)).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match="no key/value cache"):
        export_decoder(tmp_path, tmp_path / "repo", "x")
    assert not (tmp_path / "repo").exists()


def test_the_decoder_exporter_refuses_a_result_without_a_cache() -> None:
    from exporters.hf_decoder import _flat_presents, _logits_of

    with pytest.raises(ExportError, match="not a result with `logits`"):
        _logits_of({"last_hidden_state": torch.zeros(1)})
    with pytest.raises(ExportError, match="no key/value cache"):
        _flat_presents({"logits": torch.zeros(1)}, 2)
    with pytest.raises(ExportError, match="expected 2 layers"):
        _flat_presents({"past_key_values": [(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))]}, 2)
