"""The export's standard-ONNX device.onnx beside the onnxruntime files: onnx.checker, plain sessions,
exact zeros at padding, the recorded activation range, and which file a device runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FAMILIES, SPLIT
from int8_fixtures import int8_artifacts  # noqa: F401  (fixture)
from sftool.errors import SftoolError
from sftool.exporters.portable import non_standard_ops, standard_onnx_problem
from sftool.runtime.manifest import load_manifest
from sftool.runtime.onnx_model import DeviceModel, choose_variant


def _session(path, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _padded_batches():
    """Right-padded batches: a short row, a one-token row, a full row; and a single-row batch."""
    batches = []
    for b, t, seed in ((3, 11, 0), (1, 4, 1)):
        ids = np.random.default_rng(seed).integers(3, 60, (b, t))
        mask = np.ones((b, t), np.int64)
        if b > 1:
            mask[0, 6:] = 0
            mask[1, 1:] = 0
        ids[mask == 0] = 0  # the pad id
        batches.append((ids, mask))
    return batches


def _torch_part(tiny_model, family):
    import transformers
    from sftool.exporters.families import adapter_for
    from sftool.exporters.partition import DevicePart

    model = transformers.AutoModel.from_pretrained(tiny_model(family)).eval()
    return DevicePart(adapter_for(family), model, SPLIT).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_device_onnx_is_standard_onnx_and_the_optimized_file_is_not(family, tiny_artifacts):
    folder = tiny_artifacts(family)
    manifest = load_manifest(folder)
    fp32 = manifest.variant("fp32")
    assert fp32.file == "device.onnx" and fp32.runtime == "onnx"
    model = onnx.load(str(folder / "device.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert non_standard_ops(model) == [] and standard_onnx_problem(folder / "device.onnx") is None
    # The onnxruntime file is listed, hashed, and really is onnxruntime's (so the check above can fail).
    assert fp32.optimized_file == "device.ort.onnx" and fp32.optimized_file in manifest.files
    problem = standard_onnx_problem(folder / fp32.optimized_file)
    assert problem is not None and "com.microsoft" in problem


def test_checker_catches_contrib_ops_in_the_standard_domain(tmp_path):
    """onnxruntime writes its fused norm as SimplifiedLayerNormalization in the standard domain."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    scale = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0] * 4)
    node = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-5)
    graph = helper.make_graph([node], "g", [x], [y], [scale])
    path = tmp_path / "norm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert non_standard_ops(onnx.load(str(path))) == []  # standard domain: only the checker knows
    assert "SimplifiedLayerNormalization" in standard_onnx_problem(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_portable_file_runs_unoptimized_and_matches_the_optimized_one_and_torch(family, tiny_artifacts, tiny_model):
    folder = tiny_artifacts(family)
    manifest = load_manifest(folder)
    fp32 = manifest.variant("fp32")
    plain = _session(folder / fp32.file)  # what a runtime without onnxruntime's rewrites computes
    optimized = _session(folder / fp32.optimized_file, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    part = _torch_part(tiny_model, family)
    for ids, mask in _padded_batches():
        feed = {"input_ids": ids, "attention_mask": mask}
        got, fast = plain.run(None, feed)[0], optimized.run(None, feed)[0]
        with torch.no_grad():
            ref = part(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        real = mask.astype(bool)
        assert got.shape == fast.shape == (*ids.shape, manifest.hidden_size)
        assert np.abs(got - fast)[real].max() <= 1e-5 and np.abs(got - ref)[real].max() <= 1e-5
    # Parity of each file is in the manifest: on real text and at the export's two shapes.
    for parity in (fp32.parity, fp32.optimized_parity):
        assert parity["mean_cosine"] > 0.999999 and parity["max_abs_diff"] <= 1e-5
    assert len(manifest.parity["fp32_vs_torch"]) == len(manifest.parity["fp32_optimized_vs_torch"]) == 2


def _bits_at_padding(output: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The float32 bit patterns at padding positions (+0.0 is all zero bits; -0.0 is not)."""
    return np.ascontiguousarray(output[~mask.astype(bool)]).view(np.uint32)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_positions_are_exact_zeros_in_every_file(family, int8_artifacts, tiny_model):
    folder = int8_artifacts(family)
    manifest = load_manifest(folder)
    files = {f for v in manifest.variants for f in (v.file, v.optimized_file) if f}
    assert {"device.onnx", "device.ort.onnx", "device.int8.arm64.onnx", "device.int8.avx2.onnx"} <= files
    for name in sorted(files):
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            session = _session(folder / name, level)
            for ids, mask in _padded_batches():
                out = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
                nonzero = int(np.count_nonzero(_bits_at_padding(out, mask)))
                assert nonzero == 0, (name, level)
                assert out[mask.astype(bool)].all(axis=-1).any(), name  # real positions are not zeroed
    # The PyTorch part too: the server's copy of blocks 0..k-1 gives what a device sends.
    ids, mask = _padded_batches()[0]
    with torch.no_grad():
        ref = _torch_part(tiny_model, family)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert not _bits_at_padding(ref, mask).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_abs_max_is_the_fp32_part_on_the_calibration_text(family, tiny_artifacts, tiny_model):
    from sftool.exporters.quantize import calibration_batch, torch_reference

    folder = tiny_artifacts(family)
    manifest = load_manifest(folder)
    recorded = manifest.activation_abs_max
    assert isinstance(recorded, float) and recorded > 0
    ids, mask = calibration_batch(folder, None, manifest.max_seq_len, manifest.pad_token_id)
    reference = torch_reference(_torch_part(tiny_model, family), (ids, mask))
    assert recorded == pytest.approx(float(np.abs(reference[mask.astype(bool)]).max()), rel=1e-6)
    assert recorded == manifest.variant("fp32").parity["ref_max_abs"]  # the same text and part


def test_device_prefers_the_optimized_file_and_runs_the_standard_one_on_request(int8_artifacts):
    folder = int8_artifacts("llama")
    manifest = load_manifest(folder, verify_files=False)
    fp32 = choose_variant(manifest, "fp32", "arm64")
    fast, plain = DeviceModel(folder, manifest, fp32), DeviceModel(folder, manifest, fp32, runtime="onnx")
    assert (fast.file, plain.file) == ("device.ort.onnx", "device.onnx")
    assert "(device.ort.onnx)" in fast.description and "(device.onnx)" in plain.description
    ids = np.array([[5, 9, 12, 7, 3], [8, 4, 0, 0, 0]], np.int64)
    mask = (np.arange(5) < np.array([[5], [2]])).astype(np.int64)
    np.testing.assert_allclose(plain.forward(ids, mask), fast.forward(ids, mask), atol=1e-5)

    # int8 needs onnxruntime (and says so); held to standard ONNX, auto falls back to fp32.
    int8 = [v for v in manifest.variants if v.precision == "int8"]
    assert int8 and all(v.runtime == "onnxruntime" and v.optimized_file is None for v in int8)
    assert choose_variant(manifest, "auto", "arm64").precision == "int8"
    assert choose_variant(manifest, "auto", "arm64", runtime="onnx").file == "device.onnx"
    with pytest.raises(SftoolError, match="needs onnxruntime"):
        choose_variant(manifest, "int8", "arm64", runtime="onnx")
    with pytest.raises(SftoolError, match="needs onnxruntime"):
        DeviceModel(folder, manifest, int8[0], runtime="onnx")


def test_manifests_without_the_new_fields_still_load(tiny_artifacts, tmp_path):
    """A manifest from before the standard file: its device.onnx was onnxruntime's, alone."""
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(tiny_artifacts("gpt2"), copy)
    data = json.loads((copy / "manifest.json").read_text())
    data.pop("activation_abs_max")
    for variant in data["variants"]:
        for key in ("runtime", "optimized_file", "optimized_parity"):
            variant.pop(key)
    (copy / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(copy)
    fp32 = manifest.variant("fp32")
    assert manifest.activation_abs_max is None and fp32.runtime == "onnxruntime" and fp32.optimized_file is None
    assert DeviceModel(copy, manifest, fp32).file == "device.onnx"
    with pytest.raises(SftoolError, match="needs onnxruntime"):
        choose_variant(manifest, "fp32", "arm64", runtime="onnx")

    data["variants"][0]["precision_bits"] = 32
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SftoolError, match="newer sftool"):
        load_manifest(copy)
