"""Where the server trains: bf16 autocast keeps fp32 master weights and tracks the fp32 step; the
CUDA path runs the same step and checkpoint on a GPU when one is present (skipped without)."""

from __future__ import annotations

import random

import pytest
import torch
from sftool.errors import SftoolError
from sftool.server.accelerator import resolve_device, resolve_precision
from sftool.server.checkpoint import TrainingProgress, load_checkpoint, save_checkpoint
from sftool.server.mixing import Sample, collate
from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel
from sftool.server.trainer import OptimSettings, Trainer
from test_server_model import device_batch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def server(path, precision: str = "fp32") -> SplitServerModel:
    return SplitServerModel(SplitModelSpec(str(path), 2, [2], 0, LoraSettings(rank=4, dropout=0.0), precision=precision))


def batch_of(model: SplitServerModel, seed: int = 0, at: torch.device | None = None):
    """Activations as the receiver hands them over: already on the device the model trains on."""
    _, mask, hidden = device_batch(model, seed=seed)
    at = at or model.device
    return collate([Sample(hidden[i].to(at), mask[i].to(at), i % 2, "d", i, 0, 0) for i in range(len(mask))])


def test_bf16_autocast_keeps_fp32_weights_and_tracks_fp32(tiny_model):
    path = tiny_model("llama")
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = server(path, precision)
        trainer = Trainer(model, OptimSettings(lr=1e-2))
        before = [p.detach().clone() for p in model.trainable_parameters()]
        logits = model(batch_of(model).hidden, batch_of(model).attention_mask)
        assert logits.dtype == torch.float32  # the loss and metrics are fp32 in both precisions
        losses[precision] = [trainer.step(batch_of(model, seed=s)).loss for s in range(3)]
        params = model.trainable_parameters()
        assert all(p.dtype == torch.float32 for p in params)  # master weights
        assert any(not torch.equal(a, p) for a, p in zip(before, params))
    # bf16 has an 8-bit mantissa: the same steps, close but not equal.
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_accelerator_and_precision_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(SftoolError, match="--precision"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(SftoolError, match="--accelerator"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(SftoolError, match="no CUDA device"):
            resolve_device("cuda")


@needs_cuda
def test_cuda_step_and_checkpoint_roundtrip(tiny_model, tmp_path):
    device = resolve_device("cuda")
    model = server(tiny_model("llama"), resolve_precision("auto", device))
    batch = batch_of(model, at=device)  # the device part runs on the CPU, as on a device
    model.to(device)
    trainer = Trainer(model, OptimSettings(lr=1e-2))
    assert trainer.step(batch).loss > 0
    assert all(p.device.type == "cuda" for p in model.trainable_parameters())
    rng = random.Random(0)
    folder = save_checkpoint(tmp_path, model, trainer, rng, TrainingProgress(step=1))
    expected = torch.cuda.get_rng_state_all()
    torch.cuda.manual_seed_all(123)
    restored = server(tiny_model("llama")).to(device)
    load_checkpoint(folder, restored, Trainer(restored, OptimSettings(lr=1e-2)), random.Random(1))
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), expected))
    for a, b in zip(restored.trainable_parameters(), model.trainable_parameters()):
        torch.testing.assert_close(a, b)
