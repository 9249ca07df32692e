"""The report of a sweep: Markdown tables (mean ± standard deviation over seeds, with the standard
error) and plots (accuracy vs samples seen, device compute, where the time went)."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from sftool.runtime.files import cpu_name


def mean_sd_se(values: Iterable[float]) -> tuple[float, float, float, int]:
    """Mean, sample standard deviation, standard error of the mean, count (sd and se are 0 for one value)."""
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), float("nan"), float("nan"), 0
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), sd, sd / math.sqrt(len(xs)), len(xs)


def _label(r: dict) -> str:
    return f"{r['method']} ({r['precision']})" if r["method"] == "splitfrozen" else r["method"]


def accuracy_table(results: list[dict]) -> str:
    """Rows: method; columns: data set x scheme; cells: mean ± sd (se, n)."""
    cols = sorted({(r["dataset"], r["scheme"]) for r in results})
    rows = sorted({_label(r) for r in results})
    cells: dict[tuple[str, tuple[str, str]], list[float]] = defaultdict(list)
    majority: dict[tuple[str, str], float] = {}
    for r in results:
        cells[(_label(r), (r["dataset"], r["scheme"]))].append(r["accuracy"])
        majority[(r["dataset"], r["scheme"])] = r.get("majority", float("nan"))
    lines = ["| method | " + " | ".join(f"{d} {s}" for d, s in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        out = []
        for c in cols:
            m, sd, se, n = mean_sd_se(cells.get((row, c), []))
            out.append(f"{m:.4f} ± {sd:.4f} (se {se:.4f}, n={n})" if n else "")
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    lines.append("| majority class | " + " | ".join(f"{majority[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def compute_table(results: list[dict]) -> str:
    """Device compute per sample per method, counted and measured, and the reductions of SplitFrozen."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by[_label(r)].append(r)
    stats = {}
    for name, rs in sorted(by.items()):
        stats[name] = {
            "flops": statistics.fmean(r["device_flops_per_sample"] for r in rs),
            "s": statistics.fmean(r["device_s_per_sample"] for r in rs),
            "cached": statistics.fmean(r["device_s_per_sample_cached"] for r in rs) if rs[0].get("device_s_per_sample_cached") is not None else None,
            "wall": statistics.fmean(r["wall_s"] for r in rs),
            "up": statistics.fmean(r["bytes_up"] / max(r["samples"], 1) for r in rs),
            "down": statistics.fmean(r["bytes_down"] / max(r["samples"], 1) for r in rs),
        }
    lines = ["| method | device GFLOP/sample (counted) | device ms/sample (measured) | with activation cache | "
             "bytes up/sample | bytes down/sample | wall s/run |", "|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        cached = f"{s['cached'] * 1e3:.3f}" if s["cached"] is not None else ""
        lines.append(f"| {name} | {s['flops'] / 1e9:.4f} | {s['s'] * 1e3:.3f} | {cached} | {s['up']:.0f} | {s['down']:.0f} | {s['wall']:.1f} |")
    frozen = [n for n in stats if n.startswith("splitfrozen")]
    for f in frozen:
        for other in ("splitlora", "fedlora", "ffa"):
            if other in stats:
                a, b = stats[f], stats[other]
                lines.append("")
                lines.append(f"- {f} vs {other}: device compute {100 * (1 - a['flops'] / b['flops']):.1f}% lower counted, "
                             f"{100 * (1 - a['s'] / b['s']):.1f}% lower measured"
                             + (f", {100 * (1 - a['cached'] / b['s']):.1f}% lower per run with the activation cache" if a["cached"] else ""))
    return "\n".join(lines)


def plots(results: list[dict], out: Path) -> list[Path]:
    """accuracy_vs_samples.png, device_compute.png, time_breakdown.png (matplotlib, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    groups = sorted({(r["dataset"], r["scheme"]) for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (dataset, scheme) in zip(axes[0], groups):
        by: dict[str, list[dict]] = defaultdict(list)
        for r in results:
            if (r["dataset"], r["scheme"]) == (dataset, scheme):
                by[_label(r)].append(r)
        for name, rs in sorted(by.items()):
            points = defaultdict(list)
            for r in rs:
                for p in r.get("curve") or []:
                    points[p["samples"]].append(p["accuracy"])
            xs = sorted(points)
            ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", label=name)
        ax.set_title(f"{dataset} {scheme}")
        ax.set_xlabel("samples seen")
        ax.set_ylabel("eval accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "accuracy_vs_samples.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_method[_label(r)].append(r)
    names = sorted(by_method)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.bar(names, [statistics.fmean(r["device_flops_per_sample"] for r in by_method[n]) / 1e9 for n in names])
    a1.set_ylabel("device GFLOP / sample (counted)")
    a2.bar(names, [statistics.fmean(r["device_s_per_sample"] for r in by_method[n]) * 1e3 for n in names])
    a2.set_ylabel("device ms / sample (measured)")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    written.append(out / "device_compute.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    device = [statistics.fmean(r["device_s_per_sample"] * r["samples"] for r in by_method[n]) for n in names]
    server = [statistics.fmean(r["server_s"] for r in by_method[n]) for n in names]
    other = [max(0.0, statistics.fmean(r["wall_s"] for r in by_method[n]) - d - s) for n, d, s in zip(names, device, server)]
    ax.bar(names, device, label="device compute")
    ax.bar(names, server, bottom=device, label="server compute")
    ax.bar(names, other, bottom=[d + s for d, s in zip(device, server)], label="data, evaluation, other")
    ax.set_ylabel("seconds per run (one process)")
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "time_breakdown.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_report(results: list[dict], out: Path, config: Any) -> Path:
    """``report.md`` beside ``results.jsonl``."""
    out = Path(out)
    pngs = plots(results, out) if results else []
    text = [
        "# sftool experiment report",
        "",
        f"{len(results)} runs; CPU: {cpu_name()} ({os.cpu_count()} cores), {platform.system()}.",
        f"Model {config.model.source}, split {config.model.split}; {config.train.devices} devices; "
        f"{config.train.epochs} epochs of samples for every method; batch {config.train.batch_size}; "
        f"LoRA r={config.lora.rank}; lr {config.optim.lr}.",
        "",
        "## Eval accuracy (mean ± sd over seeds, standard error, runs)",
        "",
        accuracy_table(results) if results else "(no runs)",
        "",
        "## Device computation and traffic",
        "",
        compute_table(results) if results else "(no runs)",
        "",
        "Device seconds are measured in this one process (SplitFrozen: onnxruntime; the others: their torch device step);",
        "they compare methods on this CPU, not edge boards.",
        "",
    ]
    text += [f"![{p.stem}]({p.name})" for p in pngs]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
