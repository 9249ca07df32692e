"""The frozen device layers as an onnxruntime session, with the variant chosen for this CPU."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from sftool.errors import SftoolError
from sftool.runtime.manifest import Manifest, Variant

PRECISIONS = ("auto", "fp32", "int8")


def cpu_target(machine: str | None = None, cpu_flags: set[str] | None = None) -> str:
    """The int8 target that suits this CPU: ``arm64``, ``avx512_vnni`` or ``avx2``.

    Arguments exist so the choice can be tested for other CPUs; by default they are read from
    this machine (``/proc/cpuinfo`` on Linux).
    """
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if cpu_flags is None:
        cpu_flags = _linux_cpu_flags()
    if "avx512_vnni" in cpu_flags or "avx512vnni" in cpu_flags:
        return "avx512_vnni"
    return "avx2"


def _linux_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_variant(manifest: Manifest, precision: str, target: str | None = None) -> Variant:
    """Pick the model file to run. ``auto`` prefers int8 for this CPU's target, else fp32."""
    if precision not in PRECISIONS:
        raise SftoolError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    target = target or cpu_target()
    if precision == "fp32":
        return manifest.variant("fp32")
    int8 = [v for v in manifest.variants if v.precision == "int8"]
    exact = [v for v in int8 if v.target == target]
    if exact:
        return exact[0]
    if precision == "int8":
        if int8:
            # An int8 model for another target still runs correctly, only maybe slower.
            return int8[0]
        raise SftoolError("the artifacts hold no int8 model; export with --int8 or use --precision fp32")
    return manifest.variant("fp32")


class DeviceModel:
    """Runs the device part (embeddings + blocks 0..k-1) on onnxruntime's CPU provider."""

    def __init__(self, folder: Path, manifest: Manifest, variant: Variant, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # The export is saved already optimized; re-optimizing on a small board only costs start-up.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        path = Path(folder) / variant.file
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise SftoolError(f"onnxruntime cannot load {path}: {exc}") from None
        self.variant = variant
        self.manifest = manifest
        self.output_name = manifest.outputs[0]["name"] if manifest.outputs else "hidden_states"

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Hidden states after block k-1, float32 [B, T, H]."""
        (hidden,) = self.session.run(
            [self.output_name], {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        )
        return hidden
