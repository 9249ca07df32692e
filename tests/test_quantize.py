"""int8 export: one model per CPU target, saved graph-optimized, parity on real text, bad variants rejected."""

from __future__ import annotations

import json

import onnx
import pytest
from cli_helpers import run_cli
from conftest import SPLIT
from int8_fixtures import int8_artifacts  # noqa: F401  (fixture)
from onnx import numpy_helper
from sftool.errors import SftoolError
from sftool.exporters.onnx_export import ExportOptions, export_device
from sftool.exporters.quantize import CALIBRATION_TEXTS, INT8_TARGETS, MIN_MEAN_COSINE, resolve_targets
from sftool.runtime.manifest import load_manifest


def test_resolve_targets():
    assert resolve_targets(["auto"]) == list(INT8_TARGETS) == resolve_targets(["all"])
    assert resolve_targets(["none"]) == [] == resolve_targets([])
    assert resolve_targets(["avx2", "arm64", "avx2"]) == ["avx2", "arm64"]
    with pytest.raises(SftoolError, match="unknown --int8 target"):
        resolve_targets(["arm64", "neon"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_int8_model_per_target_with_parity_on_real_text(family, int8_artifacts):
    folder = int8_artifacts(family)
    manifest = load_manifest(folder)  # re-hashes every file
    by_target = {v.target: v for v in manifest.variants if v.precision == "int8"}
    assert sorted(by_target) == sorted(INT8_TARGETS)
    assert manifest.parity["calibration"]["texts"] == len(CALIBRATION_TEXTS)
    fp32 = manifest.variant("fp32")
    assert fp32.parity["mean_cosine"] > 0.999999 and "ort.extended" in fp32.method
    for target, v in by_target.items():
        assert v.file == f"device.int8.{target}.onnx" and v.file in manifest.files
        assert set(v.parity) >= {"max_abs_diff", "mean_cosine", "min_cosine"}
        assert MIN_MEAN_COSINE <= v.parity["mean_cosine"] < 1.0
        assert v.parity["min_cosine"] <= v.parity["mean_cosine"]
        assert v.parity["max_abs_diff"] > 0  # really quantized
    assert "reduce_range" in by_target["avx2"].method and "reduce_range" not in by_target["arm64"].method
    # arm64 and avx512_vnni share one recipe: the same bytes (quantized once, copied)
    assert manifest.files["device.int8.arm64.onnx"]["sha256"] == manifest.files["device.int8.avx512_vnni.onnx"]["sha256"]
    # int8 weights make the file much smaller than fp32
    assert manifest.files["device.int8.arm64.onnx"]["bytes"] < 0.75 * manifest.files["device.onnx"]["bytes"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_models_are_graph_optimized_and_every_projection_int8(family, int8_artifacts):
    folder = int8_artifacts(family)
    for name in ("device.ort.onnx", "device.int8.arm64.onnx"):
        graph = onnx.load(str(folder / name)).graph
        # ORT_ENABLE_EXTENDED fusions (contrib ops) are in the file itself, not redone at every load.
        assert any(n.domain == "com.microsoft" for n in graph.node), name
    graph = onnx.load(str(folder / "device.int8.arm64.onnx")).graph
    assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat") for n in graph.node)
    method = load_manifest(folder).variant("int8", "arm64").method
    assert "per-token" in method and ("smoothquant" in method) == (family == "llama")  # GPT-2 has no exact fold
    assert not _fp32_matmul_weights(graph), "every projection's weight is int8"


def _fp32_matmul_weights(graph):
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return [inits[n.input[1]] for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def test_int8_below_the_threshold_is_rejected_and_nothing_is_written(tiny_model, tmp_path, monkeypatch):
    import sftool.exporters.quantize as quantize

    monkeypatch.setattr(quantize, "MIN_MEAN_COSINE", 0.9999999)
    out = tmp_path / "art"
    with pytest.raises(SftoolError, match="too far from fp32"):
        export_device(ExportOptions(str(tiny_model("llama")), SPLIT, out, max_seq_len=64, int8_targets=["arm64"]), log=lambda m: None)
    assert not out.exists() and not list(tmp_path.glob(".art*"))


def test_export_cli_int8_default_is_auto_and_none_skips(tiny_model, tmp_path):
    result = run_cli("export", "--model", tiny_model("gpt2"), "--split", "1", "--out", tmp_path / "a", "--max-seq-len", "32")
    assert result.exit_code == 0, result.output
    variants = json.loads((tmp_path / "a" / "manifest.json").read_text())["variants"]
    assert sorted(v["target"] for v in variants) == sorted(["any", *INT8_TARGETS])
    result = run_cli("export", "--model", tiny_model("gpt2"), "--split", "1", "--out", tmp_path / "b", "--int8", "none")
    assert result.exit_code == 0, result.output
    assert [v.precision for v in load_manifest(tmp_path / "b").variants] == ["fp32"]


def test_export_cli_unknown_int8_target_is_one_line_error(tiny_model, tmp_path):
    result = run_cli("export", "--model", tiny_model("gpt2"), "--split", "1", "--out", tmp_path / "a", "--int8", "neon")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown --int8 target" in result.output and not (tmp_path / "a").exists()
