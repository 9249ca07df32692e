"""Kill the server mid-run (SIGKILL), resume it from its checkpoint: training continues, the
devices reconnect and redo only what was not trained, and no sample is trained twice."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

from cli_helpers import spawn

ROWS, EPOCHS = 300, 2


def trained_samples(metrics_path):
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [tuple(s) for r in records if "samples" in r and "correct" in r for s in r["samples"]]


def wait_for_step(metrics_path, step: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if metrics_path.exists():
            steps = [json.loads(line).get("step", 0) for line in metrics_path.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_resume_after_kill_trains_every_sample_once(tiny_model, tiny_artifacts, device_shards, free_port, tmp_path):
    artifacts = tiny_artifacts("gpt2")
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    first = spawn(
        "serve", "--model", tiny_model("gpt2"), "--artifacts", artifacts, "--bind", endpoint, "--out", run,
        "--devices", "2", "--batch-size", "16", "--mix-capacity", "32", "--checkpoint-every", "5",
        "--log-samples", "--threads", "1",
    )
    devices = [
        spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shard, "--device-id", f"dev{i}",
              "--epochs", str(EPOCHS), "--server-timeout", "2", "--threads", "1")
        for i, shard in enumerate(device_shards(ROWS))
    ]
    wait_for_step(run / "metrics.jsonl", 12, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    checkpoint = (run / "checkpoints" / "LATEST").read_text().strip()
    killed_at = int(checkpoint.split("-")[1])
    assert killed_at >= 10

    second = spawn("serve", "--resume", run)  # every option comes back from run.toml, the endpoint too
    outs = [d.communicate(timeout=240)[0] for d in devices]
    assert all(d.returncode == 0 for d in devices), outs
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0, out
    assert f"resumed from {checkpoint}" in out

    summary = json.loads((run / "summary.json").read_text())
    samples = trained_samples(run / "metrics.jsonl")
    counts = Counter(samples)
    assert max(counts.values()) == 1, [k for k, c in counts.items() if c > 1][:5]
    assert len(samples) == 2 * ROWS * EPOCHS == summary["samples_trained"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"correct"' in line]
    assert steps == list(range(1, len(steps) + 1)), "step numbers continue from the checkpoint"
    assert summary["stopped"] == "all devices finished"


def test_a_device_killed_and_restarted_loses_nothing_and_repeats_nothing(tiny_model, tiny_artifacts, device_shards,
                                                                          free_port, tmp_path):
    """SIGKILL a device mid-stream and start it again: the server tells it what is trained, it resends the
    rest, duplicates of what the server already holds are acknowledged and dropped; every sample once."""
    artifacts = tiny_artifacts("gpt2")
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    server = spawn(
        "serve", "--model", tiny_model("gpt2"), "--artifacts", artifacts, "--bind", endpoint, "--out", run,
        "--devices", "2", "--batch-size", "16", "--mix-capacity", "32", "--log-samples", "--threads", "1",
        "--no-pace",
    )
    shards = device_shards(ROWS)

    def device(i: int):
        return spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shards[i],
                     "--device-id", f"dev{i}", "--epochs", str(EPOCHS), "--threads", "1")

    steady, victim = device(0), device(1)
    wait_for_step(run / "metrics.jsonl", 8, server)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    again = device(1)
    outs = [d.communicate(timeout=240)[0] for d in (steady, again)]
    assert all(d.returncode == 0 for d in (steady, again)), outs
    out, _ = server.communicate(timeout=120)
    assert server.returncode == 0, out

    summary = json.loads((run / "summary.json").read_text())
    counts = Counter(trained_samples(run / "metrics.jsonl"))
    assert max(counts.values()) == 1, [k for k, c in counts.items() if c > 1][:5]
    assert len(counts) == 2 * ROWS * EPOCHS == summary["samples_trained"]
    assert summary["devices"]["dev1"]["samples_trained"] == ROWS * EPOCHS
    assert summary["stopped"] == "all devices finished"


def test_sigterm_ends_the_device_and_the_server_cleanly(tiny_model, tiny_artifacts, device_shards, free_port, tmp_path):
    """SIGTERM on a device: it says BYE with its totals and exits; on the server: checkpoint, adapter,
    summary, BYE to the devices still streaming, which exit cleanly too."""
    artifacts = tiny_artifacts("gpt2")
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    server = spawn("serve", "--model", tiny_model("gpt2"), "--artifacts", artifacts, "--bind", endpoint, "--out", run,
                   "--devices", "2", "--batch-size", "16", "--mix-capacity", "32", "--threads", "1", "--no-pace")
    shards = device_shards(ROWS)
    devices = [spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shards[i], "--device-id",
                     f"dev{i}", "--epochs", "20", "--threads", "1") for i in range(2)]
    wait_for_step(run / "metrics.jsonl", 5, server)
    devices[0].send_signal(signal.SIGTERM)
    out0, _ = devices[0].communicate(timeout=60)
    assert devices[0].returncode == 130 and "Traceback" not in out0, out0
    server.send_signal(signal.SIGTERM)
    out, _ = server.communicate(timeout=120)
    assert server.returncode == 0 and "Traceback" not in out, out
    out1, _ = devices[1].communicate(timeout=60)
    assert devices[1].returncode == 0 and "server: terminated" in out1, out1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "terminated"
    assert summary["devices"]["dev0"]["state"] == "finished" and summary["devices"]["dev1"]["state"] == "stopped"
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "checkpoints" / "LATEST").is_file()
