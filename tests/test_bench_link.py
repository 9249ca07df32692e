"""`sftool bench link` on a tiny message: both transports measured, every batch delivered (no timing asserted)."""

from __future__ import annotations

import json
import time

from cli_helpers import run_cli
from sftool.bench_link import LinkBenchConfig, make_batches, run_protocol


def test_bench_link_tiny_both_transports(tmp_path):
    out = tmp_path / "link.json"
    result = run_cli("bench", "link", "--batch", "2", "--seq-len", "8", "--hidden", "16", "--batches", "12",
                     "--window", "3", "--repeats", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "plain TCP" in result.output and "CurveZMQ" in result.output and "ratio" in result.output
    r = json.loads(out.read_text())
    assert set(r["transports"]) == {"tcp", "curve"}
    assert r["message"]["payload_bytes"] == 2 * 8 * 16 * 2 + 2 * 8 + 2 * 8 * 2
    for t in r["transports"].values():
        assert t["bare_gbs"] > 0 and t["protocol_gbs"] > 0 and t["ratio"] > 0
        # The receiver's own count of accepted batches, for every timed protocol run.
        assert t["protocol_delivered"] == [12, 12]
        assert all(run["batches"] == 12 for run in t["bare_runs"])
        # Which side's Python bounds the stream: the receiving and the sending thread's CPU per batch.
        assert t["bare_server_thread_cpu_ms_per_batch"] > 0 and t["bare_device_thread_cpu_ms_per_batch"] > 0
        assert t["protocol_device_thread_cpu_ms_per_batch"] > 0
        if hasattr(time, "pthread_getcpuclockid"):  # another thread's CPU clock (the Receiver's)
            assert t["protocol_server_thread_cpu_ms_per_batch"] > 0
    assert "receiving thread CPU" in result.output
    assert r["machine"]["cpu"]


def test_protocol_run_counts_come_from_the_receiver():
    cfg = LinkBenchConfig(batch=1, seq_len=4, hidden=8, dtype="fp32", batches=7, window=2, ack="taken")
    m = run_protocol(cfg, make_batches(cfg), keys=None)
    assert m.batches == 7
    assert m.payload_bytes == 7 * (4 * 8 * 4 + 4 + 8 + 8)
    assert m.seconds > 0 and m.goodput_gbs > 0
    assert m.device_thread_cpu_seconds is not None and m.device_thread_cpu_seconds > 0
