"""`sftool profile` times real exports on onnxruntime and recommends a split within a budget."""

from __future__ import annotations

from cli_helpers import run_cli
from sftool.runtime.profiler import profile_splits


def test_profile_recommends_a_split(tiny_artifacts):
    paths = [tiny_artifacts("llama", 1), tiny_artifacts("llama", 2)]
    generous = profile_splits(paths, budget_ms=10_000, batch_size=2, seq_len=8, repeats=3)
    assert [t.split for t in generous.timings] == [1, 2]
    assert all(t.median_ms > 0 for t in generous.timings)
    assert generous.recommended_exported == 2 and generous.recommended_fit == 3  # capped at L-1
    strict = profile_splits(paths, budget_ms=1e-6, batch_size=2, seq_len=8, repeats=3)
    assert strict.recommended_exported is None and strict.recommended_fit == 0


def test_profile_cli(tiny_artifacts):
    result = run_cli("profile", "--artifacts", tiny_artifacts("llama", 1), "--artifacts", tiny_artifacts("llama", 2),
                     "--budget-ms", "10000", "--batch-size", "2", "--seq-len", "8")
    assert result.exit_code == 0, result.output
    assert "recommended: split 2" in result.output
