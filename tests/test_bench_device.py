"""`sftool bench device --tiny`: every path runs on the same batches, ratios and wire bytes are reported,
and the onnxruntime paths' memory is measured in a subprocess that never imports torch."""

from __future__ import annotations

import json

from cli_helpers import run_cli
from sftool.bench_device import PATHS, DeviceBenchConfig, run_device_bench


def test_bench_device_tiny_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "device", "--tiny", "--samples", "12", "--batch-size", "4", "--repeats", "2",
                     "--threads", "1", "--no-memory", "--epochs", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert "SplitFrozen" in result.output and "targets" in result.output
    results = json.loads(out.read_text())
    assert list(results["paths"]) == list(PATHS)
    for name, p in results["paths"].items():
        assert len(p["ms_per_sample_all"]) == 2 and p["ms_per_sample"] > 0, name
    assert results["paths"]["ort_int8"]["runs"].startswith("int8/")
    assert results["data"]["samples"] == 12
    wire = results["wire_bytes_per_sample"]
    assert wire["fp16_bucketed"] < wire["fp32_bucketed"] < wire["fp32_padded"]
    assert wire["fp16_padded"] < wire["fp32_padded"]
    assert [t["target"] for t in results["targets"]][0] == "int8 speed-up over torch eager forward"
    assert all(t["met"] in (True, False) for t in results["targets"])
    # the same targets with ort_int8 at the int8 floor: never worse than measured; wire bytes do not move
    floor = results["int8_floor"]["floor_ms_per_sample"]
    assert 0 < floor < results["paths"]["ort_int8"]["ms_per_sample"] and "int8 floor" in result.output
    speed, splitlora, fedlora, wire_target = results["targets"]
    assert speed["at_int8_floor"] > speed["value"] and splitlora["at_int8_floor"] > splitlora["value"]
    assert fedlora["at_int8_floor"] == 1 - floor / results["paths"]["fedlora_device"]["ms_per_sample"]
    assert wire_target["at_int8_floor"] == wire_target["value"] and wire_target["reachable"] is wire_target["met"]
    run, ms = results["training_run"], {n: p["ms_per_sample"] for n, p in results["paths"].items()}
    assert run["epochs"] == 2 and "2-epoch run" in result.output
    # a frozen device computes each sample once per run; training devices compute every epoch
    assert run["ms_per_training_sample"]["splitlora_device"] == 2 * ms["splitlora_device"]
    below = run["device_time_below"]["1 - ort_int8 cached / splitlora_device"]
    assert below == 1 - ms["ort_int8"] / (2 * ms["splitlora_device"])


def test_bench_device_memory_of_onnxruntime_paths_without_torch(tmp_path):
    results = run_device_bench(
        DeviceBenchConfig(tiny=True, samples=8, batch_size=4, repeats=1, threads=1, paths=["ort_int8", "ort_fp32"]),
        log=lambda m: None,
    )
    for name in ("ort_int8", "ort_fp32"):
        p = results["paths"][name]
        assert p["torch_loaded"] is False, "the device paths must run without torch"
        assert 0 < p["baseline_rss_mb"] <= p["peak_rss_mb"]


def test_bench_device_unknown_path_is_an_error(tmp_path):
    result = run_cli("bench", "device", "--tiny", "--paths", "ort_int8,tflite")
    assert result.exit_code == 2 and "unknown path" in result.output
