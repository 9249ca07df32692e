"""Session fixtures: tiny random models of each family, exported once, and synthetic data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sftool.runtime import files
from tiny_models import make_tiny_model, synthetic_rows, write_jsonl

FAMILIES = ("gpt2", "llama")
SPLIT = 2  # tiny models have 4 blocks


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """family -> folder of a saved tiny random model (built on first use)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny_model(tmp_path_factory.mktemp(f"model-{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_model, tmp_path_factory):
    """(family, split) -> artifacts folder exported with the real exporter (built on first use)."""
    from sftool.exporters.onnx_export import ExportOptions, export_device

    built: dict[tuple[str, int], Path] = {}

    def get(family: str, split: int = SPLIT) -> Path:
        key = (family, split)
        if key not in built:
            out = tmp_path_factory.mktemp(f"art-{family}-{split}") / "artifacts"
            export_device(ExportOptions(str(tiny_model(family)), split, out, max_seq_len=64), log=lambda m: None)
            built[key] = out
        return built[key]

    return get


@pytest.fixture
def free_port() -> int:
    return files.free_port()


@pytest.fixture
def device_shards(tmp_path):
    """Two synthetic JSONL shards with disjoint sample ids."""

    def make(n: int = 120, only_labels: tuple[int | None, int | None] = (None, None)) -> list[Path]:
        return [
            write_jsonl(synthetic_rows(n, seed=i + 1, only_label=label), tmp_path / f"device-{i}.jsonl")
            for i, label in enumerate(only_labels)
        ]

    return make
