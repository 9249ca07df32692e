"""`sftool serve` + two `sftool device` processes over real loopback sockets, end to end.

The devices run where importing torch/transformers/peft/optimum fails, so this also proves the
device side is torch-free.
"""

from __future__ import annotations

import json
import time

import pytest
from cli_helpers import one_line_error, run_cli, spawn, torch_blocked_env
from conftest import FAMILIES
from tiny_models import synthetic_rows, write_jsonl

ROWS, EPOCHS = 300, 3


def wait(proc, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{out}"
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_and_two_devices_learn_the_task(family, tiny_model, tiny_artifacts, device_shards, free_port, tmp_path):
    artifacts = tiny_artifacts(family)
    shards = device_shards(ROWS)
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    eval_file = write_jsonl(synthetic_rows(100, seed=99), tmp_path / "eval.jsonl")
    started = time.perf_counter()
    server = spawn(
        "serve", "--model", tiny_model(family), "--artifacts", artifacts, "--bind", endpoint, "--out", run,
        "--devices", "2", "--batch-size", "16", "--mix-capacity", "64", "--lr", "3e-3", "--lora-dropout", "0",
        "--threads", "1", "--eval-data", eval_file,
    )
    blocked = torch_blocked_env(tmp_path)
    devices = [
        # dev1 runs the standard-ONNX device.onnx (what another ONNX runtime would load), dev0 the
        # onnxruntime-optimized file: both streams must train the same model.
        spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shard, "--device-id", f"dev{i}",
              "--epochs", str(EPOCHS), "--threads", "1", "--runtime", ("onnxruntime", "onnx")[i], env=blocked)
        for i, shard in enumerate(shards)
    ]
    device_out = [wait(d, 180) for d in devices]
    server_out = wait(server, 60)
    elapsed = time.perf_counter() - started

    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "all devices finished", server_out
    # Devices are let in while the first evaluation runs, not held out until it ends.
    assert server_out.index("listening on") < server_out.index("eval at step 0"), server_out
    total = 2 * ROWS * EPOCHS
    assert summary["samples_trained"] == total
    assert "(device.onnx)" in device_out[1], device_out[1]
    for i, out in enumerate(device_out):
        assert f"{ROWS * EPOCHS} samples in" in out and "acknowledged" in out
        d = summary["devices"][f"dev{i}"]
        assert d["samples_received"] == ROWS * EPOCHS and d["samples_trained"] == ROWS * EPOCHS and d["duplicates"] == 0 and d["rejected"] == 0 and d["state"] == "finished"
    assert summary["errors_sent"] == 0

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "correct" in r]
    tail = steps[-len(steps) // 4 :]
    accuracy = sum(s["correct"] for s in tail) / sum(s["size"] for s in tail)
    assert accuracy > 0.9, f"{family}: training accuracy over the last quarter {accuracy:.3f}"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard event files"
    # Held-out evaluation through the exported device part + the trained server part.
    assert summary["eval_before"]["n"] == 100 and summary["eval_before"]["step"] == 0
    assert summary["eval_after"]["accuracy"] > 0.85, summary["eval_after"]
    # `sftool evaluate` rebuilds the trained model from the run folder alone and gets the same result.
    result = run_cli("evaluate", run, "--out", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["accuracy"] == summary["eval_after"]["accuracy"] and again["n"] == 100
    assert again["loss"] == pytest.approx(summary["eval_after"]["loss"], rel=1e-5)
    result = run_cli("evaluate", run, "--precision", "int8")  # this export has no int8 model
    assert "no int8 model" in one_line_error(result)
    print(f"{family}: accuracy {accuracy:.3f} over the last {len(tail)} steps, {elapsed:.1f}s end to end")
