"""`sftool experiment` on the shipped smoke config: every method runs on the same shards, the
report is written, a second start skips finished runs, and every method's adapter reproduces its
reported accuracy when loaded with plain peft on the unsplit model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, run_cli
from sftool.experiment import METHODS, read_results

SMOKE = Path(__file__).parent.parent / "examples" / "paper" / "smoke.toml"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = run_cli("experiment", SMOKE, "--out", out, "--keep-runs")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_method_runs_on_the_same_shards_and_learns(sweep):
    out, _ = sweep
    results = read_results(out)
    assert sorted(r["method"] for r in results) == sorted(METHODS)
    assert len({r["samples"] for r in results}) == 1, "every method trains on the same number of samples"
    for r in results:
        assert r["accuracy"] > r["majority"] + 0.15, (r["method"], r["accuracy"])
        assert r["curve"][-1]["samples"] == r["samples"]
    by = {r["method"]: r for r in results}
    assert by["splitfrozen"]["device_flops_per_sample"] < by["splitlora"]["device_flops_per_sample"] < by["fedlora"]["device_flops_per_sample"]
    assert by["splitfrozen"]["bytes_down"] == 0 < by["splitlora"]["bytes_down"]
    report = (out / "report.md").read_text()
    assert "splitfrozen (fp32) vs splitlora" in report and "majority class" in report
    assert all((out / f).is_file() for f in ("accuracy_vs_samples.png", "device_compute.png", "time_breakdown.png"))


def test_a_second_start_skips_finished_runs(sweep):
    out, _ = sweep
    before = (out / "results.jsonl").read_text()
    result = run_cli("experiment", SMOKE, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"{len(METHODS)} already done, 0 to run" in result.output
    assert (out / "results.jsonl").read_text() == before


@pytest.mark.parametrize("method", METHODS)
def test_adapter_loads_with_plain_peft_and_scores_the_same(sweep, method):
    import transformers
    from peft import PeftModel
    from sftool.runtime.local_data import read_examples

    out, _ = sweep
    record = next(r for r in read_results(out) if r["method"] == method)
    run = out / "runs" / record["run"].replace("/", "_")
    data = next((out / "data").iterdir())
    labels = json.loads((data / "label_map.json").read_text())["label_names"]
    source = out / "assets" / "tiny-random-llama"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels), pad_token_id=0)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    tok = transformers.AutoTokenizer.from_pretrained(source)
    examples = read_examples(data / "eval.jsonl")
    correct = 0
    with torch.no_grad():
        for e in examples:  # one row at a time: no padding, so pooling is plain
            ids = tok(e.text, return_tensors="pt", add_special_tokens=False)
            correct += int(model(**ids).logits.argmax(-1).item() == e.label)
    assert correct / len(examples) == pytest.approx(record["accuracy"], abs=1.5 / len(examples))


def test_bad_configs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\nmethods = ['splitfrozen', 'nope']\n")
    assert "nope" in one_line_error(run_cli("experiment", bad, "--out", tmp_path / "o"))
    assert "[train] has no entry bogus" in one_line_error(run_cli("experiment", SMOKE, "--set", "train.bogus=1"))
    assert "section.key=value" in one_line_error(run_cli("experiment", SMOKE, "--set", "lr=1"))
    bad.write_text("[sweep\n")
    assert "not valid TOML" in one_line_error(run_cli("experiment", bad))
