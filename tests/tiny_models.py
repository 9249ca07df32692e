"""Tiny random models of the supported families, saved like real Hugging Face folders.

They share one real word-level ``tokenizers`` tokenizer, so the device runtime tokenizes with
the same library as for real models. Sizes are chosen to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(56)] + ["good", "bad", "movie", "plot"]
SPECIAL = ["<pad>", "<unk>", "<eos>"]
MARKER = "good"  # the synthetic task: does this word occur in the text?


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def make_tiny_model(folder: Path, family: str, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Save a random-weight model of ``family`` ("gpt2" or "llama") with its tokenizer into ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    vocab_size = len(SPECIAL) + len(WORDS)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_layer=layers, n_embd=hidden, n_head=4, n_positions=128,
            bos_token_id=2, eos_token_id=2, pad_token_id=0,
        )
    elif family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=0,
        )
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(), pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    fast.save_pretrained(folder)
    return folder


def synthetic_rows(n: int, seed: int, only_label: int | None = None) -> list[dict]:
    """Balanced rows {id, text, label}: label 1 iff MARKER occurs somewhere in the text."""
    rng = random.Random(seed)
    fillers = [w for w in WORDS if w != MARKER]
    rows = []
    for i in range(n):
        label = only_label if only_label is not None else i % 2
        words = [rng.choice(fillers) for _ in range(rng.randint(4, 10))]
        if label:
            words[rng.randrange(len(words))] = MARKER
        rows.append({"id": seed * 100000 + i, "text": " ".join(words), "label": label})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
