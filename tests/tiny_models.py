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


#: Gemma 3's blocks: sliding-window attention with a full-attention block between, as in the real
#: model's 5:1 pattern but denser, so every split point has both kinds on each side.
GEMMA3_LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention") * 2
GEMMA3_SLIDING_WINDOW = 4


def make_tiny_model(folder: Path, family: str, layers: int | None = None, hidden: int = 64, seed: int = 0) -> Path:
    """Save a random-weight model of ``family`` ("gpt2", "llama" or "gemma3") with its tokenizer into
    ``folder``; ``layers`` defaults to 4 (6 for gemma3, two rounds of its attention pattern)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    vocab_size = len(SPECIAL) + len(WORDS)
    layers = layers if layers is not None else (len(GEMMA3_LAYER_TYPES) if family == "gemma3" else 4)
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
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(
            vocab_size=vocab_size, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=GEMMA3_SLIDING_WINDOW, layer_types=list(GEMMA3_LAYER_TYPES * layers)[:layers],
            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=128,
            tie_word_embeddings=True, bos_token_id=2, eos_token_id=2, pad_token_id=0,
        )
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if family == "gemma3":
        # Gemma norms start at weight 0 (a scale of 1 + 0); random weights make the "1 +" matter.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0.0, 0.3)
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
