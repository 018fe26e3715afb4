"""Tiny `transformers` decoders with a tokenizer trained here: what the Hugging Face tests export and serve.

Everything is made locally with fixed seeds (no download): a byte-level BPE tokenizer trained
with the `tokenizers` library on some of the standard library's source plus text with
multi-byte characters, a GPT-2 and a Llama with grouped-query attention (fewer key/value
heads than query heads), each saved as a Hugging Face directory.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

VOCAB_SIZE = 384
CONTEXT_LENGTH = 256
EOS = "<|endoftext|>"
BOS = "<s>"
# Non-ASCII text in the training set: the merges keep some characters whole and leave others
# as single bytes, so streams meet characters split across tokens.
UNICODE_TEXT = "naïve café déjà vu — ½ × 3 ≈ 1.5; Größe, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, кириллица\n" * 20


def training_text(limit_bytes: int = 300_000) -> str:
    """Some of the standard library's own source, always the same files, and UNICODE_TEXT."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [UNICODE_TEXT], len(UNICODE_TEXT)
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit_bytes:
            break
    return "".join(parts)


# The Llama's chat template (tokenizer_config.json's chat_template, as Hugging Face models ship it).
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"


def train_tokenizer(directory: Path, add_bos: bool, chat_template: str | None = None) -> None:
    """Writes tokenizer.json and tokenizer_config.json (BOS added to prompts when `add_bos`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS, BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([training_text()], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": EOS, "bos_token": BOS, "add_bos_token": add_bos, "model_max_length": CONTEXT_LENGTH}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def build_gpt2(directory: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (hidden 32, 4 heads) with the trained tokenizer; prompts get no BOS."""
    from transformers import GPT2Config, GPT2LMHeadModel

    train_tokenizer(directory, add_bos=False)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=CONTEXT_LENGTH, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0}))
    return directory


def build_llama(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64, 8 query heads, 2 key/value heads); prompts start with BOS; a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    train_tokenizer(directory, add_bos=True, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=CONTEXT_LENGTH,
        bos_token_id=1, eos_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0], "bos_token_id": 1}))
    return directory


def prompt_ids(directory: Path, text: str) -> list[int]:
    """A prompt's ids as the tokenizers library gives them, BOS first where the config asks for it."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text).ids
    config = json.loads((directory / "tokenizer_config.json").read_text())
    return [1, *ids] if config["add_bos_token"] else list(ids)


def greedy_reference(directory: Path, ids: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy generate(), end-of-sequence ignored: the ids after the prompt."""
    import warnings

    from transformers import AutoModelForCausalLM, GenerationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        config = GenerationConfig(
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
        )
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                                 generation_config=config)
    return [int(t) for t in out[0, len(ids):]]
