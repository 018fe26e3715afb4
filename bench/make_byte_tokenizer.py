"""Writes a Hugging Face tokenizer directory that describes bytes_decoder's vocabulary (no hub download).

    python bench/make_byte_tokenizer.py [--out bench/out/byte_tokenizer]

Token ids 0-255 are the byte values, 256 is BOS and 257 EOS, as in generation.json. genai-perf counts tokens
with it (`--tokenizer DIR`). Needs the `tokenizers` package (genai-perf brings it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def byte_symbols() -> list[str]:
    """One printable character per byte value (the usual byte-level BPE alphabet), in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "byte_tokenizer")
    args = parser.parse_args()
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<bos>", special=True), AddedToken("<eos>", special=True)])
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "model_max_length": 256,
    }, indent=2))
    check = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    ids = check.encode("def f(x):\n    return x\u00e9").ids
    assert ids == list("def f(x):\n    return x\u00e9".encode()), ids
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
