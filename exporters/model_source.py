"""Resolve a model argument (local folder, GGUF file, built-in name, or hub id) and load it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sftool.errors import SftoolError

#: Built-in names resolved through asset provisioning (registry packages, never the hub).
BUILTIN_MODELS = ("smollm2-135m-instruct", "gemma3-270m")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(source: str) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs). Raises SftoolError for a missing local path."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), {}
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if source.lower() in BUILTIN_MODELS:
        from sftool.assets import ensure_model

        return str(ensure_model(source.lower())), {}
    looks_like_path = source.startswith((".", "/", "~")) or path.suffix in (".gguf", ".safetensors", ".bin")
    if looks_like_path or not _HUB_ID.match(source):
        raise SftoolError(f"model folder or file {source} does not exist")
    return source, {}


def load_config(source: str):
    """The transformers config of a model source."""
    from transformers import AutoConfig

    location, kwargs = resolve_source(source)
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise SftoolError(f"cannot load the config of {source}: {_first_line(exc)}") from None


def load_model(source: str, head: str = "base", num_labels: int = 2, pad_token_id: int | None = None):
    """Load a model in fp32 eval mode with sdpa attention.

    ``head``: ``base`` (the bare backbone), ``causal_lm``, or ``seq_cls`` (a fresh
    sequence-classification head with ``num_labels`` outputs on top of the pretrained backbone).
    """
    import torch
    import transformers

    classes = {
        "base": transformers.AutoModel,
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
    }
    location, kwargs = resolve_source(source)
    if head == "seq_cls":
        kwargs["num_labels"] = num_labels
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
    transformers.logging.set_verbosity_error()  # "newly initialized score weights" is expected here
    try:
        model, info = classes[head].from_pretrained(
            location, torch_dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True, **kwargs
        )
        if head == "base" and info["missing_keys"]:
            # Some bare backbones (Gemma3TextModel) do not find their weights under a CausalLM
            # checkpoint's prefix and would come out random; the CausalLM class finds them, and
            # callers take the backbone out of it (FamilyAdapter.backbone).
            model = transformers.AutoModelForCausalLM.from_pretrained(
                location, torch_dtype=torch.float32, attn_implementation="sdpa", **kwargs
            )
    except (OSError, ValueError) as exc:
        raise SftoolError(f"cannot load model {source}: {_first_line(exc)}") from None
    finally:
        transformers.logging.set_verbosity_warning()
    return model.eval()


def load_tokenizer(source: str):
    """The fast tokenizer of a model source (the device needs its tokenizer.json)."""
    from transformers import AutoTokenizer

    location, kwargs = resolve_source(source)
    # transformers 4.57.3+ takes any local folder saved by a 4.57.x it does not list as fixed for a
    # Mistral tokenizer and warns of a wrong regex (Gemma 3, SmolLM2); saying False keeps it silent.
    kwargs.setdefault("fix_mistral_regex", False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, use_fast=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise SftoolError(f"cannot load the tokenizer of {source}: {_first_line(exc)}") from None
    if not tokenizer.is_fast:
        raise SftoolError(f"{source} has no fast tokenizer (tokenizer.json), which the device runtime needs")
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id a device pads with: the tokenizer's pad token, else EOS (GPT-2 has no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
