"""`sftool bench scale`: the server on 1 and 2 ranks (real processes, gloo), the measured all-reduce
of the trainable parameters, and a projection to larger fleets of ranks from those measurements.

Both runs train the same global batch per step (1 rank: all of it; 2 ranks: half each, through
``sftool.training.distributed``), on synthetic activation batches of the export's shape, so their
samples/s compare the same work. The projection assumes, and prints, a ring all-reduce:

    step(N) = compute(B / N) + allreduce(N),   allreduce(N) = 2 (N - 1) (latency + bytes / (N bandwidth))

with latency and bandwidth fitted to all-reduces of two sizes measured between the two local ranks,
and compute(b) scaled linearly from the measured per-sample step time. Loopback between processes on
one host is faster than any network, so the projection's all-reduce is a lower bound for a cluster.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sftool.runtime.files import cpu_name

PROJECTED_RANKS = (8, 16, 32, 64)


@dataclass
class ScaleConfig:
    model: str
    artifacts: Path
    batch_size: int = 16  # the global batch of one step
    seq_len: int = 64
    steps: int = 6
    threads: int | None = None  # all cores, split over the ranks

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _local_batches(cfg: ScaleConfig, hidden_size: int, rank: int, world: int, device):
    """This rank's share of each global batch: rows rank, rank + world, ... of it."""
    import torch
    from sftool.server.mixing import TrainBatch

    rng = np.random.default_rng(0)
    out = []
    for _ in range(cfg.steps + 1):
        lengths = rng.integers(cfg.seq_len // 2, cfg.seq_len + 1, size=cfg.batch_size)
        mask = (np.arange(cfg.seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        hidden = (rng.standard_normal((cfg.batch_size, cfg.seq_len, hidden_size)) * 0.5).astype(np.float32)
        labels = rng.integers(0, 2, size=cfg.batch_size)
        rows = slice(rank, None, world)
        out.append(TrainBatch(torch.from_numpy(hidden[rows]).to(device), torch.from_numpy(mask[rows]).to(device),
                              torch.from_numpy(labels[rows]).to(device), []))
    return out


def _allreduce_seconds(numel: int, repeats: int = 10) -> float:
    import torch
    import torch.distributed as dist

    buf = torch.zeros(numel)
    dist.all_reduce(buf)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rank_run(rank: int, world: int, init: str, cfg_json: str, out: str) -> None:
    """One rank's run: build the server model, train ``steps`` global steps, time them."""
    import torch
    import torch.distributed as dist
    from sftool.runtime.manifest import load_manifest
    from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel
    from sftool.server.trainer import OptimSettings, Trainer
    from sftool.training.distributed import RankGroup

    # The rank's own stderr, C level included (gloo and libtorch report there), for the parent's error.
    log = os.open(Path(out, f"rank{rank}-of-{world}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 2)
    cfg = ScaleConfig(**{**json.loads(cfg_json)})
    cfg.artifacts = Path(cfg.artifacts)
    cores = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    ranks = RankGroup(rank, world)
    manifest = load_manifest(cfg.artifacts, verify_files=False)
    torch.manual_seed(0)
    model = SplitServerModel(SplitModelSpec(cfg.model, 2, [manifest.split], manifest.pad_token_id, LoraSettings(dropout=0.0)))
    trainer = Trainer(model, OptimSettings(), ranks=ranks)
    batches = _local_batches(cfg, manifest.hidden_size, rank, world, model.device)
    trainer.step(batches[0])  # warm-up
    ranks.allreduce_s, ranks.allreduces = 0.0, 0
    steps = []
    for b in batches[1:]:
        started = time.perf_counter()
        trainer.step(b)
        steps.append(time.perf_counter() - started)
    numel = sum(p.numel() for p in model.trainable_parameters())
    result = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "step_s": statistics.median(steps),
              "trainable": numel, "allreduce_in_step_s": ranks.allreduce_s / max(1, ranks.allreduces)}
    if world > 1:
        result["allreduce_trainable_s"] = _allreduce_seconds(numel)
        result["allreduce_small_s"] = _allreduce_seconds(1024)
        ranks.close()
    Path(out, f"rank{rank}-of-{world}.json").write_text(json.dumps(result))


def _spawn(world: int, cfg: ScaleConfig, folder: Path) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    init = folder / f"init-{world}"
    procs = [ctx.Process(target=rank_run, args=(r, world, str(init), json.dumps(cfg.as_dict()), str(folder)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    for rank, p in enumerate(procs):
        if p.exitcode != 0:
            log = folder / f"rank{rank}-of-{world}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
            raise RuntimeError(f"rank {rank} of the {world}-rank run exited with code {p.exitcode}: "
                               + (" | ".join(tail) or "no output"))
    return [json.loads((folder / f"rank{r}-of-{world}.json").read_text()) for r in range(world)]


def project(step_1_s: float, batch: int, bytes_: int, latency_s: float, bandwidth: float,
            ranks=PROJECTED_RANKS) -> list[dict]:
    """Step time, samples/s and the all-reduce's share per rank count, by the module's model."""
    per_sample = step_1_s / batch
    rows = []
    for n in ranks:
        allreduce = 2 * (n - 1) * (latency_s + bytes_ / (n * bandwidth))
        compute = per_sample * batch / n
        step = compute + allreduce
        rows.append({"ranks": n, "step_s": step, "samples_per_s": batch / step, "allreduce_s": allreduce,
                     "allreduce_share": allreduce / step})
    return rows


def run_scale_bench(cfg: ScaleConfig, log: Callable[[str], None] = print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log(f"1 rank: global batch {cfg.batch_size} x {cfg.seq_len} tokens, {cfg.steps} timed steps")
        one = _spawn(1, cfg, folder)[0]
        log(f"2 ranks (gloo, loopback): {cfg.batch_size // 2} rows each, the same global batch")
        two = _spawn(2, cfg, folder)
    step2 = max(r["step_s"] for r in two)  # a step ends when the slowest rank's does
    r0 = two[0]
    bytes_ = 4 * r0["trainable"]
    # Fit the ring model to the two measured sizes (2 ranks: allreduce = 2 (latency + bytes / (2 bw))).
    latency = r0["allreduce_small_s"] / 2
    bandwidth = bytes_ / max(1e-9, r0["allreduce_trainable_s"] - r0["allreduce_small_s"])
    return {
        "config": cfg.as_dict(),
        "cpu": cpu_name(),
        "one_rank": {**one, "samples_per_s": cfg.batch_size / one["step_s"]},
        "two_ranks": {"step_s": step2, "samples_per_s": cfg.batch_size / step2, "threads_per_rank": r0["threads"],
                      # The collective alone, timed between steps; and inside a step, where it also waits
                      # for the slower rank to arrive (load imbalance, not communication).
                      "allreduce_trainable_s": r0["allreduce_trainable_s"],
                      "allreduce_share_of_step": r0["allreduce_trainable_s"] / step2,
                      "allreduce_in_step_s": r0["allreduce_in_step_s"],
                      "allreduce_in_step_share": r0["allreduce_in_step_s"] / step2},
        "trainable_parameters": r0["trainable"],
        "fit": {"latency_s": latency, "bandwidth_bytes_per_s": bandwidth},
        "projection": project(one["step_s"], cfg.batch_size, bytes_, latency, bandwidth),
        "target_allreduce_share": 0.05,
        "assumptions": [
            "ring all-reduce: 2 (N - 1) (latency + bytes / (N bandwidth)), fitted to 2 local ranks over loopback "
            "(a network is slower: a lower bound on the all-reduce)",
            "compute scales linearly with the local batch (per-sample step time of the 1-rank run; small batches "
            "use cores less well, so an optimistic bound)",
            "one rank per host with this host's cores; no GPU measured here (none present)",
        ],
    }


def print_scale_bench(r: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"server ranks on {r['cpu']} (global batch {r['config']['batch_size']} x {r['config']['seq_len']})")
    for col in ("ranks", "threads/rank", "step s", "samples/s", "all-reduce", "/ step", "target",
                "in step (+ waiting)"):
        t.add_column(col, justify="right")
    one, two = r["one_rank"], r["two_ranks"]
    t.add_row("1", str(one["threads"]), f"{one['step_s']:.3f}", f"{one['samples_per_s']:.1f}", "-", "-", "", "-")
    t.add_row("2", str(two["threads_per_rank"]), f"{two['step_s']:.3f}", f"{two['samples_per_s']:.1f}",
              f"{two['allreduce_trainable_s'] * 1e3:.2f} ms", f"{two['allreduce_share_of_step']:.2%}",
              f"< {r['target_allreduce_share']:.0%}",
              f"{two['allreduce_in_step_s'] * 1e3:.1f} ms ({two['allreduce_in_step_share']:.1%})")
    console.print(t)
    p = Table(title=f"projection ({r['trainable_parameters']:,} trainable parameters, fitted latency "
                    f"{r['fit']['latency_s'] * 1e6:.0f} us, bandwidth {r['fit']['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s)")
    for col in ("ranks", "step s", "samples/s", "all-reduce s", "all-reduce / step"):
        p.add_column(col, justify="right")
    for row in r["projection"]:
        p.add_row(str(row["ranks"]), f"{row['step_s']:.4f}", f"{row['samples_per_s']:.0f}",
                  f"{row['allreduce_s'] * 1e3:.2f} ms", f"{row['allreduce_share']:.1%}")
    console.print(p)
    for a in r["assumptions"]:
        console.print(f"  assumption: {a}")
