"""The device runtime as it runs on an ARM64 board: an aarch64 CPython under QEMU user-mode emulation.

A tiny model is exported here (x86) with the arm64 int8 variant, saved graph-optimized; the emulated
`sftool device --precision int8` streams to a native `sftool serve` over loopback, and the server
trains on every batch. A second emulated process checks that both saved files (fp32 and int8/arm64)
compute on ARM64 what they compute here (within a few ulp: LayerNorm/Softmax kernels differ).

Emulation is ~300x slower than native, hence the tiny sizes and one thread. Set SFTOOL_ARM64=0 to skip.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from arm64_support import arm64_python, arm64_unavailable_reason
from cli_helpers import spawn
from conftest import SPLIT
from sftool.exporters.onnx_export import ExportOptions, export_device
from sftool.runtime.manifest import load_manifest
from sftool.runtime.onnx_model import DeviceModel
from tiny_models import synthetic_rows, write_jsonl

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ROWS, BATCH = 24, 8

# Runs inside the emulated python: each saved variant on a fixed batch -> one .npz.
PARITY_SCRIPT = """
import platform, sys
import numpy as np
from sftool.runtime.manifest import load_manifest
from sftool.runtime.onnx_model import DeviceModel, cpu_target
folder, out = sys.argv[1], sys.argv[2]
manifest = load_manifest(folder)
batch = np.load(out + ".in.npz")
ids, mask = batch["ids"], batch["mask"]
outputs = {}
for v in manifest.variants:
    outputs[v.precision] = DeviceModel(folder, manifest, v, threads=1).forward(ids, mask)
np.savez(out, **outputs)
print(platform.machine(), cpu_target())
"""


@pytest.fixture(scope="module")
def arm64_cmd():
    started = time.perf_counter()
    cmd = arm64_python(PROJECT_ROOT)
    if cmd is None:
        pytest.skip(arm64_unavailable_reason() or "ARM64 emulation unavailable")
    print(f"arm64 environment ready in {time.perf_counter() - started:.1f}s")
    return cmd


@pytest.fixture(scope="module")
def arm64_artifacts(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("arm64") / "artifacts"
    export_device(ExportOptions(str(tiny_model("llama")), SPLIT, out, max_seq_len=32, int8_targets=["arm64"]), log=lambda m: None)
    return out


def test_arm64_device_runs_int8_and_the_server_trains_on_every_batch(arm64_cmd, arm64_artifacts, tiny_model, free_port, tmp_path):
    started = time.perf_counter()
    rows = synthetic_rows(ROWS, seed=11)
    data = write_jsonl(rows, tmp_path / "pi.jsonl")
    endpoint = f"tcp://127.0.0.1:{free_port}"
    run = tmp_path / "run"
    server = spawn(
        "serve", "--model", tiny_model("llama"), "--artifacts", arm64_artifacts, "--bind", endpoint, "--out", run,
        "--devices", "1", "--batch-size", str(BATCH), "--mix-capacity", str(2 * BATCH), "--threads", "1",
    )
    device = subprocess.Popen(
        [*arm64_cmd, "-m", "sftool.cli", "device", "--artifacts", str(arm64_artifacts), "--connect", endpoint,
         "--data", str(data), "--device-id", "pi5", "--precision", "int8", "--batch-size", str(BATCH), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        device_out, _ = device.communicate(timeout=120)
        server_out, _ = server.communicate(timeout=60)
    finally:
        for proc in (device, server):
            if proc.poll() is None:
                proc.kill()
    assert device.returncode == 0, f"emulated device exited {device.returncode}:\n{device_out}"
    assert server.returncode == 0, server_out
    assert "int8/arm64 on arm64" in device_out, device_out  # the variant the device reports running
    print(device_out.strip().splitlines()[-2:])
    assert f"{ROWS} samples in {ROWS // BATCH} batches acknowledged" in device_out, device_out

    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "all devices finished"
    assert summary["samples_trained"] == ROWS
    pi = summary["devices"]["pi5"]
    assert pi["precision"] == "int8/arm64" and pi["wire_dtype"] in ("fp16", "float16")
    assert pi["samples_received"] == ROWS and pi["rejected"] == 0 and pi["state"] == "finished"
    print(f"ARM64 device -> native server: {time.perf_counter() - started:.1f}s")


def test_saved_optimized_models_compute_the_same_on_arm64(arm64_cmd, arm64_artifacts, tmp_path):
    started = time.perf_counter()
    manifest = load_manifest(arm64_artifacts)
    ids = np.array([[5, 9, 12, 7, 3, 22, 40], [8, 4, 17, 0, 0, 0, 0]], np.int64)
    mask = (np.arange(7) < np.array([[7], [3]])).astype(np.int64)
    out = tmp_path / "arm64_out"
    np.savez(str(out) + ".in.npz", ids=ids, mask=mask)
    proc = subprocess.run([*arm64_cmd, "-c", PARITY_SCRIPT, str(arm64_artifacts), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["aarch64", "arm64"]
    arm = np.load(str(out) + ".npz")
    real = mask.astype(bool)
    for v in manifest.variants:
        x86 = DeviceModel(arm64_artifacts, manifest, v, threads=1).forward(ids, mask)[real]
        got = arm[v.precision][real]
        scale = np.abs(x86).max()
        cosine = (x86 * got).sum(-1) / np.linalg.norm(x86, axis=-1) / np.linalg.norm(got, axis=-1)
        print(f"{v.file}: ARM64 vs x86 max abs diff {np.abs(got - x86).max():.2e} (max |h| {scale:.2f}), min cosine {cosine.min():.8f}")
        assert np.abs(got - x86).max() <= 1e-4 * scale, (v.file, np.abs(got - x86).max())
        assert cosine.min() > 0.99999, (v.file, cosine.min())
    print(f"ARM64 parity of {len(manifest.variants)} saved models: {time.perf_counter() - started:.1f}s")
