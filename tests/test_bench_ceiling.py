"""The int8 floor of `sftool bench device`: weight MACs counted from the exported files, the int8 GEMM
peak probe, and the profile of a real int8 file."""

from __future__ import annotations

import json

import pytest
from conftest import SPLIT
from int8_fixtures import int8_artifacts  # noqa: F401  (session fixture)
from sftool.bench_ceiling import Int8Floor, weight_macs_per_token
from sftool.bench_device import make_batches
from sftool.exporters.quantize import CALIBRATION_TEXTS
from sftool.runtime.manifest import load_manifest


def _projection_macs(config: dict) -> int:
    """Weight MACs per token of one block, from the model's config.json alone."""
    if config["model_type"] == "gpt2":
        h = config["n_embd"]
        inner = config.get("n_inner") or 4 * h
        return h * 3 * h + h * h + 2 * h * inner  # c_attn, attn c_proj, mlp c_fc + c_proj
    h, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    return h * (h + 2 * kv) + h * h + 3 * h * inter  # q/k/v, o, gate/up/down


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_macs_count_every_device_projection_in_fp32_and_int8_files(family, tiny_model, int8_artifacts):
    config = json.loads((tiny_model(family) / "config.json").read_text())
    expected = SPLIT * _projection_macs(config)
    artifacts = int8_artifacts(family)
    manifest = load_manifest(artifacts)
    assert {v.precision for v in manifest.variants} == {"fp32", "int8"}
    for variant in manifest.variants:  # Gemm in fp32, DynamicQuantizeMatMul / MatMulIntegerToFloat in int8
        assert weight_macs_per_token(artifacts / variant.file) == expected, variant.label


def test_int8_floor_of_a_real_int8_file(int8_artifacts, tmp_path):
    artifacts = int8_artifacts("llama")
    model = artifacts / "device.int8.avx512_vnni.onnx"
    texts = list(CALIBRATION_TEXTS)
    batches = make_batches(artifacts, texts, [0] * len(texts), batch_size=4, max_len=64)
    probe = Int8Floor(model, reduce_range=False, threads=1, work_dir=tmp_path, batches=batches)
    for _ in range(2):
        probe.repetition()
    tokens = sum(int(mask.sum()) for _, mask, _ in batches) / len(texts)
    floor = probe.result(tokens)
    peak = floor["int8_gemm_peak_gmacs"]
    assert len(floor["int8_gemm_peak_gmacs_all"]) == 2 and peak == max(floor["int8_gemm_peak_gmacs_all"])
    assert 1 < peak < 10_000  # GMAC/s of one core: a unit slip would land far outside
    assert floor["weight_macs_per_token"] == weight_macs_per_token(model)
    assert floor["floor_ms_per_sample"] == pytest.approx(floor["macs_per_sample"] / (peak * 1e9) * 1e3)
    assert 0 < floor["int8_gemm_ms_per_sample"] < floor["int8_kernels_ms_per_sample"]
    # The file's GEMMs cannot beat the CPU's int8 GEMM peak, so neither can their time the floor.
    assert floor["int8_gemm_gmacs"] < 1.2 * peak
    assert floor["floor_ms_per_sample"] < 1.2 * floor["int8_gemm_ms_per_sample"]
