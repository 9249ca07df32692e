"""`sftool demo`: the orchestration end to end with real processes (serve + 3 devices over loopback)
on a tiny model, its failure and Ctrl-C paths (no orphan processes), and the real demo (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import SFTOOL, spawn
from tiny_models import synthetic_rows, write_jsonl

FAMILY = "llama"
SPLIT = 2
SMALL = 180  # rows of the two single-label "negative" devices; the "positive" one holds twice as many


def make_data_dir(folder: Path, broken_device: int | None = None) -> Path:
    """labels:1-style shards (device 0 and 2: label 0, device 1: label 1, twice as many), eval, label map."""
    folder.mkdir(parents=True, exist_ok=True)
    for d, label in enumerate((0, 1, 0)):
        path = write_jsonl(synthetic_rows(SMALL * (2 if label else 1), seed=d + 1, only_label=label),
                           folder / f"device-{d}.jsonl")
        if d == broken_device:
            path.write_text(path.read_text() + "{this is not json\n")
    write_jsonl(synthetic_rows(80, seed=99), folder / "eval.jsonl")
    (folder / "label_map.json").write_text(json.dumps({"label_names": ["bad", "good"], "verbalizers": ["bad", "good"]}))
    return folder


def seeded_out(out: Path, artifacts: Path) -> Path:
    """A run folder that already holds the session's export (the demo reuses a matching one)."""
    out.mkdir(parents=True)
    shutil.copytree(artifacts, out / "artifacts")
    return out


def demo_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["demo", "--model", str(model), "--data-dir", str(data), "--out", str(out), "--split", str(SPLIT),
            "--max-seq-len", "64", "--server-threads", "1", "--threads", "1", "--lr", "3e-3", "--timeout", "150", *extra]


def child_pids(out: Path) -> dict[str, int]:
    pids = {}
    for log in (out / "logs").glob("*.log"):
        m = re.search(r"^# pid (\d+)$", log.read_text(), re.MULTILINE)
        if m:
            pids[log.stem] = int(m.group(1))
    return pids


def assert_all_gone(pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is gone for all purposes; anything else is an orphan the demo left running.
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "Z"
        assert state == "Z", f"{name} (pid {pid}) still runs after the demo exited"


def test_demo_tiny_end_to_end(tiny_model, tiny_artifacts, tmp_path):
    data = make_data_dir(tmp_path / "data")
    out = seeded_out(tmp_path / "run", tiny_artifacts(FAMILY, SPLIT))
    started = time.perf_counter()
    proc = spawn(*demo_args(tiny_model(FAMILY), data, out, "--epochs", "2", "--no-zero-shot"))
    output, _ = proc.communicate(timeout=160)
    assert proc.returncode == 0, output
    elapsed = time.perf_counter() - started

    res = json.loads((out / "results.json").read_text())
    assert res["accuracy"]["before"]["n"] == 80 and res["accuracy"]["after"]["n"] == 80
    assert res["accuracy"]["after"]["accuracy"] >= 0.85, res["accuracy"]
    assert res["accuracy"]["zero_shot"] is None
    assert res["samples_trained"] == 4 * SMALL * 2
    assert set(res["devices"]) == {"device-0", "device-1", "device-2"}
    # Batch sizes scale with the shards, so the three streams end together.
    assert res["settings"]["device_batch_sizes"] == [8, 16, 8]
    for d in res["devices"].values():
        assert d["samples_sent"] == d["shard_samples"] * 2 == d["server_samples"]
        assert d["bytes_sent"] > 0 and d["compute_s"] > 0
        assert len(d["labels"]) == 1  # one label per device
    assert res["devices"]["device-1"]["labels"] == {"good": 2 * SMALL}
    assert res["server"]["train_compute_s"] > 0 and res["server"]["eval_compute_s"] > 0
    assert res["server"]["stopped"] == "all devices finished"
    assert res["timings"]["total_s"] > 0 and res["cold_cache"] is False
    md = (out / "results.md").read_text()
    assert "after training" in md and "device-1: bytes sent" in md
    # One table on stdout; the children's streamed output carries their prefixes.
    assert "sftool demo" in output and "after training" in output
    for name in ("[serve]", "[device-0]", "[device-1]", "[device-2]"):
        assert name in output
    assert "export: reusing" in output
    assert_all_gone(child_pids(out))
    print(f"tiny demo end to end in {elapsed:.1f}s")


def test_a_failing_device_stops_the_others_with_one_line(tiny_model, tiny_artifacts, tmp_path):
    data = make_data_dir(tmp_path / "data", broken_device=1)
    out = seeded_out(tmp_path / "run", tiny_artifacts(FAMILY, SPLIT))
    proc = spawn(*demo_args(tiny_model(FAMILY), data, out, "--epochs", "50", "--no-zero-shot"))
    output, _ = proc.communicate(timeout=110)
    assert proc.returncode == 2, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: device-1 exited with code"), output
    pids = child_pids(out)
    assert {"serve", "device-0", "device-1", "device-2"} <= set(pids)
    assert_all_gone(pids)


def test_ctrl_c_stops_every_child(tiny_model, tiny_artifacts, tmp_path):
    data = make_data_dir(tmp_path / "data")
    out = seeded_out(tmp_path / "run", tiny_artifacts(FAMILY, SPLIT))
    proc = spawn(*demo_args(tiny_model(FAMILY), data, out, "--epochs", "500", "--no-zero-shot"))
    seen = []
    deadline = time.monotonic() + 100
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the devices are streaming
        seen.append(line)
        if "joined" in line or time.monotonic() > deadline:
            break
    assert any("joined" in line for line in seen), "".join(seen)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=180)  # cleanup, not speed, is under test; CI machines may be busy
    assert proc.returncode == 130, "".join(seen) + rest
    assert rest.strip().splitlines()[-1] == "interrupted"
    assert_all_gone(child_pids(out))
    # serve was stopped with SIGINT first, so it still saved what it trained.
    assert (out / "run" / "summary.json").is_file()


def test_a_failing_export_is_one_line(tmp_path):
    data = make_data_dir(tmp_path / "data")
    proc = spawn(*demo_args(tmp_path / "no-such-model", data, tmp_path / "run", "--no-zero-shot"))
    output, _ = proc.communicate(timeout=55)
    assert proc.returncode == 2, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: export exited with code 2:") and "no-such-model" in last, output


def test_zero_shot_matches_the_full_lm_head(tiny_model, tmp_path):
    """The batched verbalizer scorer equals an argmax over the full LM logits, one example at a time."""
    import torch
    from sftool.demo import zero_shot
    from sftool.exporters.model_source import load_model, load_tokenizer

    model_dir = tiny_model(FAMILY)
    eval_file = write_jsonl(synthetic_rows(40, seed=7), tmp_path / "eval.jsonl")
    res = zero_shot(str(model_dir), eval_file, ["bad", "good"], threads=1, batch_size=8)
    assert res["n"] == 40 and res["verbalizers"] == [" bad", " good"]

    tok, lm = load_tokenizer(str(model_dir)), load_model(str(model_dir), head="causal_lm")
    words = [tok.encode(" " + w, add_special_tokens=False)[0] for w in ("bad", "good")]
    correct = 0
    with torch.no_grad():
        for row in synthetic_rows(40, seed=7):
            ids = torch.tensor([tok.encode(row["text"], add_special_tokens=False)])
            logits = lm(input_ids=ids).logits[0, -1, words]
            correct += int(logits.argmax()) == row["label"]
    assert res["accuracy"] == pytest.approx(correct / 40)


def test_device_batch_sizes_follow_the_shards():
    from sftool.demo import device_batch_sizes

    assert device_batch_sizes([161, 333, 160], 8, 64) == [8, 17, 8]
    assert device_batch_sizes([100, 100], 8, 64) == [8, 8]
    assert device_batch_sizes([1, 1000], 8, 64) == [8, 64]  # capped at the export's max batch


@pytest.mark.slow
def test_real_demo_sst2_labels1(tmp_path):
    """The real thing: SmolLM2-135M at split 6, SST-2 labels:1 over 3 devices (cached assets)."""
    out = tmp_path / "demo"
    proc = subprocess.run([*SFTOOL, "demo", "--out", str(out)], check=False, capture_output=True,
                          text=True, timeout=3500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["accuracy"]["after"]["n"] == 218
    # The target is >= 0.85 (measured 0.858 and 0.872); one eval example is 0.46 points and the
    # standard error ~2.4, so the test asks for 0.83 to stay a test of training, not of luck.
    assert res["accuracy"]["after"]["accuracy"] >= 0.83, res["accuracy"]
    assert res["accuracy"]["zero_shot"]["accuracy"] > 0.75  # 0.789 measured
    assert all(d["bytes_sent"] > 0 for d in res["devices"].values())
    print(proc.stdout)


def test_one_seed_gives_one_result_run_after_run(tiny_model, tiny_artifacts, tmp_path):
    """Real device processes race each other, yet the server releases their batches in a fixed
    order: two demos at the same seed train the same samples in the same order, to the same loss."""
    data = make_data_dir(tmp_path / "data")
    losses, accuracies = [], []
    for i in range(2):
        out = seeded_out(tmp_path / f"run{i}", tiny_artifacts(FAMILY, SPLIT))
        proc = spawn(*demo_args(tiny_model(FAMILY), data, out, "--epochs", "1", "--no-zero-shot", "--seed", "5"))
        output, _ = proc.communicate(timeout=160)
        assert proc.returncode == 0, output
        metrics = next(out.rglob("metrics.jsonl"))
        losses.append([json.loads(line)["loss"] for line in metrics.read_text().splitlines() if '"correct"' in line])
        accuracies.append(json.loads((out / "results.json").read_text())["accuracy"]["after"]["accuracy"])
    assert len(losses[0]) > 10 and losses[0] == losses[1]
    assert accuracies[0] == accuracies[1]
