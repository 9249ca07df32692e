"""`sftool bench scale` on a tiny model: 1 and 2 real ranks run, the all-reduce is measured, the
projection follows the ring model it prints (no timing asserted)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import one_line_error, run_cli
from sftool.bench_scale import project


def test_bench_scale_tiny(tiny_model, tiny_artifacts, tmp_path):
    out = tmp_path / "scale.json"
    result = run_cli("bench", "scale", "--model", tiny_model("llama"), "--artifacts", tiny_artifacts("llama"),
                     "--batch-size", "4", "--seq-len", "8", "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["one_rank"]["step_s"] > 0 and r["two_ranks"]["step_s"] > 0
    assert r["two_ranks"]["allreduce_in_step_s"] > 0  # the 2-rank steps really all-reduced
    assert [row["ranks"] for row in r["projection"]] == [8, 16, 32, 64]
    assert "projection" in result.output and "assumption" in result.output


def test_projection_ring_model_by_hand():
    # 1 s per step of 8 samples; 1 MB of gradients; 1 ms latency; 1 GB/s.
    rows = project(1.0, 8, 1_000_000, 1e-3, 1e9, ranks=(8,))
    # compute: 1 s over 8 ranks = 0.125 s; all-reduce: 2 * 7 * (1e-3 + 1e6 / 8e9) = 14 * 1.125e-3 s.
    assert rows[0]["allreduce_s"] == pytest.approx(14 * 1.125e-3)
    assert rows[0]["step_s"] == pytest.approx(0.125 + 14 * 1.125e-3)


def test_bench_scale_bad_input(tmp_path):
    result = run_cli("bench", "scale", "--artifacts", tmp_path)
    assert result.exit_code == 2 and "not a device export" in one_line_error(result)
