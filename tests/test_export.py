"""`sftool export`: ONNX + manifest + tokenizer, parity against PyTorch, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cli_helpers import one_line_error, run_cli
from conftest import FAMILIES, SPLIT
from sftool.runtime.manifest import load_manifest, sha256_file


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_a_verified_artifacts_folder(family, tiny_artifacts, tiny_model):
    import transformers
    from sftool.exporters.families import adapter_for
    from sftool.exporters.partition import DevicePart

    folder = tiny_artifacts(family)
    manifest = load_manifest(folder)  # re-hashes every file
    assert manifest.family == family and manifest.split == SPLIT and manifest.num_layers == 4
    assert set(manifest.files) >= {"device.onnx", "device.ort.onnx", "tokenizer.json"}
    for rel, info in manifest.files.items():
        assert sha256_file(folder / rel) == info["sha256"]
    onnx.checker.check_model(onnx.load(str(folder / "device.onnx")), full_check=True)  # standard ONNX
    nodes = onnx.load(str(folder / manifest.variant("fp32").optimized_file)).graph.node
    ops = {(n.domain or "ai.onnx", n.op_type) for n in nodes}
    if family == "llama":
        from sftool.exporters.contrib_ops import EMITTED_ATTRIBUTES

        # The onnxruntime file holds its fused kernels (it is for onnxruntime, not onnx.checker):
        # attention + rotary in one node per block, the RMS norms fused, no softmax left over.
        assert ("com.microsoft", "GroupQueryAttention") in ops and ("ai.onnx", "SimplifiedLayerNormalization") in ops
        assert not any(op in ("Softmax", "Sin", "Cos") for _, op in ops), ops
        # Only the attributes sftool set: the defaults the saving onnxruntime adds break older builds.
        for node in (n for n in nodes if n.op_type == "GroupQueryAttention"):
            assert {a.name for a in node.attribute} <= EMITTED_ATTRIBUTES[("com.microsoft", "GroupQueryAttention")]
        # Token-wise work skips padding: the real tokens are found once (NonZero) and packed.
        assert sum(n.op_type == "NonZero" for n in nodes) == 1
    for key in ("fp32_vs_torch", "fp32_optimized_vs_torch"):  # device.onnx, device.ort.onnx
        parity = manifest.parity[key]
        assert len(parity) == 2 and all(p["max_abs_diff"] <= 1e-5 for p in parity.values())

    # Independently of the exporter's own check: dynamic batch and sequence axes, padded rows.
    model = transformers.AutoModel.from_pretrained(tiny_model(family)).eval()
    part = DevicePart(adapter_for(family), model, SPLIT).eval()
    for name in ("device.onnx", "device.ort.onnx"):
        session = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        for b, t in ((1, 3), (5, 19)):
            ids = np.random.default_rng(b).integers(3, 60, (b, t))
            mask = np.ones((b, t), np.int64)
            mask[-1, t // 2 :] = 0
            got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            with torch.no_grad():
                ref = part(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            assert got.shape == (b, t, manifest.hidden_size)
            assert np.abs(got - ref)[mask.astype(bool)].max() <= 1e-5, name
            assert not got[~mask.astype(bool)].any(), name  # zeros where the padding was
        # A row without any real token (not what a device sends) runs, as zeros.
        mask[0] = 0
        assert not session.run(None, {"input_ids": ids, "attention_mask": mask})[0][0].any(), name


def test_export_cli_several_splits(tiny_model, tmp_path):
    out = tmp_path / "multi"
    result = run_cli("export", "--model", tiny_model("llama"), "--split", "1,3", "--out", out, "--exporter", "torchscript")
    assert result.exit_code == 0, result.output
    for k in (1, 3):
        assert load_manifest(out / f"split-{k}").split == k
    assert "max abs diff" in result.output


def test_export_split_out_of_range(tiny_model, tmp_path):
    err = one_line_error(run_cli("export", "--model", tiny_model("gpt2"), "--split", "4", "--out", tmp_path / "a"))
    assert "out of range" in err and not (tmp_path / "a").exists()


def test_export_missing_model_folder(tmp_path):
    err = one_line_error(run_cli("export", "--model", tmp_path / "nope", "--split", "2", "--out", tmp_path / "a"))
    assert "does not exist" in err


def test_export_unknown_family(tmp_path):
    import transformers

    folder = tmp_path / "bert"
    transformers.BertModel(
        transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(folder)
    err = one_line_error(run_cli("export", "--model", folder, "--split", "1", "--out", tmp_path / "a"))
    assert "not supported" in err


def test_export_unwritable_output(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = one_line_error(run_cli("export", "--model", tiny_model("gpt2"), "--split", "2", "--out", blocker / "sub"))
    assert "cannot create" in err or "not writable" in err


def test_export_refuses_a_foreign_non_empty_folder(tiny_model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    err = one_line_error(run_cli("export", "--model", tiny_model("gpt2"), "--split", "2", "--out", tmp_path / "mine"))
    assert "not empty" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_bad_split_syntax(tiny_model, tmp_path):
    err = one_line_error(run_cli("export", "--model", tiny_model("gpt2"), "--split", "six", "--out", tmp_path / "a"))
    assert "--split" in err


def test_corrupt_artifacts_are_detected(tiny_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts("gpt2"), copy)
    data = json.loads((copy / "manifest.json").read_text())
    from sftool.errors import SftoolError

    original = (copy / "device.onnx").read_bytes()
    with open(copy / "device.onnx", "ab") as fh:  # a partial or padded copy: caught by its size
        fh.write(b"\0")
    with pytest.raises(SftoolError, match="bytes"):
        load_manifest(copy)
    flipped = bytearray(original)  # same size, one byte changed: caught by its sha256
    flipped[len(flipped) // 2] ^= 0xFF
    (copy / "device.onnx").write_bytes(bytes(flipped))
    with pytest.raises(SftoolError, match="sha256"):
        load_manifest(copy)
    assert data["format_version"] == 1
