"""`sftool bench server` runs every part on a tiny model and reports ratios (no timing asserted)."""

from __future__ import annotations

import json

from cli_helpers import run_cli
from tiny_models import synthetic_rows, write_jsonl


def test_bench_server_all_parts_tiny(tiny_model, tiny_artifacts, tmp_path):
    data = write_jsonl(synthetic_rows(60, 5), tmp_path / "rows.jsonl")
    out = tmp_path / "bench.json"
    result = run_cli("bench", "server", "--model", tiny_model("gpt2"), "--artifacts", tiny_artifacts("gpt2"),
                     "--steps", "3", "--repeats", "2", "--seq-len", "16", "--device-rows", "16", "--data", data,
                     "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert set(r["backward"]) == {"decomposed", "input_grad", "full_graph"}
    assert r["backward"]["decomposed"]["time_ratio"] == 1.0
    assert all(v["median_step_s"] > 0 and v["peak_rss_mb"] > 0 for v in r["backward"].values())
    assert r["server_path"]["bare_loop_s"] > 0 and r["server_path"]["server_path_s"] > 0
    assert r["schedules"]["pipelined_s"] > 0 and r["schedules"]["sequential_s"] > 0
    assert "pipelined / sequential" in result.output
    assert r["recompute"]["stored"]["time_ratio"] == 1.0 and r["recompute"]["recompute"]["peak_rss_mb"] > 0
    assert "recomputed" in result.output
