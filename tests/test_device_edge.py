"""The edge device: which model variant it runs, its onnxruntime settings, and the lean wire
(fp16 activations that the trainer receives exactly; length buckets that keep every sample once)."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from int8_fixtures import int8_artifacts  # noqa: F401  (fixture)
from sftool.errors import SftoolError
from sftool.runtime.local_data import bucketed_batches, iter_epochs
from sftool.runtime.manifest import load_manifest
from sftool.runtime.onnx_model import OPTIMIZATION_LEVELS, DeviceModel, SessionSettings, choose_variant, cpu_target
from tiny_models import synthetic_rows, write_jsonl

# /proc/cpuinfo flags of real CPUs (abridged to what matters).
SKYLAKE_X = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl"}  # AVX-512 without VNNI
ICELAKE = SKYLAKE_X | {"avx512_vnni", "avx512vbmi"}
HASWELL = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize(
    "machine, flags, target",
    [
        ("aarch64", set(), "arm64"),  # Raspberry Pi, Jetson (Linux)
        ("arm64", set(), "arm64"),  # Apple silicon (macOS)
        ("x86_64", ICELAKE, "avx512_vnni"),
        ("x86_64", HASWELL | {"avx512vnni"}, "avx512_vnni"),  # the flag's other spelling
        ("x86_64", HASWELL, "avx2"),
        # AVX-512 without VNNI still multiplies with vpmaddubsw (int16 saturation): the 7-bit avx2 model.
        ("x86_64", SKYLAKE_X, "avx2"),
        ("AMD64", HASWELL, "avx2"),
    ],
)
def test_precision_auto_picks_the_int8_model_for_the_cpu(machine, flags, target, int8_artifacts):
    manifest = load_manifest(int8_artifacts("llama"), verify_files=False)
    assert cpu_target(machine, flags) == target
    chosen = choose_variant(manifest, "auto", cpu_target(machine, flags))
    assert (chosen.precision, chosen.target, chosen.file) == ("int8", target, f"device.int8.{target}.onnx")
    assert choose_variant(manifest, "int8", target).file == chosen.file
    assert choose_variant(manifest, "fp32", target).file == "device.onnx"


def test_precision_auto_without_int8_runs_fp32_and_int8_is_refused(tiny_artifacts):
    manifest = load_manifest(tiny_artifacts("gpt2"), verify_files=False)  # exported without int8
    assert choose_variant(manifest, "auto", "arm64").file == "device.onnx"
    with pytest.raises(SftoolError, match="no int8 model"):
        choose_variant(manifest, "int8", "arm64")
    with pytest.raises(SftoolError, match="precision must be one of"):
        choose_variant(manifest, "fp16", "arm64")


def test_session_settings_are_device_options(int8_artifacts):
    folder = int8_artifacts("llama")
    manifest = load_manifest(folder, verify_files=False)
    variant = manifest.variant("int8", "arm64")
    ids = np.array([[5, 9, 12, 7, 3], [8, 4, 0, 0, 0]], np.int64)
    mask = (np.arange(5) < np.array([[5], [2]])).astype(np.int64)
    reference = DeviceModel(folder, manifest, variant).forward(ids, mask)
    for level in OPTIMIZATION_LEVELS:
        settings = SessionSettings(threads=1, optimization=level, memory_arena=False, spin=False)
        model = DeviceModel(folder, manifest, variant, settings=settings)
        assert "int8/arm64 (device.int8.arm64.onnx)" in model.description and "1 threads" in model.description
        np.testing.assert_allclose(model.forward(ids, mask)[mask.astype(bool)], reference[mask.astype(bool)], atol=1e-5)
    assert DeviceModel(folder, manifest, variant, threads=2).settings.threads == 2
    with pytest.raises(SftoolError, match="optimization must be one of"):
        DeviceModel(folder, manifest, variant, settings=SessionSettings(optimization="max"))


def test_device_model_refuses_left_padded_batches(tiny_artifacts):
    """The saved attention is causal-only, exact for right padding; a left-padded batch would silently
    give wrong activations, so the device refuses it in one line."""
    folder = tiny_artifacts("llama")
    manifest = load_manifest(folder)
    model = DeviceModel(folder, manifest, choose_variant(manifest, "fp32"))
    ids = np.full((2, 6), 5, dtype=np.int64)
    right = np.array([[1] * 6, [1] * 4 + [0] * 2])
    assert model.forward(ids, right).shape == (2, 6, manifest.hidden_size)
    with pytest.raises(SftoolError, match="right-padded"):
        model.forward(ids, right[:, ::-1].copy())


def test_prepare_hidden_fp16_and_fp32_fallback():
    from sftool.runtime.device_app import prepare_hidden

    hidden = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    assert prepare_hidden(hidden, "fp16").dtype == np.float16
    assert prepare_hidden(hidden, "fp32").dtype == np.float32
    hidden[0, 0, 0] = 70000.0  # beyond fp16's range: would arrive as Inf
    assert prepare_hidden(hidden, "fp16").dtype == np.float32


@pytest.mark.parametrize("window", [1, 3, 8])
def test_bucketing_keeps_every_sample_exactly_once(window):
    lengths = np.random.default_rng(window).integers(1, 60, size=203).tolist()
    plan = bucketed_batches(lengths, 8, window)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 8 for b in plan)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    plain = sum(len(b) * max(lengths[i] for i in b) for b in (list(range(s, min(s + 8, 203))) for s in range(0, 203, 8)))
    assert padded <= plain
    epochs = list(iter_epochs(plan, 3, skip=[1]))
    assert Counter(e for e, _ in epochs) == {0: len(plan), 2: len(plan)}


def test_fp16_wire_reaches_the_trainer_exactly_and_buckets_keep_samples_and_labels(
    int8_artifacts, tiny_model, free_port, tmp_path, monkeypatch
):
    """A real device (int8 ONNX, fp16 wire, length buckets) streams to a real in-process server over
    loopback; what the trainer's steps see is compared with what the device put on the wire."""
    import sftool.runtime.device_app as device_app
    from sftool.runtime.device_app import DeviceOptions, run_device
    from sftool.server.serve import ServeOptions, serve
    from sftool.server.trainer import Trainer

    rows = synthetic_rows(44, seed=7)  # 4..10 words each: buckets matter
    data = write_jsonl(rows, tmp_path / "shard.jsonl")
    label_of = {r["id"]: r["label"] for r in rows}
    epochs = 2

    sent = defaultdict(list)  # sample id -> wire rows (fp16 [T, H], real length)
    sent_batches = []
    original_arrays = device_app.batch_arrays

    def record_wire(hidden, mask, labels, sample_ids):
        sent_batches.append((hidden.dtype, mask.sum(1).tolist(), mask.shape[1]))
        for i, sid in enumerate(sample_ids.tolist()):
            sent[sid].append((hidden[i].copy(), int(mask[i].sum()), int(labels[i])))
        return original_arrays(hidden, mask, labels, sample_ids)

    trained = []  # (sample id, epoch, label, hidden [n, H] as the trainer got it)
    original_step = Trainer.step

    def record_step(self, batch, *args, **kwargs):
        for i, s in enumerate(batch.samples):
            n = int(batch.attention_mask[i].sum())
            trained.append((s.sample_id, s.epoch, int(batch.labels[i]), batch.hidden[i, :n].detach().clone()))
        return original_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(device_app, "batch_arrays", record_wire)
    monkeypatch.setattr(Trainer, "step", record_step)

    artifacts = int8_artifacts("llama")
    endpoint = f"tcp://127.0.0.1:{free_port}"
    summary = {}
    server = threading.Thread(
        target=lambda: summary.update(
            serve(
                ServeOptions(source=str(tiny_model("llama")), artifacts=[artifacts], bind=endpoint, out=tmp_path / "run",
                             devices=1, batch_size=8, mix_capacity=16, threads=1, checkpoint_every=0),
                log_line=lambda m: None,
            )
        ),
        daemon=True,
    )
    server.start()
    report = run_device(
        DeviceOptions(artifacts=artifacts, endpoint=endpoint, data=data, device_id="edge", batch_size=8,
                      epochs=epochs, precision="int8", wire_dtype="fp16", threads=1, bucket_window=8)
    )
    server.join(120)
    assert not server.is_alive()
    assert report.samples == len(rows) * epochs and report.variant.startswith("int8/")
    assert summary["samples_trained"] == len(rows) * epochs
    assert summary["devices"]["edge"]["precision"] == report.variant

    # The wire: fp16, each batch trimmed to its longest row and made of similar lengths.
    assert all(dtype == np.float16 for dtype, _, _ in sent_batches)
    assert all(width == max(lengths) for _, lengths, width in sent_batches)
    from sftool.runtime.local_data import TextEncoder

    lengths = TextEncoder(artifacts / "tokenizer.json", 64, 0).lengths([r["text"] for r in rows])
    in_file_order = sum(len(lengths[s : s + 8]) * max(lengths[s : s + 8]) for s in range(0, len(rows), 8))
    bucketed = sum(len(lens) * width for _, lens, width in sent_batches) / epochs
    assert bucketed < in_file_order, "length buckets send fewer padded positions than file-order batches"
    assert Counter(len(v) for v in sent.values()) == {epochs: len(rows)}

    # The trainer: every sample exactly once per epoch, with its own label, and fp32 values that are
    # exactly the fp16 values the device sent (the only loss is the device's fp32 -> fp16 rounding).
    assert Counter((sid, epoch) for sid, epoch, _, _ in trained) == {(r["id"], e): 1 for r in rows for e in range(epochs)}
    for sid, epoch, label, hidden in trained:
        assert label == label_of[sid]
        wire, n, wire_label = sent[sid][epoch]
        assert wire_label == label and hidden.shape[0] == n
        assert hidden.dtype == torch.float32
        assert torch.equal(hidden, torch.from_numpy(wire[:n].astype(np.float32)))
