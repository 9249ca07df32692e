"""A tiny random model and a synthetic data set it can learn: for smoke runs of every command.

Nothing here downloads anything. The model is a 4-block Llama with random weights and a
word-level tokenizer over the calibration sentences; the data set's label says which of a few
marker words a row of random words holds (a task LoRA learns in a few hundred steps).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TINY_MODEL = "tiny-random-llama"
SYNTHETIC = "synthetic"
MARKERS = ("film", "soup", "plants", "balcony")


def vocabulary() -> list[str]:
    from sftool.exporters.quantize import CALIBRATION_TEXTS
    from tokenizers import pre_tokenizers

    return sorted({w for t in CALIBRATION_TEXTS for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})


def tiny_model(folder: Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Save a tiny random Llama with a word-level tokenizer over the calibration sentences."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<eos>", *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    return folder


def synthetic_rows(n: int, num_labels: int = 3, seed: int = 0) -> list[dict]:
    """Rows ``{id, text, label}``, balanced over labels: label c iff the row holds ``MARKERS[c]``."""
    if not 2 <= num_labels <= len(MARKERS):
        raise ValueError(f"the synthetic task has 2..{len(MARKERS)} labels")
    rng = random.Random(seed)
    fillers = [w for w in vocabulary() if w not in MARKERS and w.isalpha()]
    rows = []
    for i in range(n):
        label = i % num_labels
        words = [rng.choice(fillers) for _ in range(rng.randint(5, 12))]
        words[rng.randrange(len(words))] = MARKERS[label]
        rows.append({"id": i, "text": " ".join(words), "label": label})
    return rows


def write_synthetic(path: Path, n: int = 480, num_labels: int = 3, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(n, num_labels, seed)))
    return path
