"""The activation cache: devices send epoch 0 only; the server replays the rest from disk."""

from __future__ import annotations

import json
import random

import numpy as np
from cli_helpers import spawn
from sftool.server.activation_cache import ActivationCache

ROWS, EPOCHS = 200, 3


def test_cache_round_trip_budget_and_persistence(tmp_path):
    cache = ActivationCache(tmp_path, hidden_size=4, max_bytes=10 * 8 * 4 * 2)
    assert cache.reserve(samples=10, max_len=8) and not cache.reserve(samples=1, max_len=8)
    rng = np.random.default_rng(0)
    stored = {i: rng.standard_normal((i + 1, 4)).astype(np.float16) for i in range(5)}
    for i, h in stored.items():
        cache.put("dev", i, i % 2, h)
    for i, h in stored.items():
        got, label = cache.get("dev", i)
        np.testing.assert_array_equal(got, h)
        assert label == i % 2
    order = list(cache.replay_order(["dev"], random.Random(0)))
    assert sorted(order) == [("dev", i) for i in range(5)]
    cache.save_index()
    cache.close()
    again = ActivationCache(tmp_path, hidden_size=4, max_bytes=1)
    again.load_index()
    np.testing.assert_array_equal(again.get("dev", 3)[0], stored[3])


def test_later_epochs_come_from_the_cache(tiny_model, tiny_artifacts, device_shards, free_port, tmp_path):
    artifacts = tiny_artifacts("gpt2")
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    server = spawn(
        "serve", "--model", tiny_model("gpt2"), "--artifacts", artifacts, "--bind", endpoint, "--out", run,
        "--devices", "2", "--batch-size", "16", "--mix-capacity", "64", "--lr", "3e-3", "--lora-dropout", "0",
        "--cache-activations", "--log-samples", "--threads", "1",
    )
    devices = [
        spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shard, "--device-id", f"dev{i}",
              "--epochs", str(EPOCHS), "--threads", "1", "--report", tmp_path / f"dev{i}.json")
        for i, shard in enumerate(device_shards(ROWS))
    ]
    for proc in devices + [server]:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
    for i in range(2):
        report = json.loads((tmp_path / f"dev{i}.json").read_text())
        assert report["samples"] == ROWS, "a device computes and sends epoch 0 only"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["samples_trained"] == 2 * ROWS * EPOCHS
    assert summary["samples_replayed_from_cache"] == 2 * ROWS * (EPOCHS - 1)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [tuple(s) for r in records if "samples" in r for s in r["samples"]]
    assert len(set(trained)) == len(trained) == 2 * ROWS * EPOCHS
    assert {e for _, e, _ in trained} == set(range(EPOCHS))
    tail = [r for r in records if "correct" in r][-20:]
    assert sum(r["correct"] for r in tail) / sum(r["size"] for r in tail) > 0.9
