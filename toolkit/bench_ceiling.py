"""The int8 floor of a device part on this CPU, for `sftool bench device`.

A frozen device's forward pass cannot do less than its weight GEMMs: every real token goes through
every projection of blocks 0..k-1 once (the exported graph skips padding). And onnxruntime's int8
GEMM on this CPU runs at most about as fast as on a large matrix, quantized with the same recipe as
the device part and measured here with the same threads (the device's own GEMMs have come within a
few percent of it, either side). So

    floor (ms per sample) = weight MACs per token x real tokens per sample / int8 GEMM peak

bounds every int8 device part of these layers run by onnxruntime on this CPU from below (to those
few percent), counting nothing for attention, norms, activations or the session. Set against the
other paths' measured times, it says which targets no such device part can reach on this machine,
whatever is done outside the GEMMs. A profile of the real int8 file shows how much of its time is GEMM, and how close that is
to the peak.
"""

from __future__ import annotations

import bisect
import collections
import json
import time
from pathlib import Path

import numpy as np

#: Node types that multiply activations by a constant weight matrix (fp32, int8 and fused forms).
GEMM_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"})
#: The probe's GEMM (tokens x in x out): larger than any device layer's, so no per-call overhead hides the peak.
PROBE_SHAPE = (256, 1024, 1024)


def weight_gemms(model_path: Path) -> dict[str, int]:
    """Node name -> multiply-accumulates per token, for every GEMM with a constant 2-D weight in an ONNX file.

    Activation x activation products (attention scores) have no constant weight and are not counted:
    at device sequence lengths they are a small fraction, and leaving them out keeps the floor a bound.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    gemms = {}
    for node in model.graph.node:
        if node.op_type in GEMM_OPS and len(node.input) > 1:
            dims = weights.get(node.input[1], ())
            if len(dims) == 2:
                gemms[node.name] = int(dims[0]) * int(dims[1])
    return gemms


def weight_macs_per_token(model_path: Path) -> int:
    """Multiply-accumulates per token of all of the file's weight GEMMs (``weight_gemms``)."""
    return sum(weight_gemms(model_path).values())


class Int8Floor:
    """Measures the int8 floor side by side with the bench's repetitions.

    Each :meth:`repetition` times the peak probe once and runs the batches once through a profiled
    session of the int8 file, so a moment of contention on the machine hits one repetition, not the
    result: :meth:`result` keeps the best probe and the repetition with the least GEMM time.
    """

    def __init__(self, model_path: Path, reduce_range: bool, threads: int | None, work_dir: Path, batches: list) -> None:
        import onnxruntime as ort
        from sftool.runtime.onnx_model import SessionSettings

        # The same nodes give the MACs and, by name in the profile, the GEMM time.
        self._gemms = weight_gemms(model_path)
        self._probe, self._probe_input = _peak_probe(reduce_range, threads, Path(work_dir))
        options = SessionSettings(threads=threads).session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work_dir) / "int8-profile")
        self._profiled = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self._batches = batches
        self._passes = 0
        self._run_batches()  # warm-up pass, left out of the result
        self._probe.run(None, {"x": self._probe_input})
        self.peak_gmacs: list[float] = []

    def _run_batches(self) -> None:
        for ids, mask, _ in self._batches:
            self._profiled.run(None, {"input_ids": ids, "attention_mask": mask})
        self._passes += 1

    def repetition(self) -> None:
        """One timing of the peak probe (about 3 GMAC) and one profiled pass over the batches."""
        tokens, k, n = PROBE_SHAPE
        calls = max(3, int(3e9 // (tokens * k * n)))
        self._probe.run(None, {"x": self._probe_input})  # the paths timed before may have evicted its weight
        started = time.perf_counter()
        for _ in range(calls):
            self._probe.run(None, {"x": self._probe_input})
        self.peak_gmacs.append(tokens * k * n * calls / (time.perf_counter() - started) / 1e9)
        self._run_batches()

    def result(self, tokens_per_sample: float) -> dict:
        """The floor and how the int8 file compares with it (see the module docstring); needs at least
        one :meth:`repetition`."""
        events = json.loads(Path(self._profiled.end_profiling()).read_text())
        per_pass = _kernel_us_per_pass(events, len(self._batches), self._passes)[1:]  # drop the warm-up pass
        samples = sum(len(ids) for ids, _, _ in self._batches)
        best = min(per_pass, key=self._gemm_us)
        gemm_ms = self._gemm_us(best) / 1000 / samples
        peak = max(self.peak_gmacs)
        macs_per_token = sum(self._gemms.values())
        macs_per_sample = macs_per_token * tokens_per_sample
        return {
            "weight_macs_per_token": macs_per_token,
            "macs_per_sample": macs_per_sample,
            "int8_gemm_peak_gmacs": peak,
            "int8_gemm_peak_gmacs_all": self.peak_gmacs,
            "probe_shape": list(PROBE_SHAPE),
            "floor_ms_per_sample": macs_per_sample / peak / 1e6,
            "int8_gemm_ms_per_sample": gemm_ms,
            "int8_kernels_ms_per_sample": sum(best.values()) / 1000 / samples,
            "int8_gemm_gmacs": macs_per_sample / gemm_ms / 1e6 if gemm_ms else float("nan"),
        }

    def _gemm_us(self, kernel_us: collections.Counter) -> float:
        return sum(us for node, us in kernel_us.items() if node in self._gemms)


def _peak_probe(reduce_range: bool, threads: int | None, folder: Path):
    """A ``PROBE_SHAPE`` MatMul quantized and optimized exactly as the export quantizes a device part
    (``quantize.quantize_file``), in an onnxruntime session with the device's settings, and its input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sftool.exporters.quantize import Recipe, quantize_file
    from sftool.runtime.onnx_model import SessionSettings, open_session

    tokens, k, n = PROBE_SHAPE
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "int8_gemm_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", n])], [weight],
    )
    source, quantized = folder / "gemm-probe.onnx", folder / "gemm-probe.int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(source))
    quantize_file(source, quantized, Recipe(reduce_range, "probe"), "extended")
    return open_session(quantized, SessionSettings(threads=threads)), rng.standard_normal((tokens, k)).astype(np.float32)


def _kernel_us_per_pass(events: list[dict], runs_per_pass: int, passes: int) -> list[collections.Counter]:
    """Kernel microseconds per node name for each pass, from an onnxruntime profile (one model_run per batch)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    bounds = [starts[i * runs_per_pass] for i in range(passes)] + [float("inf")]
    out = [collections.Counter() for _ in range(passes)]
    suffix = "_kernel_time"
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith(suffix):
            out[max(0, bisect.bisect_right(bounds, event["ts"]) - 1)][event["name"][: -len(suffix)]] += event["dur"]
    return out
