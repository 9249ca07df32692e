"""`sftool device --slowdown` and `sftool bench time`: devices slowed to edge speed, real runs vs the time model."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from cli_helpers import one_line_error, run_cli, spawn, torch_blocked_env
from sftool.errors import SftoolError
from sftool.runtime import files
from sftool.runtime.device_app import LocalBatches
from tiny_models import synthetic_rows, write_jsonl

ROWS, EPOCHS = 120, 4


class _SleepyModel:
    """A device model whose forward takes a known time (sleeping: the sleep is measured as compute)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def forward(self, ids, mask):
        time.sleep(self.seconds)
        return np.zeros((*ids.shape, 4), np.float32)


class _Encoder:
    def encode(self, texts):
        return np.ones((len(texts), 3), np.int64), np.ones((len(texts), 3), np.int64)


def _plan(slowdown: float, forward_s: float) -> LocalBatches:
    from sftool.runtime.local_data import Example

    examples = [Example(text="a b c", label=0, sample_id=i) for i in range(4)]
    return LocalBatches(examples, [[0, 1], [2, 3]], 1, [], _Encoder(), _SleepyModel(forward_s), "fp16", "d",
                        slowdown=slowdown)


def test_local_batches_take_slowdown_times_their_compute():
    plan = _plan(4.0, 0.02)
    started = time.perf_counter()
    for seq in plan.seqs():
        plan.make(seq)
    elapsed = time.perf_counter() - started
    assert plan.compute_s >= 0.04  # the real compute only: two forwards of 20 ms
    assert elapsed >= 4 * plan.compute_s * 0.98  # sleep never returns early; a little slack for clock granularity
    assert elapsed < 4 * plan.compute_s + 0.5
    unslowed = _plan(1.0, 0.02)
    started = time.perf_counter()
    unslowed.make(0)
    assert time.perf_counter() - started < 2 * unslowed.compute_s + 0.05


@pytest.mark.parametrize("bad", [0.5, 0.0, float("nan"), float("inf")])
def test_local_batches_refuse_a_slowdown_below_one(bad):
    with pytest.raises(SftoolError, match="--slowdown"):
        _plan(bad, 0.0)


def test_device_slowdown_below_one_is_a_one_line_error(tmp_path):
    # Refused before the export or the data are read.
    err = one_line_error(run_cli("device", "--artifacts", tmp_path / "none", "--connect", "tcp://127.0.0.1:1",
                                 "--data", tmp_path / "none.jsonl", "--device-id", "d", "--slowdown", "0.5"))
    assert "--slowdown must be a number >= 1" in err


def _device_run(slowdown: float, tiny_model, artifacts, data, tmp_path) -> dict:
    endpoint = f"tcp://127.0.0.1:{files.free_port()}"
    out = tmp_path / f"run-{slowdown:g}"
    # A mixing buffer larger than the device's data: the server takes every batch at once, so the device
    # never waits for training and its streaming time is its own.
    server = spawn("serve", "--model", tiny_model("llama"), "--artifacts", artifacts, "--bind", endpoint, "--out", out,
                   "--devices", "1", "--threads", "1", "--checkpoint-every", "0", "--mix-capacity", str(2 * ROWS * EPOCHS))
    report = tmp_path / f"report-{slowdown:g}.json"
    device = spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", data, "--device-id", "dev",
                   "--epochs", str(EPOCHS), "--batch-size", "1", "--threads", "1", "--slowdown", f"{slowdown:g}",
                   "--report", report, env=torch_blocked_env(tmp_path))
    for proc in (device, server):
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    return json.loads(report.read_text())


def test_device_slowdown_stretches_its_wall_time(tiny_model, tiny_artifacts, tmp_path):
    artifacts = tiny_artifacts("llama")
    data = write_jsonl(synthetic_rows(ROWS, seed=1), tmp_path / "rows.jsonl")
    # Batches of 1: the most ONNX calls for the rows, so the compute stands out of the scheduling noise.
    plain = _device_run(1, tiny_model, artifacts, data, tmp_path)
    slowed = _device_run(4, tiny_model, artifacts, data, tmp_path)
    for rep, x in ((plain, 1), (slowed, 4)):
        assert rep["samples"] == ROWS * EPOCHS and rep["slowdown"] == x
        assert rep["slowed_s"] == pytest.approx(x * rep["compute_s"], rel=1e-9)
    # Four times the compute means three computes more of sleep; at least two, as loaded machines are noisy.
    # Streaming time, not wall_s: wall_s also holds the wait for the server to load, which varies by more.
    grown = slowed["stream_s"] - plain["stream_s"]
    assert grown >= 2 * slowed["compute_s"], (plain, slowed)
    assert slowed["wall_s"] > slowed["stream_s"] >= slowed["slowed_s"]
    assert slowed["first_batch_unix"] > 0


def test_bench_time_tiny_real_runs_and_model(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "time", "--tiny", "--devices", "2", "--samples", "24", "--slowdown", "3", "--out", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert set(r["real_vs_model"]) == {"pipelined", "sequential"}
    for schedule, row in r["real_vs_model"].items():
        run = r["runs"][schedule]
        assert run["stopped"] == "all devices finished" and run["samples_trained"] == 2 * 24
        assert all(d["slowed_s"] == pytest.approx(3 * d["compute_s"]) for d in run["devices"].values())
        span, model = row["real_training_span_s"], row["model_s"]
        assert 0 < span <= row["real_serve_wall_s"] + 0.05 and row["real_serve_wall_s"] < row["real_process_wall_s"]
        # The tiny run's training lasts ~0.1 s, so costs the model leaves out weigh as much as the training:
        # - its devices all start at 0; the real ones connect on ZeroMQ's 100 ms reconnect timer once the
        #   server listens, so they start up to ~0.1 s apart (measured: device_start_spread_s), taken off;
        # - sequential ACKs leave on the receiver thread's next 5 ms poll, ~2.5 ms a batch on average, on
        #   each device's chain of batches but its last: added to the model's figure;
        # - thread and ZeroMQ hand-offs and process wake-ups on 2 busy cores: within the tolerance.
        # What is left must agree within a factor 2; a unit slip or a lost factor lands far outside.
        real = span - run["device_start_spread_s"]
        batches = max(d["batches"] for d in run["devices"].values())
        expected = model + (0.0025 * (batches - 1) if schedule == "sequential" else 0.0)
        assert real / 2 <= expected <= real * 2, (schedule, row, run["device_start_spread_s"])
    # The model was fed the measured costs, the devices' times the slowdown.
    inputs = r["model_inputs"]
    for tier in inputs["tiers"]:
        pooled = [r["runs"][s]["devices"][tier["name"]] for s in ("pipelined", "sequential")]
        compute = sum(d["compute_s"] for d in pooled) / sum(d["samples"] for d in pooled)
        assert tier["splitfrozen_s"] == pytest.approx(3 * compute)
        assert tier["splitlora_s"] == pytest.approx(3 * r["device_steps"]["splitlora"]["s_per_sample"])
        assert tier["fedlora_s"] == pytest.approx(3 * r["device_steps"]["fedlora"]["s_per_sample"])
        assert tier["uplink_bytes_s"] is None and tier["latency_s"] == 0  # loopback: unlimited, no latency
    pipelined = r["runs"]["pipelined"]
    assert inputs["costs"]["splitfrozen"]["server_s_per_batch"] == pytest.approx(16 * pipelined["server_s_per_sample"])
    assert all(r["device_steps"][m]["s_per_sample"] > 0 for m in ("splitfrozen", "splitlora", "fedlora"))
    assert set(r["model"]) == {"pipelined_splitfrozen", "sequential_split", "splitlora", "fedlora"}
    assert all(m["total_s"] > 0 for m in r["model"].values())
    assert "no gradient" in r["model"]["splitlora"]["real"] and "no gradient" in r["model"]["fedlora"]["real"]
    expected = 100 * (1 - r["model"]["pipelined_splitfrozen"]["total_s"] / r["model"]["splitlora"]["total_s"])
    assert r["reduction_vs_splitlora_pct"] == pytest.approx(expected)
    assert r["machine"]["cpu"] and r["machine"]["cpu"] in result.output
    assert "pipelined SplitFrozen vs SplitLoRA" in result.output and "Time model assumptions" in result.output


def test_bench_time_bad_options_are_one_line_errors():
    err = one_line_error(run_cli("bench", "time", "--tiny", "--slowdown", "0.5"))
    assert "--slowdown" in err
    assert "--link-mbps" in one_line_error(run_cli("bench", "time", "--tiny", "--link-mbps", "0"))
