"""`sftool experiment CONFIG.toml`: methods x data sets x partitions x seeds, on one core.

Every run of a sweep uses the same shards (``sftool data split`` files), the same model and LoRA
settings, the same optimizer and schedule, the same sample budget and the same evaluation; only
the method differs. Devices are simulated in this process: SplitFrozen devices run the exported
ONNX (fp32 or int8) exactly as ``sftool device`` does; the other methods' devices run their own
device step in torch. Each run is one JSON line in ``results.jsonl``; a sweep that is started
again skips the runs it finished. ``report.md`` and the plots are rebuilt at the end.

The configuration (TOML)::

    [sweep]   methods, datasets, schemes, seeds, precisions (SplitFrozen's device variants)
    [model]   source, split
    [train]   devices, batch_size, device_batch_size, epochs, mix_capacity, max_len, evals, threads,
              noise_ratio, accelerator, precision, recompute
    [lora]    rank, alpha, dropout, targets
    [optim]   lr, warmup_steps, weight_decay, max_grad_norm
    [splitlora] aggregate_every, weighted
    [fedlora] local_steps

``--set section.key=value`` overrides any entry.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import tomllib
from sftool.errors import SftoolError
from sftool.settings import LoraSettings, OptimSettings

METHODS = ("splitfrozen", "splitlora", "fedlora", "ffa", "centralized", "centralized-all")
RESULTS = "results.jsonl"
#: How often a long run says where it is.
PROGRESS_EVERY_S = 30.0


@dataclass
class SweepSettings:
    methods: list[str] = field(default_factory=lambda: ["splitfrozen", "splitlora", "fedlora", "centralized"])
    datasets: list[str] = field(default_factory=lambda: ["sst2"])
    schemes: list[str] = field(default_factory=lambda: ["labels:1"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])


@dataclass
class ModelSettings:
    source: str = "smollm2-135m-instruct"
    split: int = 6


@dataclass
class TrainSettings:
    devices: int = 3
    batch_size: int = 16
    device_batch_size: int = 8
    epochs: int = 2
    mix_capacity: int = 256
    max_len: int = 128
    #: Evaluations during a run (evenly spaced in steps), for the accuracy-vs-samples curves.
    evals: int = 4
    threads: int | None = None
    #: SplitFrozen devices add Gaussian noise with ||noise|| / ||h|| about this per token (docs/privacy.md).
    noise_ratio: float = 0.0
    #: Where and how the server side trains, as ``sftool serve`` (``sftool.server.accelerator``).
    accelerator: str = "auto"
    precision: str = "auto"
    recompute: bool = False


@dataclass
class SplitLoraConfig:
    aggregate_every: int = 100
    weighted: bool = False


@dataclass
class FedLoraConfig:
    local_steps: int = 10


@dataclass
class ExperimentConfig:
    sweep: SweepSettings = field(default_factory=SweepSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    splitlora: SplitLoraConfig = field(default_factory=SplitLoraConfig)
    fedlora: FedLoraConfig = field(default_factory=FedLoraConfig)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(value: str) -> Any:
    """A ``--set`` value: TOML syntax if it parses (numbers, booleans, lists, quoted strings), else a string."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a config file (every entry optional) and apply ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise SftoolError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SftoolError(f"{path} is not valid TOML: {exc}") from None
    for item in overrides:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot:
            raise SftoolError(f"--set takes section.key=value, not {item!r}")
        data.setdefault(section, {})[name] = _coerce(value.strip())
    config = ExperimentConfig()
    sections = {f.name: f for f in fields(ExperimentConfig)}
    for section, entries in data.items():
        if section not in sections or not isinstance(entries, dict):
            raise SftoolError(f"unknown config section [{section}] (have: {', '.join(sections)})")
        current = getattr(config, section)
        known = {f.name for f in fields(current)}
        unknown = sorted(set(entries) - known)
        if unknown:
            raise SftoolError(f"[{section}] has no entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                              f"(have: {', '.join(sorted(known))})")
        setattr(config, section, replace(current, **entries))
    _check(config)
    return config


def _check(config: ExperimentConfig) -> None:
    from sftool.partitioners import parse_scheme

    bad = [m for m in config.sweep.methods if m not in METHODS]
    if bad:
        raise SftoolError(f"unknown method(s) {', '.join(bad)} (have: {', '.join(METHODS)})")
    for scheme in config.sweep.schemes:
        parse_scheme(scheme)
    bad = [p for p in config.sweep.precisions if p not in ("fp32", "int8")]
    if bad:
        raise SftoolError(f"precisions are fp32 or int8, not {', '.join(bad)}")
    t = config.train
    if min(t.devices, t.batch_size, t.device_batch_size, t.epochs, config.fedlora.local_steps) < 1:
        raise SftoolError("devices, batch sizes, epochs and local_steps must be >= 1")


@dataclass(frozen=True)
class RunKey:
    """One run of a sweep."""

    method: str
    dataset: str
    scheme: str
    seed: int
    precision: str = "fp32"

    @property
    def id(self) -> str:
        return f"{self.method}/{self.precision}/{self.dataset}/{self.scheme}/seed{self.seed}"


def expand(config: ExperimentConfig) -> list[RunKey]:
    """Every run of the sweep; device precision varies for SplitFrozen only (it alone runs ONNX)."""
    s = config.sweep
    keys = []
    for dataset in s.datasets:
        for scheme in s.schemes:
            for seed in s.seeds:
                for method in s.methods:
                    for precision in s.precisions if method == "splitfrozen" else ["fp32"]:
                        keys.append(RunKey(method, dataset, scheme, seed, precision))
    return keys


# ------------------------------------------------------------------------------------------ assets


class Workspace:
    """What the runs of a sweep share: the model, its exports, the data splits (built once)."""

    def __init__(self, out: Path, config: ExperimentConfig, log: Callable[[str], None]):
        self.out = Path(out)
        self.config = config
        self.log = log
        self._source: str | None = None

    def source(self) -> str:
        if self._source is None:
            from sftool import synthetic

            src = self.config.model.source
            if src == synthetic.TINY_MODEL:
                src = str(synthetic.tiny_model(self.out / "assets" / synthetic.TINY_MODEL))
            else:
                from sftool import assets

                if src in assets.MODELS:
                    src = str(assets.ensure_model(src, self.log))
            self._source = src
        return self._source

    def artifacts(self, precision: str) -> Path:
        """The device export at the configured split (with int8 variants when int8 is swept)."""
        from sftool.exporters.onnx_export import ExportOptions, export_device

        folder = self.out / "artifacts" / f"split-{self.config.model.split}"
        if not (folder / "manifest.json").is_file():
            int8 = ["auto"] if "int8" in self.config.sweep.precisions else []
            self.log(f"exporting {self.config.model.source} split {self.config.model.split} to {folder}")
            export_device(ExportOptions(self.source(), self.config.model.split, folder,
                                        max_seq_len=self.config.train.max_len, int8_targets=int8),
                          log=lambda m: self.log(f"  export: {m}"))
        return folder

    def data(self, dataset: str, scheme: str, seed: int) -> Path:
        """``sftool data split`` files for (data set, scheme, seed): the shards every method shares."""
        from sftool import assets, synthetic
        from sftool import datasets as ds
        from sftool.cli_data import make_split

        folder = self.out / "data" / f"{dataset}-{scheme.replace(':', '')}-seed{seed}"
        if (folder / "eval.jsonl").is_file():
            return folder
        source, text_fields, label_field = dataset, None, None
        if dataset == synthetic.SYNTHETIC:
            source = str(synthetic.write_synthetic(self.out / "assets" / "synthetic.jsonl"))
            text_fields, label_field = ["text"], "label"
        elif dataset in ds.BUILTINS:
            assets.fetch([ds.builtin(dataset).asset], self.log)  # on first need
        make_split(source, self.config.train.devices, scheme, seed, folder, text_fields, label_field)
        return folder


# ------------------------------------------------------------------------------------------ one run


@dataclass
class RunData:
    """What every method's run reads from the workspace: the shards, the eval rows, the export."""

    folder: Path
    label_names: list[str]
    artifacts: Path
    manifest: Any
    encoder: Any
    shard_examples: dict[str, list]
    eval_examples: list
    #: Token lengths of every training example (what the FLOP count integrates over).
    lengths: list[int]

    @property
    def n_train(self) -> int:
        return sum(len(v) for v in self.shard_examples.values())


def load_run_data(key: RunKey, ws: Workspace) -> RunData:
    from sftool.runtime.local_data import TextEncoder, read_examples
    from sftool.runtime.manifest import load_manifest

    folder = ws.data(key.dataset, key.scheme, key.seed)
    artifacts = ws.artifacts(key.precision)
    manifest = load_manifest(artifacts)
    encoder = TextEncoder(artifacts / manifest.tokenizer_file, min(ws.config.train.max_len, manifest.max_seq_len),
                          manifest.pad_token_id)
    shards = sorted(folder.glob("device-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    shard_examples = {f"device-{i}": ex for i, p in enumerate(shards) if (ex := read_examples(p))}
    return RunData(folder, json.loads((folder / "label_map.json").read_text())["label_names"], artifacts, manifest,
                   encoder, shard_examples, read_examples(folder / "eval.jsonl"),
                   encoder.lengths([e.text for ex in shard_examples.values() for e in ex]))


def run_one(key: RunKey, ws: Workspace, run_dir: Path | None = None) -> dict[str, Any]:
    """Train and evaluate one method on one partition; returns the result record."""
    import torch
    from sftool.flops import count_flops
    from sftool.server.accelerator import resolve_device, resolve_precision
    from sftool.server.checkpoint import TrainingProgress
    from sftool.server.split_model import SplitModelSpec, SplitServerModel
    from sftool.training.ledger import Ledger
    from sftool.training.loop import Budget, TrainingLoop
    from sftool.training.run_logger import RunLogger
    from sftool.training.task import ClassificationTask

    cfg = ws.config
    if key.method == "splitfrozen":
        return _run_splitfrozen(key, ws, run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_run_data(key, ws)
    task = ClassificationTask(len(data.label_names), tuple(data.label_names))
    budget = Budget(max_samples=cfg.train.epochs * data.n_train)
    steps_total = math.ceil(budget.max_samples / cfg.train.batch_size)

    torch.manual_seed(key.seed)
    random.seed(key.seed)
    k = cfg.model.split
    lora, optim = cfg.lora, cfg.optim
    device_side = key.method in ("splitlora", "fedlora", "ffa", "centralized-all")
    device = resolve_device(cfg.train.accelerator)
    model = SplitServerModel(SplitModelSpec(ws.source(), task, [k], data.manifest.pad_token_id, lora,
                                            lora_layers=range(data.manifest.num_layers) if device_side else None,
                                            recompute=cfg.train.recompute,
                                            precision=resolve_precision(cfg.train.precision, device))).to(device)
    method, source, evaluate_fn = _build_method(key, cfg, model, task, optim, data)
    ledger = Ledger()
    progress = TrainingProgress()
    logger = RunLogger(run_dir or Path("."), enabled=run_dir is not None)
    curve: list[dict] = []

    def evaluate() -> None:
        r = evaluate_fn()
        curve.append({"step": progress.step, "samples": progress.samples_trained, **r})

    every = max(1, steps_total // max(1, cfg.train.evals)) if cfg.train.evals else 0
    loop = TrainingLoop(method, source, ledger, logger, progress, budget, eval_every=every, evaluate=evaluate)
    started = time.perf_counter()

    def show() -> None:
        r = loop.stats.last_step
        ws.log(f"  {key.id}: step {progress.step}/~{steps_total}, {progress.samples_trained} samples"
               + (f", loss {r.loss:.4f}" if r else ""))

    if cfg.train.evals:
        evaluate()  # before training, as serve does: where every curve starts
    reason = loop.run(show, progress_every_s=PROGRESS_EVERY_S)
    method.finish()
    wall = time.perf_counter() - started
    final = evaluate_fn()
    curve.append({"step": progress.step, "samples": progress.samples_trained, **final})
    if run_dir is not None:
        method.save_adapter(run_dir / "adapter")
        logger.close()

    flops = count_flops(model.config, _flops_method(key.method), k, data.lengths, cfg.lora.rank, cfg.lora.targets,
                        task.num_labels)
    samples = progress.samples_trained
    return {
        "run": key.id, **asdict(key), "stopped": reason,
        "accuracy": final["accuracy"], "loss": final["loss"], "eval_n": final["n"],
        "majority": _majority(data.eval_examples),
        "samples": samples, "steps": progress.step, "wall_s": wall,
        "device_s_per_sample": method.device_s / max(samples, 1), "device_s_per_sample_cached": None,
        "device_flops_per_sample": flops.device, "server_flops_per_sample": flops.server,
        "bytes_up": method.bytes_up, "bytes_down": method.bytes_down,
        "server_s": loop.stats.train_s - loop.stats.device_s,
        "losses": _step_losses(run_dir) if run_dir is not None else None,
        "curve": curve,
    }


def _run_splitfrozen(key: RunKey, ws: Workspace, run_dir: Path | None) -> dict[str, Any]:
    """SplitFrozen through ``serve_in_process``: the server's own trainer, devices on the exported ONNX."""
    import tempfile

    from sftool.exporters.model_source import load_config
    from sftool.flops import count_flops
    from sftool.runtime.activation_noise import NoiseDefense
    from sftool.server.serve import ServeOptions, serve_in_process
    from sftool.training.sources import SimulatedDevice

    cfg = ws.config
    data = load_run_data(key, ws)
    steps_total = math.ceil(cfg.train.epochs * data.n_train / cfg.train.batch_size)
    with tempfile.TemporaryDirectory(prefix="sftool-run-") as tmp:
        out = run_dir or Path(tmp)
        opts = ServeOptions(
            source=ws.source(), artifacts=[data.artifacts], out=out, num_labels=len(data.label_names),
            label_names=data.label_names, devices=len(data.shard_examples), batch_size=cfg.train.batch_size,
            mix_capacity=cfg.train.mix_capacity, max_samples=cfg.train.epochs * data.n_train, seed=key.seed,
            lora=cfg.lora, optim=cfg.optim, threads=cfg.train.threads, eval_data=data.folder / "eval.jsonl",
            eval_every=max(1, steps_total // cfg.train.evals) if cfg.train.evals else 0,
            eval_precision=key.precision, checkpoint_every=0,
        )
        devices = [SimulatedDevice(d, ex, cfg.train.device_batch_size, cfg.train.epochs)
                   for d, ex in data.shard_examples.items()]

        def show(p) -> None:
            ws.log(f"  {key.id}: step {p.steps}/~{steps_total}, {p.samples} samples, loss {p.loss:.4f}")

        summary = serve_in_process(opts, devices, key.precision, on_progress=show, log_line=lambda m: None,
                                   progress_every_s=PROGRESS_EVERY_S,
                                   defense=NoiseDefense(ratio=cfg.train.noise_ratio, seed=key.seed))
        losses = _step_losses(out)
    flops = count_flops(load_config(ws.source()), "splitfrozen", data.manifest.split, data.lengths, cfg.lora.rank,
                        cfg.lora.targets, len(data.label_names))
    final = summary["eval_after"]
    samples = summary["samples_trained"]
    device_s = summary["device_compute_s"]
    return {
        "run": key.id, **asdict(key), "stopped": summary["stopped"], "noise_ratio": cfg.train.noise_ratio,
        "accuracy": final["accuracy"], "loss": final["loss"], "eval_n": final["n"],
        "majority": _majority(data.eval_examples),
        "samples": samples, "steps": summary["steps"], "wall_s": summary["wall_s"],
        "device_s_per_sample": device_s / max(samples, 1),
        # With the activation cache a SplitFrozen device computes each sample once, not once per epoch.
        "device_s_per_sample_cached": device_s / max(samples, 1) / cfg.train.epochs,
        "device_flops_per_sample": flops.device, "server_flops_per_sample": flops.server,
        "bytes_up": summary["bytes_received"], "bytes_down": 0, "server_s": summary["train_compute_s"],
        "losses": losses,
        "curve": [{k: e[k] for k in ("step", "samples", "accuracy", "loss", "n")} for e in summary["evals"]],
    }


def _flops_method(method: str) -> str:
    return {"centralized-all": "centralized"}.get(method, method)


def _majority(examples) -> float:
    from collections import Counter

    counts = Counter(e.label for e in examples)
    return max(counts.values()) / len(examples) if examples else float("nan")


def _step_losses(run_dir: Path) -> list[float]:
    from sftool.training.run_logger import read_metrics

    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r and "eval" not in r]


def _token_eval(logits_fn, model, task, encoder, examples, batch_size: int = 32) -> Callable[[], dict]:
    """Accuracy and loss of a torch model that takes tokens (methods that train device layers)."""
    import torch
    from sftool.runtime.local_data import bucketed_batches
    from sftool.training.task import Score

    batches = bucketed_batches(encoder.lengths([e.text for e in examples]), batch_size, window=len(examples))
    encoded = [(encoder.encode([examples[i].text for i in idx]), task.labels_tensor([examples[i].label for i in idx]))
               for idx in batches]

    def evaluate() -> dict:
        started = time.perf_counter()
        was = model.training
        model.eval()
        score = Score()
        at = model.device
        with torch.no_grad():
            for (ids, mask), labels in encoded:
                score.add(task.score(logits_fn(torch.from_numpy(ids).to(at), torch.from_numpy(mask).to(at)), labels.to(at)))
        model.train(was)
        return {"accuracy": score.accuracy, "loss": score.loss, "n": score.count, "seconds": time.perf_counter() - started}

    return evaluate


def _build_method(key: RunKey, cfg: ExperimentConfig, model, task, optim: OptimSettings, data: RunData):
    """(method, batch source, evaluation) of a method that trains on tokens."""
    from sftool.training.sources import ShardBatches, SimulatedDevice, interleave, plan_of, rounds

    batch = cfg.train.batch_size
    encoder, shard_examples = data.encoder, data.shard_examples
    shard_sizes = {d: len(ex) for d, ex in shard_examples.items()}
    evaluation = partial(_token_eval, model=model, task=task, encoder=encoder, examples=data.eval_examples)
    if key.method in ("splitlora", "fedlora", "ffa"):  # these train on each device's own shard
        devs = [SimulatedDevice(d, ex, batch, cfg.train.epochs).make_plan(encoder) for d, ex in shard_examples.items()]
    if key.method == "splitlora":
        from sftool.training.methods.splitlora import SplitLoRA

        method = SplitLoRA(model, cfg.model.split, optim, shard_sizes, cfg.splitlora.aggregate_every, cfg.splitlora.weighted)
        return method, ShardBatches(devs, encoder, task, interleave(plan_of(devs))), evaluation(method.logits)
    if key.method in ("fedlora", "ffa"):
        from sftool.training.methods.fedlora import FedLoRA

        method = FedLoRA(model, optim, shard_sizes, cfg.fedlora.local_steps, ffa=key.method == "ffa")
        # As many rounds as the sample budget needs: the budget stops the loop.
        return method, ShardBatches(devs, encoder, task, rounds(devs, None, cfg.fedlora.local_steps)), evaluation(method.logits)
    from sftool.training.methods.centralized import Centralized

    pooled = [e for ex in shard_examples.values() for e in ex]
    random.Random(key.seed).shuffle(pooled)
    dev = SimulatedDevice("pooled", pooled, batch, cfg.train.epochs).make_plan(encoder)
    method = Centralized(model, optim)
    return method, ShardBatches([dev], encoder, task, [("pooled", s) for s in dev.seqs()]), evaluation(method.logits)


# ------------------------------------------------------------------------------------------ the sweep


def read_results(out: Path) -> list[dict]:
    path = Path(out) / RESULTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sweep(config: ExperimentConfig, out: Path, log: Callable[[str], None] = print,
              keep_runs: bool = False) -> list[dict]:
    """Run every run of the sweep not already in ``out/results.jsonl``; write the report."""
    from sftool.experiment_report import write_report
    from sftool.run_folder import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.as_dict())
    done = {r["run"] for r in read_results(out)}
    keys = expand(config)
    todo = [k for k in keys if k.id not in done]
    log(f"{len(keys)} runs, {len(keys) - len(todo)} already done, {len(todo)} to run; results in {out / RESULTS}")
    ws = Workspace(out, config, log)
    started = time.perf_counter()
    for i, key in enumerate(todo, 1):
        t0 = time.perf_counter()
        run_dir = out / "runs" / key.id.replace("/", "_") if keep_runs else None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        result = run_one(key, ws, run_dir)
        with open(out / RESULTS, "a") as fh:
            fh.write(json.dumps(result) + "\n")
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (len(todo) - i)
        log(f"[{i}/{len(todo)}] {key.id}: accuracy {result['accuracy']:.4f} (majority {result['majority']:.3f}), "
            f"{result['samples']} samples in {time.perf_counter() - t0:.0f}s; about {eta / 60:.0f} min left")
    results = read_results(out)
    write_report(results, out, config)
    return results
