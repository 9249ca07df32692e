"""``sftool bench ...``: side-by-side benchmarks that print measured ratios (and write them as JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import SftoolError

app = typer.Typer(help="Side-by-side benchmarks that print measured ratios.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Benchmarks: timings are medians of interleaved repetitions on this machine."""


def _fail(exc: SftoolError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


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
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak RSS per path (a fresh subprocess each)."),
    paths: Optional[str] = typer.Option(None, help="Comma list of paths (default: all): ort_int8, ort_fp32, torch_forward, splitlora_device, fedlora_device."),
    tiny: bool = typer.Option(False, "--tiny", help="A tiny random model and bundled sentences: a quick look, not a measurement."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON."),
) -> None:
    """A SplitFrozen device (ONNX int8) vs ONNX fp32, torch forward, SplitLoRA and FedLoRA devices: time, memory, wire bytes."""
    from rich.console import Console
    from sftool.bench_device import PATHS, DeviceBenchConfig, print_device_bench, run_device_bench, write_results

    err = Console(stderr=True, highlight=False)
    try:
        if samples < 1 or batch_size < 1 or repeats < 1 or max_len < 1:
            raise SftoolError("--samples, --batch-size, --repeats and --max-len must be >= 1")
        cfg = DeviceBenchConfig(
            model=model, split=split, artifacts=artifacts, samples=samples, batch_size=batch_size, repeats=repeats,
            threads=threads, max_len=max_len, lora_rank=lora_rank, memory=memory, tiny=tiny,
            paths=[p.strip() for p in paths.split(",") if p.strip()] if paths else list(PATHS),
        )
        results = run_device_bench(cfg, log=lambda m: err.print(f"[dim]bench:[/] {m}"))
    except SftoolError as exc:
        raise _fail(exc) from None
    print_device_bench(results)
    if out:
        write_results(results, out)
        typer.echo(f"wrote {out}")
