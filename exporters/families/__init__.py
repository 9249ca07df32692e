"""Per-family partitioning adapters. A new family is one small module registered here."""

from __future__ import annotations

from sftool.errors import SftoolError
from sftool.exporters.families.base import FamilyAdapter
from sftool.exporters.families.gemma3 import Gemma3Adapter
from sftool.exporters.families.gpt2 import GPT2Adapter
from sftool.exporters.families.llama import LlamaAdapter

_ADAPTERS: tuple[FamilyAdapter, ...] = (GPT2Adapter(), LlamaAdapter(), Gemma3Adapter())


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter for a transformers ``config.model_type``."""
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in _ADAPTERS for t in a.model_types)
    raise SftoolError(f"model family {model_type!r} is not supported (supported: {', '.join(supported)})")


def family_named(name: str) -> FamilyAdapter:
    """The adapter whose ``name`` (as written in a manifest) is ``name``."""
    for adapter in _ADAPTERS:
        if adapter.name == name:
            return adapter
    raise SftoolError(f"unknown model family {name!r}")


__all__ = ["FamilyAdapter", "adapter_for", "family_named"]
