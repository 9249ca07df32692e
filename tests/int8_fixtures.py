"""A session-wide tiny export with every int8 target (import the fixture into a test module to use it)."""

from __future__ import annotations

import pytest
from conftest import SPLIT


@pytest.fixture(scope="session")
def int8_artifacts(tiny_model, tmp_path_factory):
    """family -> tiny export (split SPLIT, max_seq_len 64) with fp32 + arm64/avx512_vnni/avx2 int8 (built on first use)."""
    from sftool.exporters.onnx_export import ExportOptions, export_device

    built = {}

    def get(family: str):
        if family not in built:
            out = tmp_path_factory.mktemp(f"int8-{family}") / "artifacts"
            export_device(ExportOptions(str(tiny_model(family)), SPLIT, out, max_seq_len=64, int8_targets=["auto"]), log=lambda m: None)
            built[family] = out
        return built[family]

    return get
