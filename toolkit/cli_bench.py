"""``sftool bench ...``: side-by-side benchmarks that print measured ratios (and write them as JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import SftoolError, exit_for

app = typer.Typer(help="Side-by-side benchmarks that print measured ratios.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Benchmarks: timings are medians of interleaved repetitions on this machine."""


def _save(results: dict, out: Optional[Path]) -> None:
    """With ``--out``, the results as JSON too."""
    if out:
        from sftool.runtime.files import write_json

        write_json(out, results)
        typer.echo(f"wrote {out}")


@app.command()
def device(
    model: Optional[str] = typer.Option(None, help="Model (default: the export's source with --artifacts, else smollm2-135m-instruct)."),
    split: int = typer.Option(6, help="Split k: the device runs blocks 0..k-1."),
    artifacts: Optional[Path] = typer.Option(None, help="Reuse this export (with int8 variants); exported here first if missing."),
    samples: int = typer.Option(64, help="SST-2 training rows to run (the same ones through every path)."),
    batch_size: int = typer.Option(8, help="Samples per batch (length-bucketed as the device does)."),
    repeats: int = typer.Option(5, help="Interleaved repetitions (the median is reported)."),
    threads: Optional[int] = typer.Option(None, help="Threads for onnxruntime and torch alike (default: all cores)."),
    max_len: int = typer.Option(128, help="Truncate texts to this many tokens; the fp32 wire baseline pads to it."),
    lora_rank: int = typer.Option(8, help="LoRA rank of the SplitLoRA and FedLoRA devices."),
    epochs: int = typer.Option(3, help="Epochs of the training run in the per-run view (cached activations vs per-epoch training)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak RSS per path (a fresh subprocess each)."),
    paths: Optional[str] = typer.Option(None, help="Comma list of paths (default: all): ort_int8, ort_fp32, torch_forward, splitlora_device, fedlora_device."),
    tiny: bool = typer.Option(False, "--tiny", help="A tiny random model and bundled sentences: a quick look, not a measurement."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON."),
) -> None:
    """A SplitFrozen device (ONNX int8) vs ONNX fp32, torch forward, SplitLoRA and FedLoRA devices: time, memory, wire bytes."""
    from rich.console import Console
    from sftool.bench_device import PATHS, DeviceBenchConfig, print_device_bench, run_device_bench

    err = Console(stderr=True, highlight=False)
    try:
        if samples < 1 or batch_size < 1 or repeats < 1 or max_len < 1 or epochs < 1:
            raise SftoolError("--samples, --batch-size, --repeats, --max-len and --epochs must be >= 1")
        cfg = DeviceBenchConfig(
            model=model, split=split, artifacts=artifacts, samples=samples, batch_size=batch_size, repeats=repeats,
            threads=threads, max_len=max_len, lora_rank=lora_rank, epochs=epochs, memory=memory, tiny=tiny,
            paths=[p.strip() for p in paths.split(",") if p.strip()] if paths else list(PATHS),
        )
        results = run_device_bench(cfg, log=lambda m: err.print(f"[dim]bench:[/] {m}"))
    except SftoolError as exc:
        raise exit_for(exc) from None
    print_device_bench(results)
    _save(results, out)


@app.command()
def server(
    model: str = typer.Option("smollm2-135m-instruct", help="The model the artifacts were exported from."),
    artifacts: Path = typer.Option(..., help="A device export of that model (its split is the server's)."),
    parts: str = typer.Option("abcd", help="Which parts: a (backward modes), b (server path vs bare loop), "
                              "c (schedules), d (stored vs recomputed activations)."),
    batch_size: int = typer.Option(8, help="Samples per batch."),
    seq_len: int = typer.Option(64, help="Tokens per sample of the synthetic activation batches (a, b)."),
    steps: int = typer.Option(20, help="Training steps per timed run (b)."),
    repeats: int = typer.Option(5, help="Interleaved repetitions (the median is reported)."),
    device_rows: int = typer.Option(48, help="Rows per device process (c)."),
    data: Optional[Path] = typer.Option(None, help="JSONL with text/label rows for the device processes of (c) (default: SST-2)."),
    threads: Optional[int] = typer.Option(None, help="torch threads."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON."),
) -> None:
    """The server side by side: decomposed vs naive backward, full server path vs bare loop, pipelined vs
    sequential, stored vs recomputed activations."""
    import tempfile

    from rich.console import Console
    from sftool.bench_server import BenchConfig, print_server_bench, run_server_bench

    err = Console(stderr=True, highlight=False)
    try:
        cfg = BenchConfig(model=model, artifacts=artifacts, batch_size=batch_size, seq_len=seq_len, steps=steps,
                          repeats=repeats, device_rows=device_rows, threads=threads)
        with tempfile.TemporaryDirectory() as tmp:
            files = _device_shards(data, 3, device_rows, Path(tmp)) if "c" in parts else []
            results = run_server_bench(cfg, files, parts, log=lambda m: err.print(f"[dim]bench:[/] {m}"))
    except SftoolError as exc:
        raise exit_for(exc) from None
    print_server_bench(results, Console())
    _save(results, out)


def _device_shards(data: Optional[Path], devices: int, rows: int, folder: Path) -> list[Path]:
    """``devices`` JSONL shards of ``rows`` rows each, from ``data`` or the SST-2 training split."""
    from sftool.datasets import load_split, read_jsonl, write_jsonl

    examples = read_jsonl(data) if data else load_split("sst2").train
    if len(examples) < devices * rows:
        raise SftoolError(f"need {devices * rows} rows for {devices} devices, have {len(examples)}")
    paths = []
    for i in range(devices):
        path = folder / f"device-{i}.jsonl"
        write_jsonl(examples[i * rows : (i + 1) * rows], path)
        paths.append(path)
    return paths


@app.command("time")
def time_(
    devices: int = typer.Option(3, help="Device processes."),
    slowdown: float = typer.Option(10.0, help="Each device batch takes X times its measured compute (sftool device --slowdown)."),
    samples: int = typer.Option(64, help="Rows per device."),
    epochs: int = typer.Option(1, help="Passes of every device over its rows."),
    batch_size: int = typer.Option(16, help="The server's training batch."),
    device_batch_size: int = typer.Option(8, help="Samples per device batch."),
    threads: int = typer.Option(1, help="Threads of each process (server torch, device onnxruntime) and of the step timing."),
    tiny: bool = typer.Option(False, "--tiny", help="A tiny random model and synthetic rows: a quick look, not a measurement."),
    dataset: str = typer.Option("sst2", help="Built-in data set of the shards."),
    scheme: str = typer.Option("labels:1", help="Partition of the data set over the devices."),
    split: int = typer.Option(6, help="Split k: the device runs blocks 0..k-1 (not with --tiny)."),
    artifacts: Optional[Path] = typer.Option(None, help="Reuse this device export (exported here first if missing)."),
    step_samples: int = typer.Option(16, help="Rows whose SplitLoRA and FedLoRA device steps are timed."),
    repeats: int = typer.Option(3, help="Repetitions of those device steps (the median is reported)."),
    link_mbps: Optional[float] = typer.Option(None, help="Model only: each device's link in Mbit/s (the runs stay on loopback)."),
    latency_ms: float = typer.Option(0.0, help="Model only: one-way latency in ms."),
    timeout: float = typer.Option(1800.0, help="Give up on a run (and stop its processes) after this many seconds."),
    mixing: str = typer.Option("fifo", help="The server's mixing in the runs: fifo (what the model assumes) or mix."),
    work: Optional[Path] = typer.Option(None, help="Keep shards, export, run folders and logs here (default: a temporary folder)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON."),
) -> None:
    """Total training time with devices slowed to edge speed: real processes vs the time model, all four methods."""
    from rich.console import Console
    from rich.markup import escape
    from sftool.bench_time import TimeBenchConfig, print_time_bench, run_time_bench

    err = Console(stderr=True, highlight=False)
    try:
        cfg = TimeBenchConfig(devices=devices, slowdown=slowdown, samples=samples, epochs=epochs, batch_size=batch_size,
                              device_batch_size=device_batch_size, threads=threads, tiny=tiny, dataset=dataset,
                              scheme=scheme, split=split, artifacts=artifacts, step_samples=step_samples, repeats=repeats,
                              link_mbps=link_mbps, latency_ms=latency_ms, timeout_s=timeout, mixing=mixing, work=work)
        results = run_time_bench(cfg, log=lambda m: err.print(f"[dim]bench:[/] {escape(m)}"))
    except SftoolError as exc:
        raise exit_for(exc) from None
    print_time_bench(results)
    _save(results, out)


@app.command()
def link(
    batch: int = typer.Option(8, help="Samples per batch (default: the SmolLM2-135M split's real batch)."),
    seq_len: int = typer.Option(128, help="Tokens per sample."),
    hidden: int = typer.Option(576, help="Hidden size of the activations (SmolLM2-135M: 576)."),
    dtype: str = typer.Option("fp16", help="Activation dtype on the wire: fp16 or fp32."),
    batches: int = typer.Option(300, help="Batches per timed stream."),
    window: int = typer.Option(4, help="Most unacknowledged batches in flight (the server's default window)."),
    repeats: int = typer.Option(5, help="Interleaved repetitions (the median is reported)."),
    ack: str = typer.Option("queued", help="The receiver's ACK policy: queued (at queue entry) or taken (when consumed)."),
    transports: str = typer.Option("tcp,curve", help="Comma list: tcp (plain), curve (CurveZMQ)."),
    out: Optional[Path] = typer.Option(None, "--out", "--json", help="Write the results as JSON."),
) -> None:
    """Goodput of the device-server protocol vs a bare pyzmq DEALER/ROUTER loop on loopback, plain TCP and CurveZMQ."""
    from rich.console import Console
    from sftool.bench_link import DTYPES, TRANSPORTS, LinkBenchConfig, print_link_bench, run_link_bench

    err = Console(stderr=True, highlight=False)
    chosen = tuple(t.strip() for t in transports.split(",") if t.strip())
    try:
        if min(batch, seq_len, hidden, batches, window, repeats) < 1:
            raise SftoolError("--batch, --seq-len, --hidden, --batches, --window and --repeats must be >= 1")
        if dtype not in DTYPES:
            raise SftoolError(f"--dtype must be one of {', '.join(DTYPES)}")
        if ack not in ("queued", "taken"):
            raise SftoolError("--ack must be queued or taken")
        if not chosen or set(chosen) - set(TRANSPORTS):
            raise SftoolError(f"--transports must list some of {', '.join(TRANSPORTS)}")
        cfg = LinkBenchConfig(batch=batch, seq_len=seq_len, hidden=hidden, dtype=dtype, batches=batches, window=window,
                              repeats=repeats, ack=ack, transports=chosen)
        results = run_link_bench(cfg, log=lambda m: err.print(f"[dim]bench:[/] {m}"))
    except SftoolError as exc:
        raise exit_for(exc) from None
    print_link_bench(results)
    _save(results, out)


@app.command()
def flood(
    devices: int = typer.Option(100, help="Devices at once, flooders included."),
    flooders: int = typer.Option(10, help="Devices that ignore their window and send as fast as the transport takes it."),
    seconds: float = typer.Option(20.0, help="How long the devices stream (then BYE all round)."),
    batches: int = typer.Option(0, help="Batches in each well-behaved device's plan (0: twice its share of the drain)."),
    batch: int = typer.Option(8, help="Samples per batch (default: the SmolLM2-135M split's real batch)."),
    seq_len: int = typer.Option(128, help="Tokens per sample."),
    hidden: int = typer.Option(576, help="Hidden size of the activations (SmolLM2-135M: 576)."),
    window: int = typer.Option(4, help="The server's credit window."),
    queue_size: int = typer.Option(16, help="The server's batch queue."),
    drain_rate: float = typer.Option(200.0, help="Batches per second the trainer stand-in takes off the queue."),
    ack: str = typer.Option("taken", help="The receiver's ACK policy: taken (sftool serve's pipelined default) or queued."),
    pace: bool = typer.Option(True, "--pace/--no-pace", help="Pace credits by announced data size (as sftool serve does)."),
    out: Optional[Path] = typer.Option(None, "--json", "--out", help="Write the results as JSON."),
) -> None:
    """A load test of the server's receiver: every device served, peak server memory beside its configured bound."""
    from rich.console import Console
    from rich.markup import escape
    from sftool.bench_flood import FloodBenchConfig, print_flood_bench, run_flood_bench

    err = Console(stderr=True, highlight=False)
    cfg = FloodBenchConfig(devices=devices, flooders=flooders, seconds=seconds, batches=batches, batch=batch,
                           seq_len=seq_len, hidden=hidden, window=window, queue_size=queue_size, drain_rate=drain_rate,
                           ack=ack, pace=pace)
    try:
        try:
            cfg.validate()
        except ValueError as exc:
            raise SftoolError(str(exc)) from None
        results = run_flood_bench(cfg, log=lambda m: err.print(f"[dim]bench:[/] {escape(m)}"))
    except SftoolError as exc:
        raise exit_for(exc) from None
    print_flood_bench(results)
    _save(results, out)


@app.command()
def fuzz(
    messages: int = typer.Option(12000, help="Mutated valid messages to send (a third from hypothesis strategies)."),
    seed: int = typer.Option(0, help="Seed of the random mutators and of hypothesis."),
    scenarios: bool = typer.Option(True, "--scenarios/--no-scenarios", help="Also run the scripted protocol-state abuses."),
    out: Optional[Path] = typer.Option(None, "--json", "--out", help="Write the results as JSON."),
) -> None:
    """Fuzz the device-server link: mutated messages and protocol abuses against a real receiver on loopback."""
    from rich.console import Console
    from rich.markup import escape
    from sftool.link_fuzz import print_fuzz, run_campaign

    if messages < 1:
        raise exit_for(SftoolError("--messages must be >= 1")) from None
    err = Console(stderr=True, highlight=False)
    results = run_campaign(messages, seed, log=lambda m: err.print(f"[dim]fuzz:[/] {escape(m)}"), scenarios=scenarios)
    print_fuzz(results)
    _save(results, out)


@app.command()
def decode(
    model: str = typer.Option("smollm2-135m-instruct", help="The model to decode with."),
    split: int = typer.Option(6, help="Split k: the device runs blocks 0..k-1."),
    artifacts: Optional[Path] = typer.Option(None, help="An export with its decoder (exported here with --with-decoder if missing)."),
    run: Optional[Path] = typer.Option(None, help="A causal-LM run folder whose adapter both paths use."),
    prompts: int = typer.Option(20, help="GSM8K eval prompts (the fixed re-split's first rows)."),
    max_new_tokens: int = typer.Option(128, help="Tokens decoded per prompt (no stop rule: every prompt decodes as long)."),
    recompute_prompts: int = typer.Option(4, help="Generations whose recompute-the-prefix cost is timed."),
    recompute_every: int = typer.Option(16, help="Time recomputing at every N-th position of those generations."),
    threads: Optional[int] = typer.Option(None, help="torch and onnxruntime threads."),
    work: Optional[Path] = typer.Option(None, help="Folder for the export when --artifacts is not given (default: a temporary one)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON."),
) -> None:
    """Decoding per token: KV cache vs recomputing the prefix on both halves, split vs unsplit, greedy agreement."""
    import tempfile

    from rich.console import Console
    from rich.markup import escape
    from sftool.bench_decode import DecodeBenchConfig, print_decode_bench, run_decode_bench

    err = Console(stderr=True, highlight=False)
    cfg = DecodeBenchConfig(model=model, split=split, artifacts=artifacts, run=run, prompts=prompts,
                            max_new_tokens=max_new_tokens, recompute_prompts=recompute_prompts,
                            recompute_every=recompute_every, threads=threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = run_decode_bench(cfg, work or Path(tmp), log=lambda m: err.print(f"[dim]bench:[/] {escape(m)}"))
    except SftoolError as exc:
        raise exit_for(exc) from None
    print_decode_bench(results)
    _save(results, out)


@app.command()
def scale(
    model: str = typer.Option("smollm2-135m-instruct", help="The model the artifacts were exported from."),
    artifacts: Path = typer.Option(..., help="A device export of that model (its split is the server's)."),
    batch_size: int = typer.Option(16, metavar="N", help="Global batch of one step (split over the ranks)."),
    seq_len: int = typer.Option(64, metavar="N", help="Tokens per sample of the synthetic activation batches."),
    steps: int = typer.Option(6, metavar="N", help="Timed steps per run (the median is reported)."),
    threads: Optional[int] = typer.Option(None, metavar="N", help="Cores to use in all, split over the ranks (default: all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON."),
) -> None:
    """Server ranks side by side: 1 vs 2 ranks on this host, the all-reduce, a projection to 8-64 ranks."""
    from rich.console import Console
    from sftool.bench_scale import ScaleConfig, print_scale_bench, run_scale_bench

    err = Console(stderr=True, highlight=False)
    if batch_size < 2 or steps < 1:
        raise exit_for(SftoolError("--batch-size must be >= 2 (two ranks share it) and --steps >= 1")) from None
    if not (artifacts / "manifest.json").is_file():
        raise exit_for(SftoolError(f"{artifacts} is not a device export (no manifest.json)")) from None
    cfg = ScaleConfig(model=model, artifacts=artifacts, batch_size=batch_size, seq_len=seq_len, steps=steps, threads=threads)
    results = run_scale_bench(cfg, log=lambda m: err.print(f"[dim]bench:[/] {m}"))
    print_scale_bench(results, Console())
    _save(results, out)
