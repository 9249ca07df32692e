"""`sftool bench device`: what a SplitFrozen device costs, side by side with the alternatives.

One run, the same batches of real text (SST-2 train rows, tokenized and length-bucketed exactly as
``sftool device`` does), through each path:

- ``ort_int8``   the SplitFrozen device: the exported int8 model for this CPU (onnxruntime, no torch)
- ``ort_fp32``   the exported fp32 model (onnxruntime)
- ``torch_forward``     PyTorch eager forward of the same device layers (no grad)
- ``splitlora_device``  a SplitLoRA device: the same layers with LoRA (peft, r=8), forward + backward
                        from the server's gradient + AdamW step
- ``fedlora_device``    a FedLoRA device: the whole model with LoRA (r=8) and a classification head,
                        forward + loss + backward + AdamW step

Times are medians over interleaved repetitions (each repetition runs every path over all batches,
in a rotating order), reported per sample. Bytes on the wire are counted from the encoded BATCH
messages: fp16 activations of length-bucketed batches (what the device sends) vs fp32 activations
padded to the maximum length (classic split learning). Peak memory is the peak resident set size
(Linux VmHWM) of a fresh subprocess per path that loads only what that path needs (the onnxruntime
paths do not import torch) and runs every batch twice.

Each repetition also measures the int8 floor (``bench_ceiling``): the device part's weight GEMMs at
this CPU's int8 GEMM peak. Every target is reported as measured and with the floor in place of the
int8 time, which says whether any int8 device part could meet it on this machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sftool.errors import SftoolError
from sftool.runtime.files import cpu_name, proc_status_mb

DEFAULT_MODEL = "smollm2-135m-instruct"
PATHS = ("ort_int8", "ort_fp32", "torch_forward", "splitlora_device", "fedlora_device")
LABELS = {
    "ort_int8": "SplitFrozen device (ORT int8)",
    "ort_fp32": "ORT fp32",
    "torch_forward": "torch eager forward",
    "splitlora_device": "SplitLoRA device (LoRA fwd+bwd)",
    "fedlora_device": "FedLoRA device (whole model, LoRA)",
}
#: The targets of issue 9: (name, how it is computed, direction, threshold, shown as "x" or "%").
TARGETS = (
    ("int8 speed-up over torch eager forward", "torch_forward / ort_int8", ">=", 4.0, "x"),
    ("device time below a SplitLoRA device", "1 - ort_int8 / splitlora_device", ">=", 0.95, "%"),
    ("device time below a FedLoRA device", "1 - ort_int8 / fedlora_device", ">=", 0.98, "%"),
    ("wire bytes vs fp32 padded to max length", "fp16 bucketed / fp32 padded", "<=", 0.35, "%"),
)


@dataclass
class DeviceBenchConfig:
    #: Model source (default: the export's source with --artifacts, else SmolLM2-135M-Instruct).
    model: str | None = None
    split: int = 6
    #: An existing export of ``model`` at ``split`` (with int8 variants); exported into a temp folder if None.
    artifacts: Path | None = None
    samples: int = 64
    batch_size: int = 8
    repeats: int = 5
    #: Threads for onnxruntime and torch alike (default: every core).
    threads: int | None = None
    #: Texts are truncated to this many tokens; the fp32 wire baseline pads every row to it.
    max_len: int = 128
    lora_rank: int = 8
    #: Epochs of the training run in the per-run view: with ``sftool serve --cache-activations`` a
    #: SplitFrozen device computes each sample once, while SplitLoRA and FedLoRA devices train every epoch.
    epochs: int = 3
    memory: bool = True
    #: A tiny random Llama and bundled sentences instead of SmolLM2 + SST-2 (a quick look).
    tiny: bool = False
    paths: Sequence[str] = field(default_factory=lambda: list(PATHS))


# -- data ------------------------------------------------------------------------------------------
def _texts(cfg: DeviceBenchConfig) -> tuple[list[str], list[int], str]:
    if cfg.tiny:
        from sftool.exporters.quantize import CALIBRATION_TEXTS

        texts = [CALIBRATION_TEXTS[i % len(CALIBRATION_TEXTS)] for i in range(cfg.samples)]
        return texts, [i % 2 for i in range(cfg.samples)], "bundled English sentences"
    from sftool.datasets import load_split

    rows = load_split("sst2").train[: cfg.samples]
    if len(rows) < cfg.samples:
        raise SftoolError(f"SST-2 has only {len(rows)} training rows; use --samples {len(rows)} or fewer")
    return [r["text"] for r in rows], [int(r["label"]) for r in rows], f"SST-2 train rows 0..{cfg.samples - 1}"


def make_batches(artifacts: Path, texts: list[str], labels: list[int], batch_size: int, max_len: int):
    """Tokenized, length-bucketed batches exactly as ``sftool device`` forms them."""
    from sftool.runtime.local_data import TextEncoder, bucketed_batches
    from sftool.runtime.manifest import load_manifest

    manifest = load_manifest(artifacts, verify_files=False)
    encoder = TextEncoder(Path(artifacts) / manifest.tokenizer_file, min(max_len, manifest.max_seq_len), manifest.pad_token_id)
    batches = []
    for idx in bucketed_batches(encoder.lengths(texts), batch_size):
        ids, mask = encoder.encode([texts[i] for i in idx])
        batches.append((ids, mask, np.array([labels[i] for i in idx], dtype=np.int64)))
    return batches


def _save_batches(batches, path: Path) -> None:
    arrays = {}
    for i, (ids, mask, labels) in enumerate(batches):
        arrays[f"ids{i}"], arrays[f"mask{i}"], arrays[f"labels{i}"] = ids, mask, labels
    np.savez(path, n=len(batches), **arrays)


def _load_batches(path: Path):
    data = np.load(path)
    return [(data[f"ids{i}"], data[f"mask{i}"], data[f"labels{i}"]) for i in range(int(data["n"]))]


# -- the paths -------------------------------------------------------------------------------------
def build_path(name: str, artifacts: Path, source: str, threads: int | None, lora_rank: int = 8) -> tuple[Callable, str]:
    """A callable running one batch ``(ids, mask, labels)`` through ``name``, and what it runs."""
    from sftool.runtime.manifest import load_manifest

    manifest = load_manifest(artifacts, verify_files=False)
    if name in ("ort_int8", "ort_fp32"):
        from sftool.runtime.onnx_model import DeviceModel, SessionSettings, choose_variant

        variant = choose_variant(manifest, "int8" if name == "ort_int8" else "fp32")
        model = DeviceModel(artifacts, manifest, variant, settings=SessionSettings(threads=threads))
        return (lambda ids, mask, labels: model.forward(ids, mask)), f"{variant.label} {variant.file}"

    import torch
    from sftool.exporters.families import adapter_for
    from sftool.exporters.model_source import load_model
    from sftool.exporters.partition import DevicePart
    from sftool.server.split_model import LoraSettings

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    split = manifest.split

    lora = LoraSettings(rank=lora_rank, alpha=2 * lora_rank, dropout=0.0)  # the server's LoRA, without dropout

    if name == "torch_forward":
        base = load_model(source, head="base")
        adapter = adapter_for(base.config.model_type)
        part = DevicePart(adapter, adapter.backbone(base), split).eval()

        def forward(ids, mask, labels):
            with torch.no_grad():
                return part(torch.from_numpy(ids), torch.from_numpy(mask))

        return forward, f"blocks 0..{split - 1}, fp32, no grad"
    if name in ("splitlora_device", "fedlora_device"):
        # The methods' own device steps (sftool.training.methods), with the training's optimizer settings.
        from sftool.server.split_model import SplitModelSpec, SplitServerModel
        from sftool.server.trainer import OptimSettings
        from sftool.training.sources import TokenBatch

        model = SplitServerModel(SplitModelSpec(source, 2, [split], manifest.pad_token_id, lora,
                                                lora_layers=range(manifest.num_layers)))
        n_device = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)

        def tokens(ids, mask, labels) -> TokenBatch:
            return TokenBatch("bench", 0, torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels),
                              list(range(len(labels))))

        if name == "splitlora_device":
            from sftool.training.methods.splitlora import SplitLoRA

            method = SplitLoRA(model, split, OptimSettings(), {"bench": 1}, aggregate_every=0)
            generator = torch.Generator().manual_seed(0)

            def train_step(ids, mask, labels):
                batch = tokens(ids, mask, labels)
                hidden, cut = method.device_forward(batch)
                # The gradient the server sends back for these activations (its values do not change the cost).
                method.device_backward(batch, hidden, torch.randn(cut.shape, generator=generator) * 1e-3)

            n = sum(p.numel() for p in method.devices.params)
            return train_step, f"blocks 0..{split - 1} + LoRA r={lora_rank} ({n:,} trainable), SplitLoRA.device_forward/backward"
        from sftool.training.methods.fedlora import FedLoRA

        method = FedLoRA(model, OptimSettings(), {"bench": 1}, local_steps=10**9)
        return (lambda ids, mask, labels: method.step(tokens(ids, mask, labels))), (
            f"all {manifest.num_layers} blocks + LoRA r={lora_rank} + head ({n_device:,} LoRA parameters), FedLoRA.step")
    raise SftoolError(f"unknown bench path {name!r} (have: {', '.join(PATHS)})")


# -- wire bytes ------------------------------------------------------------------------------------
def wire_bytes(batches, hidden_states: list[np.ndarray], max_len: int) -> dict[str, float]:
    """Bytes per sample of the encoded BATCH messages, four ways (the device sends fp16 bucketed)."""
    from sftool.runtime.device_app import prepare_hidden
    from sftool.runtime.protocol import MsgType, batch_arrays, encode

    totals = {"fp16_bucketed": 0, "fp32_bucketed": 0, "fp16_padded": 0, "fp32_padded": 0}
    samples = 0
    for (_ids, mask, labels), hidden in zip(batches, hidden_states):
        b, _, h = hidden.shape
        samples += b
        sample_ids = np.arange(b, dtype=np.int64)
        padded_mask = np.zeros((b, max_len), np.int64)
        padded_mask[:, : mask.shape[1]] = mask
        for key, arr, m in (
            ("fp16_bucketed", prepare_hidden(hidden, "fp16"), mask),
            ("fp32_bucketed", hidden.astype(np.float32), mask),
            ("fp16_padded", np.zeros((b, max_len, h), np.float16), padded_mask),
            ("fp32_padded", np.zeros((b, max_len, h), np.float32), padded_mask),
        ):
            frames = encode(MsgType.BATCH, "device-000", batch_arrays(arr, m, labels, sample_ids), seq=0, epoch=0)
            totals[key] += sum(len(f) for f in frames)
    per = {k: v / samples for k, v in totals.items()}
    per["ratio_fp16_bucketed_vs_fp32_padded"] = per["fp16_bucketed"] / per["fp32_padded"]
    return per


# -- memory (fresh subprocess per path) ------------------------------------------------------------
def _memory_child(argv: Sequence[str]) -> None:
    """``python -m sftool.bench_device --memory PATH ARTIFACTS SOURCE BATCHES.npz THREADS RANK``."""
    name, artifacts, source, batches_file, threads, rank = argv
    if name not in ("ort_int8", "ort_fp32"):
        import peft  # noqa: F401
        import torch  # noqa: F401  (its import is part of the path's footprint, counted in the baseline)
        import transformers  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
    baseline = proc_status_mb("VmRSS")
    batches = _load_batches(Path(batches_file))
    run, _ = build_path(name, Path(artifacts), source, int(threads) or None, int(rank))
    for _ in range(2):
        for ids, mask, labels in batches:
            run(ids, mask, labels)
    print(json.dumps({"peak_rss_mb": proc_status_mb("VmHWM"), "baseline_rss_mb": baseline, "torch_loaded": "torch" in sys.modules}))


def measure_memory(name: str, artifacts: Path, source: str, batches_file: Path, threads: int | None, rank: int) -> dict:
    cmd = [sys.executable, "-m", "sftool.bench_device", "--memory", name, str(artifacts), source, str(batches_file),
           str(threads or 0), str(rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SftoolError(f"memory measurement of {name} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the benchmark ---------------------------------------------------------------------------------
def _tiny_model(folder: Path) -> Path:
    """A tiny random Llama with a word-level tokenizer over the bundled sentences."""
    from sftool.synthetic import tiny_model

    return tiny_model(folder)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run_device_bench(cfg: DeviceBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns the results (also what ``--out`` writes as JSON)."""
    from sftool.runtime.manifest import load_manifest

    unknown = [p for p in cfg.paths if p not in PATHS]
    if unknown:
        raise SftoolError(f"unknown path(s) {', '.join(unknown)} (have: {', '.join(PATHS)})")
    if "ort_int8" not in cfg.paths:
        raise SftoolError("the ort_int8 path (the SplitFrozen device) is the reference; keep it in --paths")
    threads = cfg.threads or os.cpu_count() or 1
    loadavg_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if loadavg_start and loadavg_start[0] + threads > (os.cpu_count() or 1) + 0.5:
        # Oversubscribed cores make torch's OpenMP threads spin against each other (measured: 13x slower
        # torch forward with 2 threads on 2 busy cores, vs 1.7x for onnxruntime): the ratios would lie.
        log(f"warning: load average {loadavg_start[0]:.1f} on {os.cpu_count()} cores with {threads} threads: "
            "timings will be contended; use an idle machine or fewer --threads")
    with tempfile.TemporaryDirectory(prefix="sftool-bench-device-") as tmp:
        tmp = Path(tmp)
        source = cfg.model or DEFAULT_MODEL
        if cfg.artifacts and cfg.model is None and (Path(cfg.artifacts) / "manifest.json").is_file():
            source = load_manifest(cfg.artifacts, verify_files=False).source
        if cfg.tiny:
            source = str(_tiny_model(tmp / "tiny-model"))
            split = 2
        else:
            split = cfg.split
        artifacts = Path(cfg.artifacts) if cfg.artifacts else None
        if artifacts is None or not (artifacts / "manifest.json").is_file():
            from sftool.exporters.onnx_export import ExportOptions, export_device

            artifacts = artifacts or tmp / "artifacts"
            log(f"exporting {source} split {split} (fp32 + int8) to {artifacts}")
            export_device(ExportOptions(source, split, artifacts, max_seq_len=cfg.max_len, int8_targets=["auto"]),
                          log=lambda m: log(f"  {m}"))
        manifest = load_manifest(artifacts)
        texts, labels, data_name = _texts(cfg)
        batches = make_batches(artifacts, texts, labels, cfg.batch_size, cfg.max_len)
        samples = sum(len(b[2]) for b in batches)
        tokens = int(sum(b[1].sum() for b in batches))
        max_len = min(cfg.max_len, manifest.max_seq_len)
        log(f"{samples} samples ({data_name}), {len(batches)} bucketed batches of <= {cfg.batch_size}, "
            f"{tokens / samples:.1f} tokens per sample; {threads} threads; {cfg.repeats} interleaved repetitions")

        runners, described = {}, {}
        for name in cfg.paths:
            log(f"loading {name}")
            runners[name], described[name] = build_path(name, artifacts, source, threads, cfg.lora_rank)
            for ids, mask, lab in batches[:1]:  # warm-up
                runners[name](ids, mask, lab)
        floor_probe = _int8_floor(artifacts, manifest, batches, threads, tmp, log)
        times: dict[str, list[float]] = {name: [] for name in cfg.paths}
        order = list(cfg.paths)
        for rep in range(cfg.repeats):
            for name in order[rep % len(order):] + order[: rep % len(order)]:
                started = time.perf_counter()
                for ids, mask, lab in batches:
                    runners[name](ids, mask, lab)
                times[name].append((time.perf_counter() - started) / samples * 1000)
            floor_probe.repetition()
            log(f"repetition {rep + 1}/{cfg.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in cfg.paths) + " ms/sample")

        floor = floor_probe.result(tokens / samples)
        hidden_states = [runners["ort_int8"](ids, mask, lab) for ids, mask, lab in batches]
        wire = wire_bytes(batches, hidden_states, max_len)
        del runners

        memory = {}
        if cfg.memory:
            batches_file = tmp / "batches.npz"
            _save_batches(batches, batches_file)
            for name in cfg.paths:
                log(f"peak memory of {name} (fresh subprocess)")
                memory[name] = measure_memory(name, artifacts, source, batches_file, threads, cfg.lora_rank)

    median = {name: statistics.median(v) for name, v in times.items()}
    results = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}, "paths": list(cfg.paths)},
        "model": {"source": "tiny random llama" if cfg.tiny else source, "family": manifest.family,
                  "split": manifest.split, "num_layers": manifest.num_layers, "hidden_size": manifest.hidden_size},
        "data": {"name": data_name, "samples": samples, "batches": len(batches), "tokens_per_sample": tokens / samples,
                 "max_len": max_len},
        "machine": _machine(threads, loadavg_start),
        "paths": {
            name: {
                "label": LABELS[name],
                "runs": described[name],
                "ms_per_sample": median[name],
                "ms_per_sample_all": times[name],
                "vs_ort_int8": _ratio(median[name], median["ort_int8"]),
                **({k: memory[name][k] for k in ("peak_rss_mb", "baseline_rss_mb", "torch_loaded")} if name in memory else {}),
            }
            for name in cfg.paths
        },
        "wire_bytes_per_sample": wire,
        "memory_method": "peak RSS (VmHWM) of a fresh subprocess per path; baseline = RSS after its imports",
    }
    results["int8_floor"] = floor
    results["targets"] = _targets(median, wire, floor["floor_ms_per_sample"])
    results["training_run"] = training_run_view(median, cfg.epochs)
    return results


def _int8_floor(artifacts: Path, manifest, batches, threads: int, tmp: Path, log: Callable[[str], None]):
    from sftool.bench_ceiling import Int8Floor
    from sftool.exporters.quantize import RECIPES
    from sftool.runtime.onnx_model import choose_variant

    variant = choose_variant(manifest, "int8")
    log(f"int8 floor: an int8 GEMM probe ({variant.target} recipe) and a profiled {variant.file} in each repetition")
    return Int8Floor(Path(artifacts) / variant.file, RECIPES[variant.target].reduce_range, threads, tmp, batches)


def training_run_view(median: dict[str, float], epochs: int) -> dict:
    """Device compute per training sample over a whole ``epochs``-epoch run (not a target of issue 9,
    which is per pass): a frozen device's activations never change, so with the server's activation
    cache it computes each sample once; a SplitLoRA or FedLoRA device updates its weights and must
    compute every epoch again."""
    epochs = max(1, int(epochs))
    per_run = {"ort_int8 (cached activations)": median["ort_int8"], "ort_int8 (no cache)": median["ort_int8"] * epochs}
    for name in ("splitlora_device", "fedlora_device"):
        if name in median:
            per_run[name] = median[name] * epochs
    below = {
        f"1 - ort_int8 cached / {name}": 1 - _ratio(per_run["ort_int8 (cached activations)"], per_run[name])
        for name in ("splitlora_device", "fedlora_device")
        if name in per_run
    }
    return {"epochs": epochs, "ms_per_training_sample": per_run, "device_time_below": below}


def _machine(threads: int, loadavg_start) -> dict:
    import onnxruntime
    from sftool.runtime.onnx_model import cpu_target

    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(), "cpu_target": cpu_target(),
            "cpus": os.cpu_count(), "threads": threads, "onnxruntime": onnxruntime.__version__,
            "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _target_values(median: dict[str, float], wire: dict[str, float], int8_ms: float) -> dict[str, float]:
    return {
        "torch_forward / ort_int8": _ratio(median.get("torch_forward", float("nan")), int8_ms),
        "1 - ort_int8 / splitlora_device": 1 - _ratio(int8_ms, median.get("splitlora_device", float("nan"))),
        "1 - ort_int8 / fedlora_device": 1 - _ratio(int8_ms, median.get("fedlora_device", float("nan"))),
        "fp16 bucketed / fp32 padded": wire["ratio_fp16_bucketed_vs_fp32_padded"],
    }


def _meets(value: float, op: str, threshold: float) -> bool | None:
    return (value >= threshold if op == ">=" else value <= threshold) if value == value else None


def _targets(median: dict[str, float], wire: dict[str, float], floor_ms: float) -> list[dict]:
    """Each target as measured, and at the int8 floor: ``ort_int8`` replaced by ``floor_ms`` (no int8
    device part is faster on this CPU, see bench_ceiling), so ``reachable`` False means out of reach."""
    values = _target_values(median, wire, median["ort_int8"])
    at_floor = _target_values(median, wire, floor_ms)
    out = []
    for name, formula, op, threshold, unit in TARGETS:
        out.append({"target": name, "formula": formula, "value": values[formula], "op": op, "threshold": threshold, "unit": unit,
                    "met": _meets(values[formula], op, threshold), "at_int8_floor": at_floor[formula],
                    "reachable": _meets(at_floor[formula], op, threshold)})
    return out


def print_device_bench(results: dict, console=None) -> None:
    """Rich tables: per-path time, ratio and memory; wire bytes; the targets."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    d, m = results["data"], results["model"]
    table = Table(title=(f"sftool bench device: {m['family']} split {m['split']}/{m['num_layers']}, {d['samples']} samples "
                         f"({d['tokens_per_sample']:.1f} tokens avg), {results['machine']['threads']} threads"))
    table.add_column("path")
    table.add_column("ms / sample", justify="right")
    table.add_column("x SplitFrozen int8", justify="right")
    table.add_column("peak RSS MB", justify="right")
    for p in results["paths"].values():
        table.add_row(p["label"], f"{p['ms_per_sample']:.2f}", f"{p['vs_ort_int8']:.2f}",
                      f"{p['peak_rss_mb']:.0f}" if "peak_rss_mb" in p else "-")
    console.print(table)
    for name, p in results["paths"].items():
        console.print(f"  {name}: {p['runs']}", highlight=False)
    w = results["wire_bytes_per_sample"]
    wire = Table(title=f"bytes per sample on the wire (max length {d['max_len']})")
    wire.add_column("activations")
    wire.add_column("bytes / sample", justify="right")
    wire.add_column("vs fp32 padded", justify="right")
    for key, label in (("fp16_bucketed", "fp16, length-bucketed (sent)"), ("fp32_bucketed", "fp32, length-bucketed"),
                       ("fp16_padded", "fp16, padded to max length"), ("fp32_padded", "fp32, padded to max length")):
        wire.add_row(label, f"{w[key]:,.0f}", f"{w[key] / w['fp32_padded']:.1%}")
    console.print(wire)
    targets = Table(title="targets")
    targets.add_column("target")
    targets.add_column("measured", justify="right")
    targets.add_column("needed", justify="right")
    targets.add_column("met")
    targets.add_column("at the int8 floor", justify="right")
    targets.add_column("reachable")
    yes_no = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}
    for t in results["targets"]:
        show = (lambda v: f"{v:.1%}") if t["unit"] == "%" else (lambda v: f"{v:.2f}x")
        targets.add_row(t["target"], show(t["value"]), f"{t['op']} {show(t['threshold'])}", yes_no[t["met"]],
                        show(t["at_int8_floor"]), yes_no[t["reachable"]])
    console.print(targets)
    f = results["int8_floor"]
    console.print(
        f"  int8 floor: {f['weight_macs_per_token'] / 1e6:.1f} M weight MACs per token x {d['tokens_per_sample']:.1f} tokens "
        f"at this CPU's int8 GEMM peak ({f['int8_gemm_peak_gmacs']:.0f} GMAC/s, measured) = {f['floor_ms_per_sample']:.2f} ms "
        f"per sample, with nothing else costing time. The int8 file spends {f['int8_gemm_ms_per_sample']:.2f} ms of "
        f"{f['int8_kernels_ms_per_sample']:.2f} ms (kernel time) in GEMMs, at {f['int8_gemm_gmacs']:.0f} GMAC/s "
        f"({f['int8_gemm_gmacs'] / f['int8_gemm_peak_gmacs']:.0%} of the peak).",
        highlight=False,
    )
    run = results.get("training_run")
    if run:
        view = Table(title=f"device compute per sample over a whole {run['epochs']}-epoch run (per run, not per pass)")
        view.add_column("device")
        view.add_column("ms / sample", justify="right")
        for name, ms in run["ms_per_training_sample"].items():
            view.add_row(name, f"{ms:.2f}")
        for name, value in run["device_time_below"].items():
            view.add_row(name, f"{value:.1%}")
        console.print(view)




if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--memory":
        _memory_child(sys.argv[2:])
    else:
        sys.exit("usage: python -m sftool.bench_device --memory PATH ARTIFACTS SOURCE BATCHES THREADS RANK (internal)")
