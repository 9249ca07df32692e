"""The int8 floor of a device part on this CPU, for `sftool bench device`.

A frozen device's forward pass cannot do less than its weight GEMMs: every real token goes through
every projection of blocks 0..k-1 once (the exported graph skips padding). And no int8 kernel on this
CPU runs those GEMMs faster than onnxruntime's own int8 GEMM at its best, measured here on a large
matrix with the same quantization recipe. So

    floor (ms per sample) = weight MACs per token x real tokens per sample / int8 GEMM peak

bounds every int8 export of these layers on this CPU from below, with zero cost for attention, norms,
activations and the session. Set against the other paths' measured times, it says which targets no
int8 device part can reach on this machine, whatever is done outside the GEMMs. A profile of the real
int8 file shows how much of its time is GEMM and how close that GEMM is to the peak.
"""

from __future__ import annotations

import collections
import json
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

#: Node types that multiply activations by a constant weight matrix (fp32, int8 and fused forms).
GEMM_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"})
#: The probe's GEMM (tokens x in x out): larger than any device layer's, so no per-call overhead hides the peak.
PROBE_SHAPE = (256, 1024, 1024)


def weight_macs_per_token(model_path: Path) -> int:
    """Multiply-accumulates per token of every GEMM with a constant 2-D weight in an ONNX file.

    Activation x activation products (attention scores) have no constant weight and are not counted:
    at device sequence lengths they are a small fraction, and leaving them out keeps the floor a bound.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in GEMM_OPS and len(node.input) > 1:
            dims = weights.get(node.input[1], ())
            if len(dims) == 2:
                total += int(dims[0]) * int(dims[1])
    return total


def int8_gemm_peak_gmacs(reduce_range: bool, threads: int | None, repeats: int = 5) -> float:
    """This CPU's int8 GEMM rate in GMAC/s: a ``PROBE_SHAPE`` MatMul quantized and optimized exactly as the
    export quantizes a device part (``quantize._quantize_one``), run by onnxruntime; best of ``repeats``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sftool.exporters.quantize import Recipe, _quantize_one
    from sftool.runtime.onnx_model import SessionSettings, open_session

    tokens, k, n = PROBE_SHAPE
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "int8_gemm_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])], [weight],
    )
    with tempfile.TemporaryDirectory(prefix="sftool-gemm-probe-") as tmp:
        source, quantized = Path(tmp) / "probe.onnx", Path(tmp) / "probe.int8.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(source))
        _quantize_one(source, quantized, Recipe(reduce_range, "probe"), "extended")
        session = open_session(quantized, SessionSettings(threads=threads))
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    session.run(None, {"x": x})
    calls = max(3, int(1e9 // (tokens * k * n)))  # about 1 GMAC per timing
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            session.run(None, {"x": x})
        best = min(best, (time.perf_counter() - started) / calls)
    return tokens * k * n / best / 1e9


def gemm_profile(model_path: Path, batches: Iterable, threads: int | None) -> dict[str, float]:
    """Kernel time per sample (ms) of the file's GEMM nodes and of all its nodes, from onnxruntime's
    profiler over one pass of ``batches`` (after a warm-up pass)."""
    import onnxruntime as ort
    from sftool.runtime.onnx_model import SessionSettings

    batches = list(batches)
    samples = sum(len(ids) for ids, _, _ in batches)
    with tempfile.TemporaryDirectory(prefix="sftool-profile-") as tmp:
        options = SessionSettings(threads=threads).session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for _ in range(2):  # a warm-up pass, then the measured one; both are profiled
            for ids, mask, _ in batches:
                session.run(None, {"input_ids": ids, "attention_mask": mask})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    measured_from = runs[len(batches)]  # the first run of the second pass
    kernel_us: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= measured_from:
            kernel_us[event["args"]["op_name"]] += event["dur"]
    gemm = sum(us for op, us in kernel_us.items() if op in GEMM_OPS)
    return {"gemm_ms_per_sample": gemm / 1000 / samples, "kernels_ms_per_sample": sum(kernel_us.values()) / 1000 / samples}


def int8_floor(macs_per_token: int, tokens_per_sample: float, peak_gmacs: float, profile: dict[str, float]) -> dict:
    """The floor and how the real int8 file compares with it (see the module docstring)."""
    macs_per_sample = macs_per_token * tokens_per_sample
    gemm_ms = profile["gemm_ms_per_sample"]
    return {
        "weight_macs_per_token": macs_per_token,
        "macs_per_sample": macs_per_sample,
        "int8_gemm_peak_gmacs": peak_gmacs,
        "probe_shape": list(PROBE_SHAPE),
        "floor_ms_per_sample": macs_per_sample / peak_gmacs / 1e6,
        "int8_gemm_ms_per_sample": gemm_ms,
        "int8_kernels_ms_per_sample": profile["kernels_ms_per_sample"],
        "int8_gemm_gmacs": macs_per_sample / gemm_ms / 1e6 if gemm_ms else float("nan"),
    }
