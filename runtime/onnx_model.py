"""The frozen device layers as an onnxruntime session, with the variant chosen for this CPU."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sftool.errors import SftoolError
from sftool.runtime.manifest import RUNTIMES, Manifest, Variant

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


@functools.lru_cache(maxsize=1)
def _linux_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_variant(manifest: Manifest, precision: str, target: str | None = None, runtime: str = "onnxruntime") -> Variant:
    """Pick the model to run. ``auto`` prefers int8 for this CPU's target, else fp32.

    On ``runtime="onnx"`` (a runtime other than onnxruntime, or onnxruntime held to standard ops)
    only variants whose ``file`` is standard ONNX qualify: the int8 models need onnxruntime.
    """
    if precision not in PRECISIONS:
        raise SftoolError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if runtime not in RUNTIMES:
        raise SftoolError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    target = target or cpu_target()
    runnable = [v for v in manifest.variants if runtime == "onnxruntime" or v.runtime == "onnx"]
    # This CPU's target first: an int8 model for another target still runs correctly, only maybe slower.
    int8 = sorted((v for v in runnable if v.precision == "int8"), key=lambda v: v.target != target)
    if precision == "auto":
        precision = "int8" if int8 and int8[0].target == target else "fp32"
    chosen = int8 if precision == "int8" else [v for v in runnable if v.precision == "fp32"]
    if not chosen:
        raise _missing(manifest, precision, runtime)
    return chosen[0]


def _missing(manifest: Manifest, precision: str, runtime: str) -> SftoolError:
    """The error for an artifacts folder without a ``precision`` model that ``runtime`` can run."""
    if runtime == "onnx" and any(v.precision == precision for v in manifest.variants):
        return SftoolError(f"the artifacts' {precision} model needs onnxruntime: it is not standard ONNX")
    if precision == "int8":
        return SftoolError("the artifacts hold no int8 model; export with --int8 or use --precision fp32")
    have = ", ".join(v.label for v in manifest.variants)
    return SftoolError(f"no {precision} model in the artifacts (have: {have})")


#: Graph optimizations onnxruntime may apply when a device loads a model. The onnxruntime files are saved
#: already optimized at "extended", so "basic" (the default) only costs start-up; "all" adds this CPU's
#: own layouts. ("disable" runs a file as written: how the export checks the standard-ONNX device.onnx.)
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


@dataclass
class SessionSettings:
    """onnxruntime session options a device may tune (``sftool device`` passes them through)."""

    #: Intra-op threads (None: onnxruntime's default, one per physical core).
    threads: int | None = None
    #: Graph optimizations at load time (see OPTIMIZATION_LEVELS).
    optimization: str = "basic"
    #: The CPU memory arena keeps freed blocks for reuse: faster steady state, but resident memory stays
    #: at the peak of the largest batch. Turn it off on boards with little RAM.
    memory_arena: bool = True
    #: Worker threads spin while waiting for work: lower latency, but they burn CPU between batches
    #: (and while waiting for the server's credit). Off saves power on a battery-powered board.
    spin: bool = True

    def session_options(self):
        import onnxruntime as ort

        if self.optimization not in OPTIMIZATION_LEVELS:
            raise SftoolError(f"onnxruntime optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, not {self.optimization!r}")
        if self.threads is not None and self.threads < 1:
            raise SftoolError("--threads must be >= 1")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        options.enable_cpu_mem_arena = self.memory_arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        return options


def open_session(path: Path, settings: SessionSettings | None = None):
    """An onnxruntime CPU session on ``path`` with a device's session settings (defaults if None)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), (settings or SessionSettings()).session_options(), providers=["CPUExecutionProvider"])


class DeviceModel:
    """Runs the device part (embeddings + blocks 0..k-1) on onnxruntime's CPU provider."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        variant: Variant,
        threads: int | None = None,
        settings: SessionSettings | None = None,
        runtime: str = "onnxruntime",
    ):
        """Open ``variant`` from ``folder``: its onnxruntime-optimized file where it has one, or with
        ``runtime="onnx"`` its standard-ONNX ``file`` (what another ONNX runtime would load)."""
        settings = settings or SessionSettings()
        if threads is not None:
            settings = replace(settings, threads=threads)
        #: The file this model runs (``variant.file`` or ``variant.optimized_file``).
        self.file = variant.file_for(runtime)
        path = Path(folder) / self.file
        try:
            self.session = open_session(path, settings)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise SftoolError(f"onnxruntime cannot load {path}: {exc}") from None
        self.variant = variant
        self.manifest = manifest
        self.settings = settings
        self.output_name = manifest.outputs[0]["name"] if manifest.outputs else "hidden_states"

    @property
    def description(self) -> str:
        """What runs, for logs: e.g. ``int8/arm64 (device.int8.arm64.onnx) on arm64, 4 threads, ort basic``."""
        threads = self.settings.threads or "default"
        return (
            f"{self.variant.label} ({self.file}) on {cpu_target()}, "
            f"{threads} threads, ort {self.settings.optimization}"
        )

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Hidden states after block k-1, float32 [B, T, H]."""
        if self.manifest.padding_side == "right" and attention_mask.shape[1] > 1:
            # Fused exports mask attention by causality alone, which is exact only when no real token
            # follows a padding one (a mask row never rises from 0 back to 1).
            if (np.diff(attention_mask.astype(np.int8), axis=1) > 0).any():
                raise SftoolError("the export expects right-padded batches; this attention mask has padding before real tokens")
        (hidden,) = self.session.run(
            [self.output_name], {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        )
        return hidden
