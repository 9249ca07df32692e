"""`sftool bench time`: total training time with devices slowed to edge speed, measured and modelled.

On loopback, real processes: N ``sftool device --slowdown X`` processes and ``sftool serve`` train
on the same shards twice, once with the default pipelined schedule and once with ``--schedule
sequential``. Each device sleeps (X - 1) times its measured compute after every batch, standing in
for an edge CPU X times slower than this one without taking CPU from the others. The devices load
first and the server starts once they have, so that every device starts streaming when it
listens, together, as in the model. From each run:

- the wall time: the processes' (the devices started to the last process exited: start-up, model
  loading and saving included), the server's (summary ``wall_s``: from listening to the last step)
  and the training span (the first batch's compute on any device to the server's last step, read
  from the device reports and ``metrics.jsonl``, both on this machine's clock);
- the device compute per sample (the device reports' ``compute_s`` / ``samples``);
- the server seconds per training step (the summary's ``train_compute_s`` / ``steps``).

Those measured costs drive the time model (`sftool.timemodel`): one `DeviceTier` per device with
``splitfrozen_s`` = X x its compute per sample, `Costs` with the measured server seconds, links of
unlimited bandwidth and no latency (loopback), unless ``--link-mbps`` / ``--latency-ms`` are given:
those apply to the model only, the real runs stay on loopback. The model's clock runs from the
devices' first compute to the server's last step, so its total is set against the training span.
The runs use ``--mixing fifo`` (the model's FIFO buffer) unless told otherwise. What the model
leaves out shows on runs of a few seconds: process start-up, thread and ZeroMQ hand-offs, and the
receiver thread's 5 ms poll, which delays each ACK of the sequential schedule by ~2.5 ms on average.

SplitLoRA and FedLoRA have no real-process path: the wire protocol has no reply carrying a
gradient or an adapter back to a device. For those two only the model's figure exists, driven by
their device steps measured here on the same token batches (`SplitLoRA.device_forward` +
`device_backward` with a random cut gradient, `FedLoRA.step`: what ``sftool bench device``
times), times X, and by the pipelined run's server cost.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from sftool import timemodel as tm
from sftool.errors import SftoolError
from sftool.runtime.files import atomic_write_text, cpu_name, free_port

DEFAULT_MODEL = "smollm2-135m-instruct"
SCHEDULES = ("pipelined", "sequential")
#: The time model's name of each schedule's timeline.
TIMELINES = {"pipelined": tm.PIPELINED_SPLITFROZEN, "sequential": tm.SEQUENTIAL_SPLIT}
LABELS = {
    tm.PIPELINED_SPLITFROZEN: "SplitFrozen, pipelined",
    tm.SEQUENTIAL_SPLIT: "split learning, sequential",
    tm.SPLITLORA: "SplitLoRA",
    tm.FEDLORA: "FedLoRA",
}
NO_REAL_PATH = ("no real-process run: the wire protocol has no gradient (or adapter) reply path to a device yet, "
                "so only the model's figure exists, driven by the measured device step")


@dataclass
class TimeBenchConfig:
    devices: int = 3
    #: Each device batch takes this many times its measured compute (``sftool device --slowdown``).
    slowdown: float = 10.0
    #: Rows per device (a shard with fewer rows keeps what it has).
    samples: int = 64
    epochs: int = 1
    #: The server's training batch.
    batch_size: int = 16
    device_batch_size: int = 8
    #: Threads of every process (server torch, device onnxruntime) and of the method-step timing.
    threads: int = 1
    #: A tiny random Llama and synthetic rows instead of SmolLM2 + SST-2 (nothing downloaded).
    tiny: bool = False
    dataset: str = "sst2"
    scheme: str = "labels:1"
    model: str = DEFAULT_MODEL
    split: int = 6
    #: Reuse this device export (of ``model`` at ``split``); exported into a temporary folder if None.
    artifacts: Path | None = None
    max_seq_len: int = 128
    lora_rank: int = 8
    #: Rows of the first shard whose SplitLoRA and FedLoRA device steps are timed.
    step_samples: int = 16
    #: Repetitions of those device steps (the median is taken), after one warm-up pass.
    repeats: int = 3
    #: Model-only link between each device and the server (None: unlimited, as on loopback).
    link_mbps: float | None = None
    latency_ms: float = 0.0
    #: The server's mixing policy in the real runs. The model treats the mixing buffer as FIFO; with
    #: ``mix`` the trainer waits for --mix-capacity (256) samples before its first step, so a run of
    #: fewer samples trains only once every device is done and nothing overlaps.
    mixing: str = "fifo"
    seed: int = 0
    #: Give up on a real run (and stop its processes) after this many seconds.
    timeout_s: float = 1800.0
    #: Keep the shards, export, run folders and process logs here (default: a temporary folder).
    work: Path | None = None


def check_config(cfg: TimeBenchConfig) -> None:
    """Refuse settings the runs or the model cannot take, as one-line errors."""
    if min(cfg.devices, cfg.samples, cfg.epochs, cfg.batch_size, cfg.device_batch_size, cfg.threads,
           cfg.step_samples, cfg.repeats) < 1:
        raise SftoolError("--devices, --samples, --epochs, --batch-size, --device-batch-size, --threads, "
                          "--step-samples and --repeats must be >= 1")
    if not (cfg.slowdown >= 1.0 and math.isfinite(cfg.slowdown)):
        raise SftoolError(f"--slowdown must be a number >= 1, not {cfg.slowdown:g}")
    if cfg.mixing not in ("fifo", "mix"):
        raise SftoolError(f"--mixing must be fifo or mix, not {cfg.mixing!r}")
    if cfg.link_mbps is not None and not cfg.link_mbps > 0:
        raise SftoolError("--link-mbps must be > 0")
    if not cfg.latency_ms >= 0:
        raise SftoolError("--latency-ms must be >= 0")


# -- data and export ---------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare_shards(cfg: TimeBenchConfig, folder: Path, log: Callable[[str], None]) -> tuple[list[Path], list[str], str]:
    """One JSONL shard per device (at most ``cfg.samples`` rows each), the label names, what the data is."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.tiny:
        from sftool.synthetic import write_synthetic

        rows = _read_jsonl(write_synthetic(folder / "synthetic.jsonl", cfg.devices * cfg.samples, num_labels=2,
                                           seed=cfg.seed))
        shards = [_write_jsonl(rows[i * cfg.samples:(i + 1) * cfg.samples], folder / f"device-{i}.jsonl")
                  for i in range(cfg.devices)]
        return shards, ["0", "1"], f"synthetic rows (2 labels), {cfg.samples} per device"
    from sftool.cli_data import make_split

    make_split(cfg.dataset, cfg.devices, cfg.scheme, cfg.seed, folder)
    shards = []
    for i in range(cfg.devices):
        path = folder / f"device-{i}.jsonl"
        rows = _read_jsonl(path)
        if len(rows) < cfg.samples:
            log(f"device-{i}: its {cfg.scheme} shard holds {len(rows)} rows, fewer than --samples {cfg.samples}")
        shards.append(_write_jsonl(rows[:cfg.samples], path))
    names = json.loads((folder / "label_map.json").read_text(encoding="utf-8"))["label_names"]
    return shards, [str(n) for n in names], f"{cfg.dataset} train rows, {cfg.scheme} over {cfg.devices} devices"


def prepare_export(cfg: TimeBenchConfig, folder: Path, log: Callable[[str], None]) -> tuple[str, Path]:
    """(model source for ``sftool serve``, device export): the tiny random model, or ``cfg.model`` at ``cfg.split``."""
    from sftool.exporters.onnx_export import ExportOptions, export_device

    if cfg.tiny:
        from sftool.synthetic import tiny_model

        source, split, max_len = str(tiny_model(folder / "tiny-model")), 2, 64
    else:
        source, split, max_len = cfg.model, cfg.split, cfg.max_seq_len
        if source == DEFAULT_MODEL:
            from sftool import assets

            assets.ensure_model(source)  # the children resolve the built-in name to the cached folder
    if cfg.artifacts is not None and (Path(cfg.artifacts) / "manifest.json").is_file():
        from sftool.runtime.manifest import load_manifest

        if not cfg.tiny and load_manifest(cfg.artifacts, verify_files=False).split != split:
            raise SftoolError(f"{cfg.artifacts} is not an export at split {split}")
        log(f"reusing the export in {cfg.artifacts}")
        return source, Path(cfg.artifacts)
    out = Path(cfg.artifacts) if cfg.artifacts is not None else folder / "artifacts"
    log(f"exporting the device part (blocks 0..{split - 1}) of {'the tiny random model' if cfg.tiny else cfg.model} "
        f"to {out}")
    export_device(ExportOptions(source, split, out, max_seq_len=max_len), log=lambda m: None)
    return source, out


# -- the real runs -----------------------------------------------------------------------------------
class _Proc:
    """One ``sftool`` child whose output goes to a log file (read back for its last line on failure)."""

    def __init__(self, name: str, args: list, log_dir: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sftool.cli", *map(str, args)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def poll(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.output().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.lower().startswith(("error", "traceback")) or "Error:" in ln]
        return (errors or lines or ["no output"])[-1]

    def stop(self) -> None:
        """SIGINT first (serve still writes its summary), then SIGTERM and SIGKILL; always reaps."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                continue


def _wait(procs: list[_Proc], until: Callable[[], bool], deadline: float, what: str, timeout_s: float) -> None:
    """Poll until ``until()``; a child that exits non-zero (or time running out) raises."""
    while not until():
        for p in procs:
            rc = p.poll()
            if rc is not None and rc != 0:
                raise SftoolError(f"{p.name} exited with code {rc}: {p.last_line()} (log: {p.log_path})")
        if time.monotonic() > deadline:
            raise SftoolError(f"{what} took longer than {timeout_s:.0f} s; stopped every process")
        time.sleep(0.05)


def real_run(cfg: TimeBenchConfig, schedule: str, source: str, artifacts: Path, shards: list[Path],
             label_names: list[str], folder: Path) -> dict[str, Any]:
    """``sftool serve --schedule SCHEDULE`` and one ``sftool device --slowdown X`` per shard, on loopback.

    The devices start first and the server once every device has loaded its model: their HELLOs
    wait in ZeroMQ until it listens, so they start streaming within ZeroMQ's reconnect interval
    (100 ms) of each other, close to the model's devices that all start at 0 (started after the
    server, they would begin up to a second apart on a busy machine, as their processes load).
    """
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("logs", "reports"):
        (folder / sub).mkdir(parents=True)
    plan = tm.Plan(samples_per_device=1)  # its window and queue are what the server is given
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    run_dir = folder / "run"
    deadline = time.monotonic() + cfg.timeout_s
    reports = {f"device-{i}": folder / "reports" / f"device-{i}.json" for i in range(len(shards))}
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # A large server takes a while to load: the devices' HELLO waits for it up to the run's timeout.
           "SFTOOL_HELLO_TIMEOUT": str(cfg.timeout_s)}
    procs: list[_Proc] = []
    started = time.perf_counter()
    try:
        for (name, report), shard in zip(reports.items(), shards):
            procs.append(_Proc(name, [
                "device", "--artifacts", artifacts, "--connect", endpoint, "--data", shard, "--device-id", name,
                "--epochs", str(cfg.epochs), "--batch-size", str(cfg.device_batch_size), "--threads", str(cfg.threads),
                "--slowdown", f"{cfg.slowdown:g}", "--server-timeout", "120", "--report", report,
            ], folder / "logs", env))
        # A device logs "running <variant>" once its ONNX session is loaded; it says HELLO right after.
        _wait(procs, lambda: all(f"{p.name}: running " in p.output() for p in procs), deadline,
              "loading the devices' models", cfg.timeout_s)
        procs.append(_Proc("serve", [
            "serve", "--model", source, "--artifacts", artifacts, "--bind", endpoint, "--out", run_dir,
            "--devices", str(len(shards)), "--num-labels", str(len(label_names)), "--label-names", ",".join(label_names),
            "--schedule", schedule, "--mixing", cfg.mixing, "--batch-size", str(cfg.batch_size),
            "--window", str(plan.window), "--queue-size", str(plan.queue), "--threads", str(cfg.threads),
            "--checkpoint-every", "0", "--seed", str(cfg.seed),
        ], folder / "logs", env))
        _wait(procs, lambda: all(p.poll() is not None for p in procs), deadline, f"the {schedule} run", cfg.timeout_s)
        ended = time.perf_counter()
    finally:  # success, failure or Ctrl-C: no child outlives the run
        for p in procs:
            p.stop()
    return _collect(schedule, run_dir, reports, ended - started)


def _collect(schedule: str, run_dir: Path, reports: dict[str, Path], process_wall_s: float) -> dict[str, Any]:
    from sftool.training.run_logger import read_metrics

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise SftoolError(f"sftool serve wrote no {summary_path}")
    summary = json.loads(summary_path.read_text())
    devices = {}
    for name, path in reports.items():
        if not path.is_file():
            raise SftoolError(f"{name} wrote no report {path}")
        rep = json.loads(path.read_text())
        if not rep["samples"]:
            raise SftoolError(f"{name} sent no samples")
        devices[name] = {
            "samples": rep["samples"], "batches": rep["batches"], "compute_s": rep["compute_s"], "slowed_s": rep["slowed_s"],
            "compute_s_per_sample": rep["compute_s"] / rep["samples"], "bytes_per_sample": rep["bytes_sent"] / rep["samples"],
            "wall_s": rep["wall_s"], "stream_s": rep["stream_s"], "variant": rep["variant"],
            "first_batch_unix": rep["first_batch_unix"],
        }
    steps = [r for r in read_metrics(run_dir) if "step" in r and "time" in r and "eval" not in r]
    first = min(d["first_batch_unix"] for d in devices.values())
    span = steps[-1]["time"] - first if steps else None
    n_steps, trained = summary["steps"], summary["samples_trained"]
    if not n_steps or not trained:
        raise SftoolError(f"the {schedule} run trained nothing (server: {summary.get('stopped')})")
    samples = sum(d["samples"] for d in devices.values())
    return {
        "schedule": schedule,
        "stopped": summary["stopped"],
        "serve_wall_s": summary["wall_s"],
        "process_wall_s": process_wall_s,
        "training_span_s": span,
        "device_start_spread_s": max(d["first_batch_unix"] for d in devices.values()) - first,
        "steps": n_steps,
        "samples_trained": trained,
        "train_compute_s": summary["train_compute_s"],
        "server_s_per_step": summary["train_compute_s"] / n_steps,
        "server_s_per_sample": summary["train_compute_s"] / trained,
        "trainer_idle_fraction": summary.get("trainer_idle_fraction"),
        "device_compute_s_per_sample": sum(d["compute_s"] for d in devices.values()) / samples,
        "devices": devices,
        "run_dir": str(run_dir),
    }


# -- SplitLoRA and FedLoRA device steps --------------------------------------------------------------
def measure_method_steps(cfg: TimeBenchConfig, source: str, artifacts: Path, shard: Path, num_labels: int,
                         log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds per sample of SplitLoRA's and FedLoRA's device steps on the first shard's token batches.

    Built as ``sftool bench device`` builds them (`bench_device.build_path`): the methods' own
    device steps with the training's optimizer settings; here the objects are kept, for the sizes
    of the adapters they would exchange. The SplitFrozen device's ONNX forward is timed on the same
    batches too, alone like the other two: in the real runs it shares the cores with the server.
    """
    import torch
    from sftool.bench_device import make_batches
    from sftool.runtime.manifest import load_manifest
    from sftool.server.split_model import LoraSettings, SplitModelSpec
    from sftool.training.sources import TokenBatch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    manifest = load_manifest(artifacts, verify_files=False)
    rows = _read_jsonl(shard)[:cfg.step_samples]
    batches = make_batches(artifacts, [r["text"] for r in rows], [int(r["label"]) for r in rows], cfg.device_batch_size,
                           manifest.max_seq_len)
    samples = sum(len(b[2]) for b in batches)
    # SplitLoRA sends fp32 activations up and their gradient down, padded to each batch's longest row.
    cut_bytes = sum(ids.shape[0] * ids.shape[1] for ids, _, _ in batches) * manifest.hidden_size * 4 / samples
    lora = LoraSettings(rank=cfg.lora_rank, alpha=2 * cfg.lora_rank, dropout=0.0)
    spec = SplitModelSpec(source, num_labels, [manifest.split], manifest.pad_token_id, lora,
                          lora_layers=range(manifest.num_layers))

    def tokens(ids, mask, labels) -> TokenBatch:
        return TokenBatch("bench", 0, torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels),
                          list(range(len(labels))))

    def timed(step: Callable[[TokenBatch], None]) -> list[float]:
        for b in batches[:1]:
            step(tokens(*b))  # warm-up: first-call allocations and kernel choices
        per_sample = []
        for _ in range(cfg.repeats):
            started = time.perf_counter()
            for b in batches:
                step(tokens(*b))
            per_sample.append((time.perf_counter() - started) / samples)
        return per_sample

    log(f"timing the SplitFrozen device step (ONNX forward, as the devices ran it) on {samples} samples, "
        f"{cfg.repeats} repetitions")
    sf_times, sf_variant = _splitfrozen_step(artifacts, manifest, batches, cfg.threads, timed)
    log(f"timing the SplitLoRA device step (SplitLoRA.device_forward + device_backward) on {samples} samples, "
        f"{cfg.repeats} repetitions")
    sl_times, sl_adapter = _splitlora_step(spec, manifest.split, timed)
    log(f"timing the FedLoRA device step (FedLoRA.step, the whole model) on {samples} samples, {cfg.repeats} repetitions")
    fl_times, fl_adapter = _fedlora_step(spec, timed)
    return {
        "samples": samples,
        "batches": len(batches),
        "splitfrozen": {"runs": f"ONNX forward + wire cast ({sf_variant}), timed alone",
                        "s_per_sample": statistics.median(sf_times), "s_per_sample_all": sf_times},
        "splitlora": {"runs": "SplitLoRA.device_forward + device_backward (random cut gradient)",
                      "s_per_sample": statistics.median(sl_times), "s_per_sample_all": sl_times,
                      "adapter_bytes": sl_adapter, "cut_bytes_per_sample": cut_bytes},
        "fedlora": {"runs": "FedLoRA.step (whole model with LoRA + head)", "s_per_sample": statistics.median(fl_times),
                    "s_per_sample_all": fl_times, "adapter_bytes": fl_adapter},
    }


def _splitfrozen_step(artifacts: Path, manifest, batches, threads: int, timed: Callable) -> tuple[list[float], str]:
    """The SplitFrozen device's step, the variant ``sftool device`` picks here, timed by ``timed``."""
    from sftool.runtime.device_app import prepare_hidden
    from sftool.runtime.onnx_model import DeviceModel, SessionSettings, choose_variant

    variant = choose_variant(manifest, "auto")
    model = DeviceModel(artifacts, manifest, variant, settings=SessionSettings(threads=threads))
    # ``timed`` hands over token batches; the ONNX session takes their numpy arrays.
    return timed(lambda b: prepare_hidden(model.forward(b.input_ids.numpy(), b.attention_mask.numpy()), "fp16")), variant.label


def _splitlora_step(spec, split: int, timed: Callable) -> tuple[list[float], int]:
    """SplitLoRA's device step timed by ``timed``, and the bytes of the device adapter it averages.

    One model per method, built and dropped inside its own function, so two are never held at once.
    """
    import torch
    from sftool.server.split_model import SplitServerModel
    from sftool.server.trainer import OptimSettings
    from sftool.training.methods.splitlora import SplitLoRA

    method = SplitLoRA(SplitServerModel(spec), split, OptimSettings(), {"bench": 1}, aggregate_every=0)
    generator = torch.Generator().manual_seed(0)

    def step(batch) -> None:
        hidden, cut = method.device_forward(batch)
        # The server's gradient at the cut: its values do not change what the device step costs.
        method.device_backward(batch, hidden, torch.randn(cut.shape, generator=generator) * 1e-3)

    return timed(step), method.devices.nbytes


def _fedlora_step(spec, timed: Callable) -> tuple[list[float], int]:
    """FedLoRA's device step (one local step of the whole model) timed by ``timed``, and its adapter's bytes."""
    from sftool.server.split_model import SplitServerModel
    from sftool.server.trainer import OptimSettings
    from sftool.training.methods.fedlora import FedLoRA

    method = FedLoRA(SplitServerModel(spec), OptimSettings(), {"bench": 1}, local_steps=10**9)
    return timed(method.step), method.clients.nbytes


# -- the model ---------------------------------------------------------------------------------------
def _link(cfg: TimeBenchConfig) -> dict[str, float]:
    rate = math.inf if cfg.link_mbps is None else cfg.link_mbps * 1e6 / 8
    return {"uplink_bytes_s": rate, "downlink_bytes_s": rate, "latency_s": cfg.latency_ms / 1e3}


def model_inputs(cfg: TimeBenchConfig, runs: dict[str, dict], steps: dict[str, Any]):
    """(tiers, costs, plan) of the time model, from the measured runs and device steps.

    A device's compute per sample is pooled over both runs (the same work each time), times the
    slowdown; each schedule's server cost is its own run's (sequential trains smaller batches).
    """
    names = list(runs["pipelined"]["devices"])
    link = _link(cfg)
    tiers = []
    for name in names:
        per_run = [runs[s]["devices"][name] for s in SCHEDULES]
        compute = sum(d["compute_s"] for d in per_run) / sum(d["samples"] for d in per_run)
        tiers.append(tm.DeviceTier(
            name, 1, splitfrozen_s=cfg.slowdown * compute, splitlora_s=cfg.slowdown * steps["splitlora"]["s_per_sample"],
            fedlora_s=cfg.slowdown * steps["fedlora"]["s_per_sample"], samples=per_run[0]["samples"] // cfg.epochs, **link,
        ))
    up = {s: statistics.fmean(d["bytes_per_sample"] for d in runs[s]["devices"].values()) for s in SCHEDULES}
    server = {s: runs[s]["server_s_per_sample"] * cfg.batch_size for s in SCHEDULES}
    from sftool.experiment import FedLoraConfig, SplitLoraConfig

    costs = {
        tm.SPLITFROZEN: tm.Costs(server["pipelined"], cfg.batch_size, bytes_up_per_sample=up["pipelined"]),
        tm.SEQUENTIAL: tm.Costs(server["sequential"], cfg.batch_size, bytes_up_per_sample=up["sequential"]),
        # SplitLoRA's server part is SplitFrozen's (plus the cut gradient, not charged).
        tm.SPLITLORA: tm.Costs(server["pipelined"], cfg.batch_size,
                               bytes_up_per_sample=steps["splitlora"]["cut_bytes_per_sample"],
                               bytes_down_per_sample=steps["splitlora"]["cut_bytes_per_sample"],
                               adapter_bytes=steps["splitlora"]["adapter_bytes"]),
        tm.FEDLORA: tm.Costs(0.0, cfg.batch_size, adapter_bytes=steps["fedlora"]["adapter_bytes"]),
    }
    plan = tm.Plan(samples_per_device=cfg.samples, epochs=cfg.epochs, batch_size=cfg.device_batch_size,
                   local_steps=FedLoraConfig.local_steps, agg_period=SplitLoraConfig.aggregate_every)
    return tiers, costs, plan


def _finite(value: Any) -> Any:
    """``value`` with every infinite float replaced by None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isinf(value) else value


def _rel(model: float, real: float | None) -> float | None:
    return (model - real) / real if real else None


def run_time_bench(cfg: TimeBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both real runs, the device steps, the model; returns everything (what ``--out`` writes)."""
    check_config(cfg)
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if cfg.work is not None:
            tmp = Path(cfg.work).resolve()
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sftool-bench-time-")))
        shards, label_names, data_name = prepare_shards(cfg, tmp / "data", log)
        source, artifacts = prepare_export(cfg, tmp, log)
        runs = {}
        for i, schedule in enumerate(SCHEDULES, 1):
            log(f"run {i}/{len(SCHEDULES)}: {schedule} schedule: sftool serve + {len(shards)} x sftool device "
                f"--slowdown {cfg.slowdown:g} ({cfg.threads} thread(s) each)")
            runs[schedule] = r = real_run(cfg, schedule, source, artifacts, shards, label_names, tmp / schedule)
            span = f"{r['training_span_s']:.1f} s" if r["training_span_s"] is not None else "-"
            log(f"  {schedule}: server wall {r['serve_wall_s']:.1f} s, training span {span}, {r['steps']} steps, "
                f"device compute {r['device_compute_s_per_sample'] * 1e3:.2f} ms/sample measured, "
                f"{r['device_compute_s_per_sample'] * cfg.slowdown * 1e3:.2f} slowed x{cfg.slowdown:g}")
        steps = measure_method_steps(cfg, source, artifacts, shards[0], len(label_names), log)
        from sftool.runtime.manifest import load_manifest

        manifest = load_manifest(artifacts, verify_files=False)
    tiers, costs, plan = model_inputs(cfg, runs, steps)
    comparison = tm.compare(tiers, costs, plan)
    real_vs_model = {}
    for schedule in SCHEDULES:
        r, t = runs[schedule], comparison[TIMELINES[schedule]]
        span = r["training_span_s"]
        real_vs_model[schedule] = {
            "real_process_wall_s": r["process_wall_s"], "real_serve_wall_s": r["serve_wall_s"],
            "real_training_span_s": span, "model_s": t.total_s,
            # Process start-up, model loading, connecting and saving: what the model leaves out.
            "fixed_costs_s": r["process_wall_s"] - span if span is not None else None,
            "model_vs_span": _rel(t.total_s, span), "model_vs_serve_wall": _rel(t.total_s, r["serve_wall_s"]),
        }
    model = {
        name: {"label": LABELS[name], "total_s": t.total_s, "server_utilization": t.server_utilization,
               "breakdown": t.breakdown,
               "real": "measured in real processes" if name in TIMELINES.values() else NO_REAL_PATH}
        for name, t in comparison.timelines.items()
    }
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_start": loadavg,
                    "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None, "python": sys.version.split()[0]},
        "model_source": "tiny random llama" if cfg.tiny else cfg.model,
        "export": {"family": manifest.family, "split": manifest.split, "num_layers": manifest.num_layers,
                   "hidden_size": manifest.hidden_size},
        "data": data_name,
        "link": ("loopback (unlimited, no latency) in the real runs and the model" if cfg.link_mbps is None and not cfg.latency_ms
                 else f"model only: {cfg.link_mbps or 'unlimited'} Mbit/s each way, {cfg.latency_ms:g} ms one-way latency; "
                      "the real runs were on loopback"),
        "runs": runs,
        "device_steps": steps,
        # Bandwidths of unlimited links are written as null (JSON has no infinity).
        "model_inputs": _finite({"tiers": [asdict(t) for t in tiers], "costs": {k: asdict(c) for k, c in costs.items()},
                                 "plan": asdict(plan)}),
        "real_vs_model": real_vs_model,
        "model": model,
        "reduction_vs_splitlora_pct": comparison.reduction_vs_splitlora_pct,
        "assumptions": tm.describe(tiers, costs, plan) + [
            "- Measured here: each device's compute per sample (both runs pooled) x the slowdown; the server's seconds "
            "per sample of each schedule's run; SplitLoRA's and FedLoRA's device steps on the first shard's batches, "
            "x the slowdown. SplitLoRA's server cost is taken as SplitFrozen's. Averaging costs are not measured (0).",
            f"- SplitLoRA and FedLoRA: {NO_REAL_PATH}.",
            "- Not modelled, and in the real runs: process start-up and loading (outside the training span), thread "
            "and ZeroMQ hand-offs, and the receiver thread's 50 ms poll, which holds each sequential ACK ~25 ms on "
            "average: tens of milliseconds that matter only in runs of a few seconds.",
        ],
        "seconds": time.perf_counter() - started,
    }


# -- output ------------------------------------------------------------------------------------------
def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.0%}"


def print_time_bench(results: dict[str, Any], console=None) -> None:
    """The real-vs-model table, the four schedules by the model, the assumptions."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not squeeze the tables into 80 columns
            console = Console(width=140)
    cfg, x = results["config"], results["config"]["slowdown"]
    n = len(results["runs"]["pipelined"]["devices"])
    table = Table(title=(f"sftool bench time: real processes vs the time model; {n} devices x {cfg['samples']} samples, "
                         f"{cfg['epochs']} epoch(s), devices slowed x{x:g}; {results['model_source']} split "
                         f"{results['export']['split']}/{results['export']['num_layers']}; {results['machine']['cpu']}"))
    for col in ("schedule", "real: processes s", "real: serve wall s", "real: training span s", "model s",
                "model vs span", "model vs serve wall"):
        table.add_column(col, justify="left" if col == "schedule" else "right")
    for schedule, row in results["real_vs_model"].items():
        table.add_row(schedule, _s(row["real_process_wall_s"]), _s(row["real_serve_wall_s"]),
                      _s(row["real_training_span_s"]), _s(row["model_s"]), _pct(row["model_vs_span"]),
                      _pct(row["model_vs_serve_wall"]))
    console.print(table)
    for schedule, r in results["runs"].items():
        console.print(f"  {schedule}: measured device compute {r['device_compute_s_per_sample'] * 1e3:.3f} ms/sample "
                      f"(x{x:g} = {r['device_compute_s_per_sample'] * x * 1e3:.3f}), server {r['server_s_per_step'] * 1e3:.1f} "
                      f"ms/step ({r['steps']} steps, {r['samples_trained']} samples), devices started within "
                      f"{r['device_start_spread_s'] * 1e3:.0f} ms", highlight=False)
    console.print("  processes: the devices started to the last process exited (start-up, loading, saving included); "
                  "serve wall: the server's summary wall_s (listening to its last step); training span: the first "
                  "device batch's compute to the server's last step, the interval the model simulates.", highlight=False)
    console.print(f"  model vs span: (model - span) / span; the real runs use --mixing {cfg['mixing']}"
                  + (" (the model's FIFO)." if cfg["mixing"] == "fifo" else " (the model assumes FIFO)."), highlight=False)

    four = Table(title=f"time model, all four schedules (devices x{x:g} slower; {results['link']})")
    for col in ("method", "device ms/sample (x)", "model total s", "vs pipelined", "server busy", "real processes"):
        four.add_column(col, justify="left" if col in ("method", "real processes") else "right")
    frozen = statistics.fmean(results["runs"][sch]["device_compute_s_per_sample"] for sch in SCHEDULES)
    device_ms = {tm.PIPELINED_SPLITFROZEN: frozen, tm.SEQUENTIAL_SPLIT: frozen,
                 tm.SPLITLORA: results["device_steps"]["splitlora"]["s_per_sample"],
                 tm.FEDLORA: results["device_steps"]["fedlora"]["s_per_sample"]}
    ours = results["model"][tm.PIPELINED_SPLITFROZEN]["total_s"]
    for name, m in results["model"].items():
        real = "measured (above)" if name in TIMELINES.values() else "none (no gradient reply path yet)"
        four.add_row(m["label"], f"{device_ms[name] * x * 1e3:.2f}", f"{m['total_s']:.2f}",
                     f"{m['total_s'] / ours:.2f}x" if ours else "-", f"{m['server_utilization']:.0%}", real)
    console.print(four)
    console.print(f"  pipelined SplitFrozen vs SplitLoRA (model): {results['reduction_vs_splitlora_pct']:.1f}% less "
                  "training time", highlight=False)
    st = results["device_steps"]
    console.print(f"  device steps timed alone on {st['samples']} samples of device-0 (before the x{x:g}): SplitFrozen "
                  f"{st['splitfrozen']['s_per_sample'] * 1e3:.2f} ms ({st['splitfrozen']['runs']}), SplitLoRA "
                  f"{st['splitlora']['s_per_sample'] * 1e3:.2f} ms, FedLoRA {st['fedlora']['s_per_sample'] * 1e3:.2f} ms per "
                  f"sample; the SplitFrozen figure the model uses is the runs' {frozen * 1e3:.2f} ms, measured while "
                  "sharing the cores with the server.", highlight=False)
    for line in results["assumptions"]:
        console.print(f"  {line}", highlight=False, markup=False)
    m = results["machine"]
    console.print(f"  CPU: {m['cpu']} ({m['cpus']} cores; load average {_load(m['loadavg_start'])} at the start, "
                  f"{_load(m['loadavg_end'])} at the end); {results['seconds']:.0f} s in all", highlight=False)


def _load(avg) -> str:
    return f"{avg[0]:.2f}" if avg else "?"

