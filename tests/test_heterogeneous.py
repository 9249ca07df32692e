"""Devices exported at different split points train one server model together."""

from __future__ import annotations

import json

import torch
from cli_helpers import spawn, torch_blocked_env

ROWS, EPOCHS = 200, 3


def test_devices_with_different_splits(tiny_model, tiny_artifacts, device_shards, free_port, tmp_path):
    early, late = tiny_artifacts("llama", 1), tiny_artifacts("llama", 2)
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    server = spawn(
        "serve", "--model", tiny_model("llama"), "--artifacts", early, "--artifacts", late, "--bind", endpoint,
        "--out", run, "--devices", "2", "--batch-size", "16", "--mix-capacity", "64", "--lr", "3e-3",
        "--lora-dropout", "0", "--threads", "1",
    )
    env = torch_blocked_env(tmp_path)
    devices = [
        spawn("device", "--artifacts", art, "--connect", endpoint, "--data", shard, "--device-id", f"k{i + 1}",
              "--epochs", str(EPOCHS), "--threads", "1", env=env)
        for i, (art, shard) in enumerate(zip((early, late), device_shards(ROWS)))
    ]
    for proc in devices + [server]:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["devices"]["k1"]["split"] == 1 and summary["devices"]["k2"]["split"] == 2
    assert summary["samples_trained"] == 2 * ROWS * EPOCHS
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"correct"' in line]
    tail = steps[-len(steps) // 4 :]
    assert sum(s["correct"] for s in tail) / sum(s["size"] for s in tail) > 0.9


def test_catch_up_equals_the_unsplit_path(tiny_model):
    """A split-1 activation run through the frozen block 1 on the server equals the device's split-2 output."""
    from sftool.exporters.families import adapter_for
    from sftool.exporters.partition import DevicePart
    from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel

    model = SplitServerModel(SplitModelSpec(str(tiny_model("gpt2")), 2, [1, 2], 0, LoraSettings(dropout=0.0)))
    adapter = adapter_for("gpt2")
    backbone = adapter.backbone(model.peft_model)
    ids = torch.randint(3, 60, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        at1 = DevicePart(adapter, backbone, 1).eval()(ids, mask)
        at2 = DevicePart(adapter, backbone, 2).eval()(ids, mask)
    model.train()  # the server trains; its catch-up blocks must still run as on a device (no dropout)
    caught_up = model.catch_up(at1, mask, 1)
    assert not caught_up.requires_grad
    assert (caught_up - at2).abs()[mask.bool()].max() <= 1e-6
