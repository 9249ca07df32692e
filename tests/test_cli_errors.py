"""User mistakes on serve and device give one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json

from cli_helpers import one_line_error, run_cli, spawn
from tiny_models import make_tiny_model, synthetic_rows, write_jsonl


def test_serve_missing_artifacts(tiny_model, tmp_path):
    err = one_line_error(run_cli("serve", "--model", tiny_model("gpt2"), "--artifacts", tmp_path / "none", "--out", tmp_path / "r"))
    assert "does not exist" in err


def test_serve_refuses_a_model_with_other_weights(tiny_artifacts, tmp_path):
    other = make_tiny_model(tmp_path / "other", "gpt2", seed=1)  # same shapes, different weights
    err = one_line_error(run_cli("serve", "--model", other, "--artifacts", tiny_artifacts("gpt2"), "--out", tmp_path / "r"))
    assert "differs from the weights exported" in err


def test_serve_refuses_another_family(tiny_model, tiny_artifacts, tmp_path):
    err = one_line_error(run_cli("serve", "--model", tiny_model("llama"), "--artifacts", tiny_artifacts("gpt2"), "--out", tmp_path / "r"))
    assert "exported from a gpt2 model" in err


def test_serve_needs_model_and_artifacts(tmp_path):
    assert "--model and --artifacts" in one_line_error(run_cli("serve", "--out", tmp_path / "r"))


def test_device_bad_data_file(tiny_artifacts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n')
    err = one_line_error(run_cli("device", "--artifacts", tiny_artifacts("gpt2"), "--connect", "tcp://127.0.0.1:1",
                                 "--data", bad, "--device-id", "d"))
    assert "no field" in err


def test_device_without_a_server_gives_up_cleanly_when_told_to(tiny_artifacts, tmp_path, free_port):
    data = write_jsonl(synthetic_rows(4, 1), tmp_path / "d.jsonl")
    proc = spawn("device", "--artifacts", tiny_artifacts("gpt2"), "--connect", f"tcp://127.0.0.1:{free_port}",
                 "--data", data, "--device-id", "d", "--server-timeout", "1", "--connect-timeout", "5",
                 env={"SFTOOL_HELLO_TIMEOUT": "1"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in out and "cannot reach the server" in out, out
    assert "retrying" in out, "it tried more than once before giving up"


def test_budget_stops_the_run_and_devices_exit_cleanly(tiny_model, tiny_artifacts, tmp_path, free_port):
    endpoint = f"tcp://127.0.0.1:{free_port}"
    data = write_jsonl(synthetic_rows(400, 1), tmp_path / "d.jsonl")
    server = spawn("serve", "--model", tiny_model("gpt2"), "--artifacts", tiny_artifacts("gpt2"), "--bind", endpoint,
                   "--out", tmp_path / "run", "--max-steps", "5", "--batch-size", "8", "--mix-capacity", "8")
    device = spawn("device", "--artifacts", tiny_artifacts("gpt2"), "--connect", endpoint, "--data", data,
                   "--device-id", "d", "--epochs", "5")
    out, _ = device.communicate(timeout=120)
    assert device.returncode == 0 and "server: budget reached" in out, out
    server.communicate(timeout=60)
    assert server.returncode == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"] == "budget reached" and summary["steps"] == 5
