"""The run configuration: a run's settings written as run.toml read back unchanged, overrides on
top of it, and mistakes in it as one-line errors."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import one_line_error, run_cli
from sftool.run_config import RUN_CONFIG, load_run_config, read_config, write_run_config
from sftool.server.serve import ServeOptions
from sftool.settings import LoraSettings, OptimSettings


def test_a_runs_settings_round_trip_through_run_toml(tmp_path):
    opts = ServeOptions(
        source="some/model", artifacts=[Path("a/split-4"), Path("a/split-6")], bind="tcp://0.0.0.0:6000", out=tmp_path,
        num_labels=3, label_names=["x", "y", "z"], devices=5, batch_size=32, max_samples=1000, pace=False, seed=7,
        lora=LoraSettings(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]), optim=OptimSettings(lr=1e-3, warmup_steps=0),
        eval_data=Path("eval.jsonl"), eval_text_fields=["sentence1", "sentence2"], cache_activations=True,
        task="causal-lm", prompt_fields=["question", "context"], answer_field="solution", prompt_template="<|im_start|>user\n{prompt}\t\"x\" \\ é<|im_end|>\n",
        accelerator="cpu", precision="bf16", recompute=True,
    )
    write_run_config(tmp_path, opts)
    back = load_run_config(tmp_path / RUN_CONFIG, ServeOptions(source="", artifacts=[]))
    assert back == opts
    assert read_config(tmp_path / RUN_CONFIG)["transport"]["bind"] == "tcp://0.0.0.0:6000"


def test_command_line_options_override_the_config(tmp_path, monkeypatch):
    import sftool.server.serve as serve_module

    seen = {}

    def fake_serve(opts, **kwargs):  # stands in for training: the test is about which settings arrive
        seen["opts"] = opts
        return {"stopped": "test", "samples_trained": 0, "steps": 0, "final_loss": 0.0, "train_accuracy": 0.0,
                "bytes_received": 0, "wall_s": 0.0, "devices": {}, "adapter": ""}

    monkeypatch.setattr(serve_module, "serve", fake_serve)
    config = tmp_path / "run.toml"
    config.write_text('[model]\nsource = "m"\nartifacts = ["art"]\n[optim]\nlr = 0.01\n[train]\nbatch_size = 4\n')
    result = run_cli("serve", "--config", config, "--batch-size", "8")
    assert result.exit_code == 0, result.output
    opts = seen["opts"]
    assert (opts.source, opts.artifacts, opts.optim.lr, opts.batch_size) == ("m", [Path("art")], 0.01, 8)
    assert opts.optim.warmup_steps == OptimSettings().warmup_steps and opts.mix_capacity == ServeOptions("", []).mix_capacity


def test_mistakes_in_a_config_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1\n")
    assert "[optim] has no entry learning_rate" in one_line_error(run_cli("serve", "--config", bad))
    bad.write_text("[nonsense]\nx = 1\n")
    assert "unknown section [nonsense]" in one_line_error(run_cli("serve", "--config", bad))
    bad.write_text("[optim\n")
    assert "not valid TOML" in one_line_error(run_cli("serve", "--config", bad))
