"""`sftool serve --task causal-lm` with two real `sftool device --task causal-lm` processes over
loopback: token labels travel the wire (and the activation cache replays them), the server learns
the answers (held-out answer-token loss falls), and a device that sends the other kind of labels is refused at HELLO with a clear reason."""

from __future__ import annotations

import json
import random

from cli_helpers import spawn, torch_blocked_env
from tiny_models import WORDS, write_jsonl

FILLERS = [w for w in WORDS if w not in ("good", "bad", "movie", "plot")]


def qa_rows(n: int, seed: int) -> list[dict]:
    """Prompts of random filler words, each answered "good movie plot": what a tiny random model can
    learn in a few hundred samples (a prompt-dependent first word stays at chance for it)."""
    rng = random.Random(seed)
    return [{"id": i, "question": " ".join(rng.choice(FILLERS) for _ in range(rng.randint(3, 7))),
             "answer": "good movie plot"} for i in range(n)]


def wait(proc, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def test_causal_lm_streams_token_labels_and_learns_the_answers(tiny_model, tiny_artifacts, free_port, tmp_path):
    artifacts = tiny_artifacts("llama")
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    shards = [write_jsonl(qa_rows(120, seed=i), tmp_path / f"shard{i}.jsonl") for i in (0, 1)]
    eval_file = write_jsonl(qa_rows(40, seed=9), tmp_path / "eval.jsonl")
    server = spawn(
        "serve", "--model", tiny_model("llama"), "--artifacts", artifacts, "--bind", endpoint, "--out", run,
        "--task", "causal-lm", "--devices", "2", "--batch-size", "8", "--mix-capacity", "32", "--lr", "3e-3",
        "--lora-dropout", "0", "--threads", "1", "--eval-data", eval_file, "--prompt-template", "Q: {prompt}\nA:",
        "--cache-activations",
    )
    blocked = torch_blocked_env(tmp_path)
    wrong = spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shards[0], "--device-id", "cls",
                  "--text-field", "question", "--label-field", "id", "--threads", "1", env=blocked)
    wrong_out = wait(wrong, 120)
    devices = [
        spawn("device", "--artifacts", artifacts, "--connect", endpoint, "--data", shard, "--device-id", f"dev{i}",
              "--task", "causal-lm", "--prompt-template", "Q: {prompt}\nA:", "--epochs", "3", "--threads", "1",
              env=blocked)
        for i, shard in enumerate(shards)
    ]
    device_out = [wait(d, 240) for d in devices]
    server_out = wait(server, 60)

    assert wrong.returncode != 0 and "trains a causal LM (token labels)" in wrong_out, wrong_out
    assert all(d.returncode == 0 for d in devices), device_out
    assert server.returncode == 0, server_out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "all devices finished", server_out
    assert summary["samples_trained"] == 2 * 120 * 3
    # Epochs 1 and 2 came from the activation cache, token labels included.
    assert summary["samples_replayed_from_cache"] == 2 * 120 * 2
    before, after = summary["eval_before"], summary["eval_after"]
    # Answer tokens only (4 a row: three words and EOS). The tiny model's frozen, tied head has small
    # logits, so its loss falls slowly from near-uniform (log 64 = 4.16) while its argmax learns.
    assert before["n"] == 4 * 40 and before["accuracy"] < 0.2
    assert after["loss"] < 0.8 * before["loss"] and after["accuracy"] > 0.9, (before, after)
    assert (run / "adapter" / "adapter_config.json").is_file()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
