"""`sftool bench server`: the server's costs measured side by side in one run, printed as ratios.

(a) decomposed backward (activations without grad, frozen weights) vs a naive backward that
    also computes the gradient towards the device (input requires grad, as SplitLoRA must) and
    vs the full graph (every weight requires grad): time per step and peak memory;
(b) the server's training throughput through the whole receive -> validate -> queue -> mix ->
    train path vs a bare PyTorch loop over the same batches on the same layers;
(c) pipelined vs sequential schedule: wall time of a run with 3 real device processes;
(d) block activations stored vs recomputed in the backward (``--recompute``): time per step and
    peak memory at a long-row batch.

In (a) and (d) every variant runs in a fresh subprocess per repetition, variants alternating: it
reports its step times (the median is taken) and its peak memory (Linux VmHWM), which in one process
would blur, since freed memory stays in the allocator.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sftool.runtime.files import free_port, proc_status_mb

BACKWARD_MODES = ("decomposed", "input_grad", "full_graph")


@dataclass
class BenchConfig:
    model: str  # model source
    artifacts: Path  # device export (for the split and the tokenizer)
    batch_size: int = 8
    seq_len: int = 64
    steps: int = 20
    repeats: int = 5
    devices: int = 3
    device_rows: int = 48
    threads: int | None = None


# -- helpers shared by the parts ---------------------------------------------------------------
def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _server_model(cfg: BenchConfig, recompute: bool = False, dropout: float = 0.0):
    from sftool.runtime.manifest import load_manifest
    from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel

    manifest = load_manifest(cfg.artifacts, verify_files=False)
    spec = SplitModelSpec(cfg.model, 2, [manifest.split], manifest.pad_token_id, LoraSettings(dropout=dropout),
                          recompute=recompute)
    return SplitServerModel(spec), manifest


def _batches(cfg: BenchConfig, hidden_size: int, n: int, seed: int = 0):
    """Activation batches of the shape a device sends: [B, T, H] with right padding."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lengths = rng.integers(cfg.seq_len // 2, cfg.seq_len + 1, size=cfg.batch_size)
        mask = (np.arange(cfg.seq_len)[None, :] < lengths[:, None]).astype(np.uint8)
        hidden = (rng.standard_normal((cfg.batch_size, cfg.seq_len, hidden_size)) * 0.5).astype(np.float16)
        labels = rng.integers(0, 2, size=cfg.batch_size)
        out.append((hidden, mask, labels, np.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size)))
    return out


def _train_batch(hidden, mask, labels):
    import torch
    from sftool.server.mixing import TrainBatch

    return TrainBatch(
        torch.from_numpy(hidden.astype(np.float32)), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(labels), []
    )


# -- (a) backward modes ------------------------------------------------------------------------
def backward_step(model, mode: str) -> Callable[[object], None]:
    """One training step of ``model`` in the given backward mode (optimizer step excluded)."""
    import torch.nn.functional as F

    if mode == "full_graph":
        for p in model.parameters():
            p.requires_grad_(True)

    def step(batch) -> None:
        hidden = batch.hidden.clone().requires_grad_(mode != "decomposed")
        loss = F.cross_entropy(model(hidden, batch.attention_mask), batch.labels)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return step


#: Variants of (a): backward mode, recompute, LoRA dropout.
BACKWARD_VARIANTS = {mode: (mode, False, 0.0) for mode in BACKWARD_MODES}
#: Variants of (d): the default recipe's LoRA dropout, activations stored or recomputed.
RECOMPUTE_DROPOUT = 0.05
RECOMPUTE_VARIANTS = {
    "stored": ("decomposed", False, RECOMPUTE_DROPOUT),
    "recompute (glibc default)": ("decomposed", "heap", RECOMPUTE_DROPOUT),
    "recompute": ("decomposed", True, RECOMPUTE_DROPOUT),  # as `sftool serve --recompute`: freed memory returned
}


def measure_variant(cfg: BenchConfig, mode: str, recompute: bool | str = False, dropout: float = 0.0) -> dict:
    """Step times and peak RSS of training steps in ``mode``, in this process: run it in a fresh
    subprocess, since freed memory stays in the allocator and would blur the next variant's peak.
    ``recompute``: False, True (as ``sftool serve --recompute``, which also has glibc return freed
    memory), or "heap" (recomputed blocks, glibc's default heap)."""
    import torch
    from sftool.server.accelerator import return_freed_memory

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if recompute is True:
        return_freed_memory()
    model, manifest = _server_model(cfg, bool(recompute), dropout)
    model.train()
    batches = [_train_batch(*b[:3]) for b in _batches(cfg, manifest.hidden_size, 3)]
    step = backward_step(model, mode)
    step(batches[0])  # allocator warm-up
    _reset_peak()
    baseline = proc_status_mb("VmHWM")
    times = []
    for b in batches:
        torch.manual_seed(0)
        started = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - started)
    peak = proc_status_mb("VmHWM")
    return {"mode": mode, "step_s": times, "peak_rss_mb": peak, "step_extra_mb": peak - baseline}


def _run_variant(cfg: BenchConfig, mode: str, recompute: bool | str, dropout: float) -> dict:
    code = (
        "import json,sys; from pathlib import Path; from sftool.bench_server import BenchConfig, measure_variant;"
        "cfg=BenchConfig(**json.loads(sys.argv[1])); cfg.artifacts=Path(cfg.artifacts);"
        f"print(json.dumps(measure_variant(cfg, {mode!r}, {recompute!r}, {dropout!r})))"
    )
    arg = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()})
    out = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _side_by_side(cfg: BenchConfig, variants: dict[str, tuple[str, bool | str, float]], baseline: str) -> dict:
    """Median step time and peak memory of every variant (backward mode, recompute, dropout), each in
    a fresh subprocess per repetition, variants alternating so machine noise hits all alike; with
    ratios to ``baseline``."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    memory: dict[str, dict] = {}
    for _ in range(max(1, cfg.repeats // 3)):
        for name, (mode, recompute, dropout) in variants.items():
            r = _run_variant(cfg, mode, recompute, dropout)
            times[name] += r["step_s"]
            if name not in memory or r["peak_rss_mb"] > memory[name]["peak_rss_mb"]:
                memory[name] = r
    base_t = statistics.median(times[baseline])
    base_m = memory[baseline]["step_extra_mb"]
    return {
        name: {
            "median_step_s": statistics.median(times[name]),
            "time_ratio": statistics.median(times[name]) / base_t,
            "peak_rss_mb": memory[name]["peak_rss_mb"],
            "step_extra_mb": memory[name]["step_extra_mb"],
            "memory_ratio": memory[name]["step_extra_mb"] / base_m if base_m > 0 else float("nan"),
        }
        for name in variants
    }


def bench_backward(cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    log("(a) decomposed vs naive backward")
    return _side_by_side(cfg, BACKWARD_VARIANTS, "decomposed")


def bench_recompute(cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    log(f"(d) stored vs recomputed block activations at batch {cfg.batch_size} x {cfg.seq_len} tokens")
    rows = _side_by_side(cfg, RECOMPUTE_VARIANTS, "stored")
    return {**rows, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lora_dropout": RECOMPUTE_DROPOUT,
            "target_peak_mb": 3000, "target_time_ratio": 1.4}


# -- (b) full server path vs bare loop ---------------------------------------------------------
def bench_server_path(cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    """Same batches, same model, same optimizer: the real server path vs a bare loop, interleaved."""
    import torch
    from sftool.runtime.device_client import ClientConfig, DeviceClient, OutgoingBatch
    from sftool.runtime.manifest import manifest_sha256
    from sftool.runtime.protocol import MsgType, batch_arrays, encode
    from sftool.server.serve import ServeOptions, serve
    from sftool.server.split_model import LoraSettings
    from sftool.server.trainer import OptimSettings, Trainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log("(b) full receive/validate/queue path vs a bare PyTorch loop")
    _, manifest = _server_model(cfg)
    raw = _batches(cfg, manifest.hidden_size, cfg.steps, seed=1)
    sha = manifest_sha256(cfg.artifacts)

    def bare() -> float:
        model, _ = _server_model(cfg)
        trainer = Trainer(model, OptimSettings())
        torch.manual_seed(0)
        started = time.perf_counter()
        for hidden, mask, labels, _ in raw:
            trainer.step(_train_batch(hidden, mask, labels))
        return time.perf_counter() - started

    class Plan:
        def seqs(self):
            return list(range(len(raw)))

        def make(self, seq):
            frames = encode(MsgType.BATCH, "bench", batch_arrays(*raw[seq]), seq=seq, epoch=0)
            return OutgoingBatch(seq, cfg.batch_size, frames)

    def through_server() -> float:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        with tempfile.TemporaryDirectory() as out:
            opts = ServeOptions(
                source=cfg.model, artifacts=[cfg.artifacts], bind=endpoint, out=Path(out), devices=1,
                batch_size=cfg.batch_size, mix_capacity=cfg.batch_size, mixing="fifo", window=8, queue_size=8,
                lora=LoraSettings(dropout=0.0), optim=OptimSettings(), checkpoint_every=0,
            )
            result: dict = {}
            thread = threading.Thread(target=lambda: result.update(serve(opts, log_line=lambda m: None)))
            thread.start()
            client = DeviceClient(ClientConfig(endpoint, "bench", sha, manifest.split, "fp16", hello_timeout_s=120))
            client.connect()  # returns once the server is up and listening
            client.stream(Plan())
            client.close()
            thread.join()
            # From the first batch received to the last step: the server's own cost per run.
            return result["wall_s"] - result.get("eval_compute_s", 0.0)

    bare_t, server_t = [], []
    for _ in range(max(1, cfg.repeats // 2)):
        bare_t.append(bare())
        server_t.append(through_server())
    b, s = statistics.median(bare_t), statistics.median(server_t)
    return {"bare_loop_s": b, "server_path_s": s, "overhead": s / b - 1, "steps": cfg.steps, "target_overhead": 0.05}


# -- (c) pipelined vs sequential ------------------------------------------------------------------
def bench_schedules(cfg: BenchConfig, data_files: list[Path], log: Callable[[str], None], extra_device_args=()) -> dict:
    """Wall time of the same run (3 device processes) under both schedules, alternated."""
    log("(c) pipelined vs sequential schedule with real device processes")
    sftool = [sys.executable, "-m", "sftool.cli"]
    walls: dict[str, list[float]] = {"pipelined": [], "sequential": []}
    for _ in range(max(1, cfg.repeats // 3)):
        for schedule in walls:
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            with tempfile.TemporaryDirectory() as out:
                env = {**os.environ}
                server = subprocess.Popen(
                    [*sftool, "serve", "--model", cfg.model, "--artifacts", str(cfg.artifacts), "--bind", endpoint,
                     "--out", out, "--devices", str(len(data_files)), "--schedule", schedule,
                     "--batch-size", str(cfg.batch_size), "--mix-capacity", str(cfg.batch_size * 4),
                     "--checkpoint-every", "0"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                )
                devices = [
                    subprocess.Popen(
                        [*sftool, "device", "--artifacts", str(cfg.artifacts), "--connect", endpoint, "--data", str(f),
                         "--device-id", f"d{i}", "--batch-size", str(cfg.batch_size), "--threads", "1",
                         "--server-timeout", "120", *extra_device_args],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                    )
                    for i, f in enumerate(data_files)
                ]
                for proc in devices + [server]:
                    _, err = proc.communicate(timeout=3600)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{proc.args[3]} failed: {err[-2000:]}")
                summary = json.loads((Path(out) / "summary.json").read_text())
                walls[schedule].append(summary["wall_s"])
    p, s = statistics.median(walls["pipelined"]), statistics.median(walls["sequential"])
    return {"pipelined_s": p, "sequential_s": s, "pipelined_vs_sequential": p / s, "runs": walls}


def run_server_bench(cfg: BenchConfig, data_files: list[Path], parts: str = "abcd", log: Callable[[str], None] = print) -> dict:
    """Run the selected parts and return their figures (also what the CLI prints and writes)."""
    results: dict = {"config": {k: str(v) for k, v in cfg.__dict__.items()}}
    if "a" in parts:
        results["backward"] = bench_backward(cfg, log)
    if "b" in parts:
        results["server_path"] = bench_server_path(cfg, log)
    if "c" in parts:
        results["schedules"] = bench_schedules(cfg, data_files, log)
    if "d" in parts:
        results["recompute"] = bench_recompute(cfg, log)
    return results


def print_server_bench(results: dict, console) -> None:
    from rich.table import Table

    if "backward" in results:
        t = Table(title="(a) backward: decomposed vs naive (same batch, interleaved medians)")
        for col in ("mode", "step s", "time ratio", "peak RSS MB", "step extra MB", "memory ratio"):
            t.add_column(col, justify="right")
        for mode, r in results["backward"].items():
            t.add_row(mode, f"{r['median_step_s']:.4f}", f"{r['time_ratio']:.2f}x", f"{r['peak_rss_mb']:.0f}",
                      f"{r['step_extra_mb']:.1f}", f"{r['memory_ratio']:.2f}x")
        console.print(t)
    if "server_path" in results:
        r = results["server_path"]
        t = Table(title="(b) full server path vs bare PyTorch loop (same batches and steps)")
        for col in ("bare loop s", "server path s", "overhead", "target"):
            t.add_column(col, justify="right")
        t.add_row(f"{r['bare_loop_s']:.2f}", f"{r['server_path_s']:.2f}", f"{r['overhead']:+.1%}", f"<= {r['target_overhead']:.0%}")
        console.print(t)
    if "schedules" in results:
        r = results["schedules"]
        t = Table(title="(c) pipelined vs sequential schedule (3 device processes, wall time medians)")
        for col in ("pipelined s", "sequential s", "pipelined / sequential"):
            t.add_column(col, justify="right")
        t.add_row(f"{r['pipelined_s']:.2f}", f"{r['sequential_s']:.2f}", f"{r['pipelined_vs_sequential']:.2f}x")
        console.print(t)
    if "recompute" in results:
        r = results["recompute"]
        t = Table(title=f"(d) activations stored vs recomputed (--recompute), batch {r['batch_size']} x {r['seq_len']} "
                        f"tokens, LoRA dropout {r['lora_dropout']}")
        for col in ("activations", "step s", "time ratio", "peak RSS MB", "step extra MB", "target"):
            t.add_column(col, justify="right")
        for name, target in (("stored", ""), ("recompute (glibc default)", ""),
                             ("recompute", f"< {r['target_peak_mb']} MB, <= {r['target_time_ratio']}x")):
            v = r[name]
            t.add_row(name, f"{v['median_step_s']:.3f}", f"{v['time_ratio']:.2f}x", f"{v['peak_rss_mb']:.0f}",
                      f"{v['step_extra_mb']:.0f}", target)
        console.print(t)
