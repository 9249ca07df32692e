"""A tiny random model and a synthetic data set it can learn: for smoke runs of every command.

Nothing here downloads anything. The model is a 4-block Llama with random weights and a
word-level tokenizer over the calibration sentences; the data set's label says which of a few
marker words a row of random words holds (a task LoRA learns in a few hundred steps).

``write_random_model`` saves a real model's architecture at full size (Llama-3.2-1B/3B, from their
published config.json) with random weights: to measure exports, memory and file sizes of real shapes
without the weights.
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


#: The published config.json of each model ``write_random_model`` can build (architecture only).
_LLAMA32_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
REAL_CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": {
        **_LLAMA32_COMMON, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "head_dim": 64,
    },
    "llama-3.2-3b": {
        **_LLAMA32_COMMON, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24, "head_dim": 128,
    },
}
#: Llama 3's tokenizer: 128000 regular tokens, then 256 special ones (begin/end of text first).
_LLAMA3_REGULAR = 128000
_RANDOM_MODEL_STAMP = "random_model.json"


def llama3_stand_in_tokenizer(seed: int = 0):
    """A word-level stand-in for Llama 3's tokenizer with its exact vocabulary size and special ids.

    The calibration words sit at pseudo-random ids spread over the 128000 regular ids (so real text
    reaches all of the embedding table, as with the real tokenizer); the other regular ids are filler
    tokens no text produces. ``<|begin_of_text|>`` (128000) is prepended to every text, as Llama 3
    does; ``<|end_of_text|>`` (128001) is EOS, and there is no pad token (the export pads with EOS).
    Words outside the calibration sentences become ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", *vocabulary()]
    ids = random.Random(seed).sample(range(_LLAMA3_REGULAR), len(words))
    vocab = dict(zip(words, ids))
    taken = set(ids)
    vocab.update({f"<|filler_{i}|>": i for i in range(_LLAMA3_REGULAR) if i not in taken})
    special = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(254))]
    vocab.update({tok: _LLAMA3_REGULAR + i for i, tok in enumerate(special)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", _LLAMA3_REGULAR)],
    )
    return tok


def write_random_model(name: str, folder: Path, seed: int = 0) -> Path:
    """Save ``name`` (a key of REAL_CONFIGS) at full size with random weights into ``folder``.

    Weights are drawn by transformers' own initializer under ``torch.manual_seed(seed)`` and saved in
    bfloat16, the dtype the real checkpoints ship in: the folder is half the size of fp32, and
    ``sftool export`` loads it exactly as it loads the real model (upcast to fp32). The tokenizer is
    ``llama3_stand_in_tokenizer``. A folder already holding the same name and seed is returned as is.
    """
    import torch
    import transformers

    if name not in REAL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REAL_CONFIGS)}")
    folder = Path(folder)
    stamp = {"name": name, "seed": seed, "dtype": "bfloat16", "weights": "random"}
    if (folder / _RANDOM_MODEL_STAMP).is_file():
        if json.loads((folder / _RANDOM_MODEL_STAMP).read_text()) == stamp:
            return folder
        raise ValueError(f"{folder} holds another random model; choose another folder")
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty")
    config = transformers.LlamaConfig(**{k: v for k, v in REAL_CONFIGS[name].items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=llama3_stand_in_tokenizer(seed), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        unk_token="<unk>",
    ).save_pretrained(folder)
    # Written last: a folder with the stamp is complete.
    (folder / _RANDOM_MODEL_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
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
