"""Accuracy under extreme non-IID data: mixing buffer vs. arrival order vs. IID shards, and int8 devices.

Every run uses the same commands a user runs (`sftool data split`, `sftool serve`, `sftool device`),
the real SmolLM2-135M-Instruct at split 6 and the SST-2 re-split, 3 device processes on loopback:

  labels1-mix     one label per device, devices concurrent, server draws mixed batches (SplitFrozen)
  labels1-order   one label per device, devices one after another, server trains in arrival order
                  (--mixing fifo): device-by-device training, what plain split learning does
  iid-mix         IID shards, mixing on: the reference
  labels1-int8    as labels1-mix with int8 devices (accuracy cost of int8 activations)
  iid1-seq-fp32   one device with every training row, sequential schedule (ACK after each step): the
  iid1-seq-int8   run is deterministic, so fp32 vs int8 devices at the same seed differ only by the
                  device's precision (labels1-* runs vary by several points from run to run)

After each run the trained model is also evaluated with the other device precision (`sftool evaluate
RUN --precision`), a paired comparison free of training noise.

Usage: python examples/mixing_experiment.py --out runs/mixing [--runs labels1-mix,iid-mix] [--epochs 2] [--seeds 0,1]
Writes OUT/results.json and OUT/results.md (one row per run and seed, then the mean per run). The seed
sets the server's head initialisation and mixing draws; device shards stay the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from sftool.runtime.files import free_port
from sftool.settings import OptimSettings

SFTOOL = [sys.executable, "-m", "sftool.cli"]
RUNS = {
    "labels1-mix": {"scheme": "labels:1", "mixing": "mix", "order": "concurrent", "precision": "fp32"},
    "labels1-order": {"scheme": "labels:1", "mixing": "fifo", "order": "sequential", "precision": "fp32"},
    "iid-mix": {"scheme": "iid", "mixing": "mix", "order": "concurrent", "precision": "fp32"},
    "labels1-int8": {"scheme": "labels:1", "mixing": "mix", "order": "concurrent", "precision": "int8"},
    "iid1-seq-fp32": {"scheme": "iid", "mixing": "mix", "order": "concurrent", "precision": "fp32", "devices": 1, "schedule": "sequential"},
    "iid1-seq-int8": {"scheme": "iid", "mixing": "mix", "order": "concurrent", "precision": "int8", "devices": 1, "schedule": "sequential"},
}


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        subprocess.run([*SFTOOL, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT, check=True)


def one_run(name: str, spec: dict, out: Path, artifacts: Path, opts: argparse.Namespace, seed: int) -> dict:
    devices = spec.get("devices", 3)
    shards = out / f"shards-{spec['scheme'].replace(':', '')}-{devices}"
    if not (shards / "eval.jsonl").is_file():
        run(["data", "split", "--dataset", "sst2", "--devices", str(devices), "--scheme", spec["scheme"], "--seed", "0",
             "--out", shards], out / f"split-{name}.log")
    label_names = ",".join(json.loads((shards / "label_map.json").read_text())["label_names"])
    base, name = name, f"{name}-s{seed}" if seed else name  # logs and run folder per seed
    run_dir = out / name
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with contextlib.ExitStack() as logs:  # every child's log file, closed when the run is over
        server = subprocess.Popen(
            [*SFTOOL, "serve", "--model", opts.model, "--artifacts", str(artifacts), "--bind", endpoint, "--out", str(run_dir),
             "--devices", str(devices), "--schedule", spec.get("schedule", "pipelined"), "--label-names", label_names, "--eval-data", str(shards / "eval.jsonl"),
             "--mixing", spec["mixing"], "--batch-size", "16", "--mix-capacity", str(opts.mix_capacity),
             "--lr", str(opts.lr), "--warmup-steps", str(OptimSettings.warmup_steps), "--eval-precision", spec["precision"], "--checkpoint-every", "0",
             "--seed", str(seed)],
            stdout=logs.enter_context(open(out / f"serve-{name}.log", "w")), stderr=subprocess.STDOUT,
        )

        def device(i: int) -> subprocess.Popen:
            return subprocess.Popen(
                [*SFTOOL, "device", "--artifacts", str(artifacts), "--connect", endpoint, "--data", str(shards / f"device-{i}.jsonl"),
                 "--device-id", f"device-{i}", "--epochs", str(opts.epochs), "--threads", "1", "--precision", spec["precision"],
                 "--report", str(out / f"report-{name}-{i}.json"), "--server-timeout", "600"],
                stdout=logs.enter_context(open(out / f"device-{name}-{i}.log", "w")), stderr=subprocess.STDOUT,
            )

        if spec["order"] == "sequential":
            for i in range(devices):  # device-by-device: the next starts when the previous is done
                proc = device(i)
                if proc.wait() != 0:
                    raise RuntimeError(f"{name}: device {i} failed")
        else:
            procs = [device(i) for i in range(devices)]
            if any(p.wait() != 0 for p in procs):
                raise RuntimeError(f"{name}: a device failed")
        if server.wait() != 0:
            raise RuntimeError(f"{name}: server failed, see {out / f'serve-{name}.log'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    # The same trained model with the other device precision: a paired look at what int8 costs at inference.
    other = "int8" if spec["precision"] == "fp32" else "fp32"
    cross_file = out / f"eval-{name}-{other}.json"
    run(["evaluate", run_dir, "--precision", other, "--out", cross_file], out / f"evaluate-{name}.log")
    return {
        **spec,
        "devices": devices,
        "run": base,
        "seed": seed,
        "eval_accuracy_before": summary["eval_before"]["accuracy"],
        "eval_accuracy_after": summary["eval_after"]["accuracy"],
        "eval_n": summary["eval_after"]["n"],
        "eval_accuracy_after_other_precision": {other: json.loads(cross_file.read_text())["accuracy"]},
        "samples_trained": summary["samples_trained"],
        "steps": summary["steps"],
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mixing"))
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--split", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=OptimSettings.lr)
    parser.add_argument("--mix-capacity", type=int, default=256)
    parser.add_argument("--seeds", default="0", help="comma list; each run is repeated once per seed")
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    artifacts = opts.out / "artifacts"
    if not (artifacts / "manifest.json").is_file():
        run(["export", "--model", opts.model, "--split", str(opts.split), "--out", artifacts], opts.out / "export.log")
    results = []
    seeds = [int(s) for s in opts.seeds.split(",")]
    for seed in seeds:  # seed-major: a cut-short experiment still has every run once
        for name in opts.runs.split(","):
            print(f"run {name} seed {seed} ...", flush=True)
            results.append(one_run(name, RUNS[name], opts.out, artifacts, opts, seed))
            print(json.dumps(results[-1]), flush=True)
            (opts.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| run | seed | shards | mixing | device order | precision | eval acc before | eval acc after "
             "| same model, other devices | samples | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        (other, acc), = r["eval_accuracy_after_other_precision"].items()
        lines.append(f"| {r['run']} | {r['seed']} | {r['scheme']} | {r['mixing']} | {r['order']} | {r['precision']} | "
                     f"{r['eval_accuracy_before']:.4f} | {r['eval_accuracy_after']:.4f} | {acc:.4f} ({other}) | "
                     f"{r['samples_trained']} | {r['wall_s']:.0f} |")
    if len(seeds) > 1:
        lines += ["", "| run | seeds | mean eval acc after | min | max |", "|---|---|---|---|---|"]
        for name in opts.runs.split(","):
            accs = [r["eval_accuracy_after"] for r in results if r["run"] == name]
            lines.append(f"| {name} | {len(accs)} | {sum(accs) / len(accs):.4f} | {min(accs):.4f} | {max(accs):.4f} |")
    (opts.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
