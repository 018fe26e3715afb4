"""Exports a local `transformers` model (a directory in Hugging Face format) into a model repository.

    python -m exporters.hf MODEL_DIR --task text-generation-with-past --repository DIR --name NAME
    python -m exporters.hf MODEL_DIR --task feature-extraction --repository DIR --name NAME
    python -m exporters.hf MODEL_DIR --task text-classification --repository DIR --name NAME

Each task's exporter copies the tokenizer files beside the model, writes the config the
server needs, and checks ONNX Runtime against PyTorch before it returns; a model it cannot
map gets a clear error (ExportError) rather than a broken repository entry. Decoders live in
exporters/hf_decoder.py, encoders (embeddings, classifiers) in exporters/hf_encoder.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DECODER_TASKS = ("text-generation-with-past",)
ENCODER_TASKS = ("feature-extraction", "text-classification")


def export(model_dir: Path, task: str, repository: Path, name: str, cache_dtype: str = "float32") -> Path:
    """Exports `model_dir` for `task` as model `name` in `repository`; returns the model's directory.

    Args:
        cache_dtype: Decoders only: "float32", or "float16" key/value cache tensors (half the cache memory).
    """
    if task in DECODER_TASKS:
        from exporters.hf_decoder import export_decoder

        return export_decoder(model_dir, repository, name, cache_dtype=cache_dtype)
    if task in ENCODER_TASKS:
        from exporters.hf_encoder import export_encoder

        return export_encoder(model_dir, task, repository, name)
    raise ValueError(f"unknown task {task!r}; one of {', '.join(DECODER_TASKS + ENCODER_TASKS)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a local transformers model directory (config.json, weights)")
    parser.add_argument("--task", required=True, choices=DECODER_TASKS + ENCODER_TASKS)
    parser.add_argument("--repository", type=Path, required=True, help="the model repository to write into")
    parser.add_argument("--name", required=True, help="the model's name in the repository")
    parser.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                        help="text-generation-with-past: the key/value cache tensors' type (default float32)")
    args = parser.parse_args(argv)
    from exporters.export import ExportError

    try:
        path = export(args.model_dir, args.task, args.repository, args.name, args.cache_dtype)
    except ExportError as exc:
        sys.exit(f"export failed: {exc}")
    print(f"exported {args.model_dir} ({args.task}) to {path}")


if __name__ == "__main__":
    main()
