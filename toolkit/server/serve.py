"""`sftool serve`: receive activation streams from devices and train LoRA on the server layers.

Pipeline: receiver thread (ZeroMQ) -> bounded queue -> this (trainer) thread: ingest into the
mixing buffer (catching up devices with an earlier split), draw mixed batches, train, report.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from sftool.errors import SftoolError
from sftool.run_config import RUN_CONFIG, load_run_config, write_run_config
from sftool.run_folder import read_run_record, write_run_record, write_summary
from sftool.runtime.local_data import read_examples, read_prompt_answer, task_token_labels
from sftool.runtime.manifest import Manifest, load_manifest, manifest_sha256
from sftool.server.accelerator import describe, resolve_device, resolve_precision, return_freed_memory
from sftool.server.activation_cache import ActivationCache
from sftool.server.checkpoint import (
    TrainingProgress,
    adapter_weights_file,
    latest_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    save_checkpoint,
)
from sftool.server.evaluate import Evaluator
from sftool.server.link_auth import LinkAuth, link_auth_for
from sftool.server.mixing import POLICIES, MixingBuffer
from sftool.server.receiver import AcceptedSplit, LinkLimits, ReceivedBatch, Receiver
from sftool.server.split_model import LoraSettings, SplitModelSpec, SplitServerModel
from sftool.server.trainer import OptimSettings, Trainer
from sftool.training.ledger import Ledger
from sftool.training.loop import Budget, TrainingLoop
from sftool.training.methods.splitfrozen import SplitFrozen
from sftool.training.run_logger import RunLogger
from sftool.training.sources import Inbox, MixedActivations, ReceiverInbox, SimulatedDevice, SimulatedInbox
from sftool.training.task import CausalLMTask, ClassificationTask, Task

log = logging.getLogger("sftool.server")
SCHEDULES = ("pipelined", "sequential")


@dataclass
class ServeOptions:
    source: str
    artifacts: Sequence[Path]
    bind: str = "tcp://127.0.0.1:5555"
    out: Path = Path("runs/latest")
    #: "classification", or "causal-lm" (devices send token labels; the loss covers answer tokens).
    task: str = "classification"
    num_labels: int = 2
    label_names: Sequence[str] | None = None
    #: causal-lm: the prompt field(s), the answer field and the prompt template of --eval-data rows
    #: (the devices are given theirs: ``sftool device --task causal-lm``).
    prompt_fields: Sequence[str] = ("question",)
    answer_field: str = "answer"
    prompt_template: str | None = None
    devices: int = 1
    batch_size: int = 16
    mix_capacity: int = 256
    mixing: str = "mix"
    schedule: str = "pipelined"
    window: int = 4
    queue_size: int = 16
    max_steps: int | None = None
    max_samples: int | None = None
    device_timeout_s: float = 120.0
    #: Credits paced by each device's announced data size, so all finish together (receiver._ahead).
    pace: bool = True
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    threads: int | None = None
    #: Where the server trains: auto (CUDA when a GPU is visible), cpu or cuda (``sftool.server.accelerator``).
    accelerator: str = "auto"
    #: Compute precision of the server's forward: auto (bf16 on a GPU that has it, else fp32), fp32, bf16.
    precision: str = "auto"
    #: Recompute the server blocks' activations in the backward instead of keeping them (less memory).
    recompute: bool = False
    #: Held-out data (JSONL/CSV) evaluated before training, every ``eval_every`` steps, and at the end.
    eval_data: Path | None = None
    eval_text_fields: Sequence[str] = ("text",)
    eval_label_field: str = "label"
    eval_every: int = 0
    eval_precision: str = "fp32"
    #: Write a checkpoint every N steps (0: only when the run ends or is terminated).
    checkpoint_every: int = 50
    #: Continue the run in ``out`` from its latest checkpoint.
    resume: bool = False
    #: Record the (device, epoch, sample id) of every trained sample in metrics.jsonl.
    log_samples: bool = False
    #: Keep received activations (fp16, on disk) and replay later epochs without device compute.
    cache_activations: bool = False
    cache_max_gb: float = 4.0
    #: Largest |activation| accepted from a device (None: the export's calibrated maximum x 8).
    activation_bound: float | None = None
    #: Device sessions at once (None: twice ``devices``, at least ``devices`` + 8).
    max_devices: int | None = None
    #: Invalid messages (or non-finite steps) from one device before it is disconnected.
    max_strikes: int = 16
    #: CurveZMQ: the server's NAME.key_secret and the folder of allow-listed DEVICE_ID.key files.
    curve_secret: Path | None = None
    allow_keys: Path | None = None
    #: Allow a plain (unauthenticated, unencrypted) link on a non-loopback endpoint.
    insecure: bool = False


@dataclass
class Progress:
    """What the progress line shows; handed to the UI callback."""

    samples: int
    steps: int
    loss: float
    accuracy: float
    samples_per_s: float
    queue_depth: int
    buffered: int
    devices_connected: int
    devices_finished: int
    trainer_idle: float


def _load_accepted(opts: ServeOptions) -> dict[str, AcceptedSplit]:
    accepted: dict[str, AcceptedSplit] = {}
    # The wire validates labels against the task's label spec (class ids 0..num_values-1 for classification).
    spec = task_of(opts).label_spec
    for folder in opts.artifacts:
        manifest = load_manifest(folder)
        sha = manifest_sha256(folder)
        if any(a.manifest.split == manifest.split for a in accepted.values()):
            raise SftoolError(f"two artifacts folders export split {manifest.split}; give one per split")
        schema = manifest.batch_schema(spec.num_values, opts.activation_bound, token_labels=bool(spec.dims))
        accepted[sha] = AcceptedSplit(sha, manifest, schema)
    if not accepted:
        raise SftoolError("give at least one --artifacts folder (the device export this server accepts)")
    return accepted


def _check_model_matches(model: SplitServerModel, manifests: list[tuple[Path, Manifest]]) -> None:
    for folder, m in manifests:
        if m.family != model.adapter.name or m.num_layers != model.num_layers or m.hidden_size != model.hidden_size:
            raise SftoolError(
                f"{folder} was exported from a {m.family} model with {m.num_layers} blocks of width {m.hidden_size}; "
                f"the server model is {model.adapter.name} with {model.num_layers} blocks of width {model.hidden_size}"
            )
        if model.fingerprints[m.split] != m.weights_fingerprint:
            raise SftoolError(
                f"the server's copy of blocks 0..{m.split - 1} differs from the weights exported in {folder}: "
                "serve the same model the devices were exported from"
            )


def task_of(opts: ServeOptions) -> Task:
    """The task a run trains: classification (the number of labels and their names), or next-token
    prediction on the answers over the model's vocabulary."""
    if task_token_labels(opts.task):
        from sftool.exporters.model_source import load_config

        return CausalLMTask(int(load_config(opts.source).vocab_size))
    return ClassificationTask(opts.num_labels, tuple(opts.label_names) if opts.label_names else None)


def _build_model(opts: ServeOptions, log_line: Callable[[str], None]) -> tuple[SplitServerModel, list[tuple[Path, Manifest]]]:
    manifests = [(Path(f), load_manifest(f, verify_files=False)) for f in opts.artifacts]
    log_line(f"loading {opts.source} (splits {sorted(m.split for _, m in manifests)})")
    device = resolve_device(opts.accelerator)
    precision = resolve_precision(opts.precision, device)
    if opts.recompute:
        return_freed_memory()
    model = SplitServerModel(
        SplitModelSpec(opts.source, task_of(opts), [m.split for _, m in manifests], manifests[0][1].pad_token_id,
                       opts.lora, recompute=opts.recompute, precision=precision)
    )
    _check_model_matches(model, manifests)  # before the move: fingerprints are of the CPU weights
    model.to(device)
    log_line(f"training on {describe(device, precision)}" + (", block activations recomputed" if opts.recompute else ""))
    return model, manifests


def evaluate_run(
    run_dir: Path, precision: str = "fp32", eval_data: Path | None = None, log_line: Callable[[str], None] = print
) -> dict:
    """Evaluate a finished run's adapter (LoRA + head) through its device artifacts in ``precision``.

    The same trained model with fp32 or int8 device activations is a paired comparison: it isolates
    what int8 costs at inference from the run-to-run noise of training.
    """
    opts = replace(load_run_options(run_dir), eval_precision=precision)
    if eval_data is not None:
        opts = replace(opts, eval_data=Path(eval_data))
    if opts.eval_data is None:
        raise SftoolError(f"{run_dir} was trained without --eval-data; give the data to evaluate on")
    adapter_weights_file(Path(run_dir) / "adapter")  # fail before loading the model
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model, manifests = _build_model(opts, log_line)
    load_adapter_weights(model, Path(run_dir) / "adapter")
    evaluator = _make_evaluator(opts, model, manifests)
    outcome = evaluator.evaluate().as_dict()
    return {**outcome, "precision": evaluator.device.variant.label, "eval_data": str(opts.eval_data)}


class StreamTrainer:
    """One ``sftool serve`` run assembled from the core's parts: the receiver's inbox feeding the
    mixing buffer (``MixedActivations``), the ledger, the run logger, the SplitFrozen method, and
    the one training loop; plus the checkpoint and evaluation it schedules."""

    def __init__(
        self,
        opts: ServeOptions,
        model: SplitServerModel,
        inbox: Inbox,
        evaluator: Evaluator | None = None,
        receiver: Receiver | None = None,
    ):
        self.opts = opts
        self.evaluator = evaluator
        self.model = model
        self.receiver = receiver
        self.trainer = Trainer(model, opts.optim)
        sequential = opts.schedule == "sequential"
        # Sequential split learning trains each batch as it comes; waiting to fill a mixing buffer
        # there would deadlock (devices wait for the ACK that training gives).
        self.buffer = MixingBuffer(opts.batch_size, opts.mix_capacity, "fifo" if sequential else opts.mixing, opts.seed)
        self.progress_state = TrainingProgress()
        self.ledger = Ledger(on_settled=receiver.acknowledge if sequential and receiver else None)
        self.cache: ActivationCache | None = None
        if opts.cache_activations:
            self.cache = ActivationCache(Path(opts.out) / "activation_cache", model.hidden_size, int(opts.cache_max_gb * 2**30))
        self.source = MixedActivations(inbox, model, self.buffer, self.ledger, self.cache, sequential)
        if self.cache is not None and receiver is not None:
            receiver.plan_skip_epochs = self.source.plan_skip_epochs
        self.logger = RunLogger(Path(opts.out), log_samples=opts.log_samples)
        self._log_line: Callable[[str], None] | None = None
        self.loop = TrainingLoop(
            SplitFrozen(model, self.trainer), self.source, self.ledger, self.logger, self.progress_state,
            Budget(opts.max_steps, opts.max_samples), opts.eval_every, opts.checkpoint_every,
            evaluate=lambda: self.evaluate(self._log_line), checkpoint=self.checkpoint,
            extra_metrics=lambda: {"queue_depth": float(self.source.depth())},
            on_refused=self._flag_devices,
        )

    def _flag_devices(self, batch) -> None:
        """A step on this batch was not finite and was not applied: each device in it gets a strike."""
        if self.receiver is None:
            return
        for device in sorted({k.device for k in batch.keys}):
            self.receiver.flag(device, "a training step on this device's samples was not finite")

    @property
    def samples_trained(self) -> int:
        return self.progress_state.samples_trained

    @property
    def evals(self) -> list[dict]:
        return self.progress_state.evals

    @property
    def samples_replayed(self) -> int:
        return self.source.samples_replayed

    @property
    def stop_requested(self) -> str | None:
        return self.loop.stop_requested

    @stop_requested.setter
    def stop_requested(self, reason: str | None) -> None:
        self.loop.stop_requested = reason

    def done_seqs(self, device: str) -> list[list[int]]:
        """Seqs of ``device`` already trained, as ranges: what a device need not send again."""
        return self.ledger.done_seqs(device)

    def resume(self, folder: Path, log_line: Callable[[str], None]) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG, and what each device has had trained."""
        state = load_checkpoint(folder, self.model, self.trainer, self.buffer.rng)
        self.progress_state.__dict__.update(vars(state))
        self.ledger.load(state.trained, state.done_seqs)
        if self.cache is not None:
            self.cache.load_index()
        self.logger.rewind(state.step)
        log_line(f"resumed from {folder.name}: step {state.step}, {state.samples_trained} samples trained")

    def checkpoint(self) -> Path:
        p = self.progress_state
        p.step = self.trainer.step_count
        p.trained, p.done_seqs = self.ledger.state()
        p.finished_devices = sorted(
            set(p.finished_devices)
            | {name for name, s in self.sessions().items() if s.said_bye and not self.ledger.pending_from(name)}
        )
        if self.cache is not None:
            self.cache.save_index()
        return save_checkpoint(Path(self.opts.out), self.model, self.trainer, self.buffer.rng, p)

    def evaluate(self, log_line: Callable[[str], None] | None = None) -> dict | None:
        """Evaluate now (if there is held-out data); the result is logged with the step it was taken at."""
        if self.evaluator is None:
            return None
        result = {"step": self.trainer.step_count, "samples": self.samples_trained, **self.evaluator.evaluate().as_dict()}
        self.evals.append(result)
        self.logger.evaluation(result)
        if log_line:
            log_line(f"eval at step {result['step']}: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
                     f"({result['n']} examples, {result['seconds']:.1f}s)")
        return result

    def sessions(self) -> dict:
        """The receiver's device sessions (none for devices simulated in this process)."""
        return self.receiver.snapshot() if self.receiver is not None else {}

    def progress(self) -> Progress:
        sessions = self.sessions()
        elapsed = max(1e-9, time.perf_counter() - self.loop.stats.started)
        return Progress(
            samples=self.samples_trained,
            steps=self.trainer.step_count,
            loss=self.trainer.recent_loss,
            accuracy=self.trainer.recent_accuracy,
            samples_per_s=self.samples_trained / elapsed,
            queue_depth=self.source.depth(),
            buffered=len(self.buffer),
            devices_connected=sum(1 for s in sessions.values() if not s.finished),
            devices_finished=sum(1 for s in sessions.values() if s.finished),
            trainer_idle=self.source.idle_s / elapsed,
        )

    def run(
        self,
        on_progress: Callable[[Progress], None] | None = None,
        progress_every_s: float = 2.0,
        log_line: Callable[[str], None] | None = None,
    ) -> str:
        """Train until the budget is reached, every expected device is done, or a stop is requested."""
        self._log_line = log_line
        report = (lambda: on_progress(self.progress())) if on_progress else None
        return self.loop.run(report, progress_every_s)

    @property
    def train_s(self) -> float:
        return self.loop.stats.train_s

    @property
    def idle_s(self) -> float:
        return self.source.idle_s

    def close(self) -> None:
        self.logger.close()
        if self.cache is not None:
            self.cache.close()


def _prepare(opts: ServeOptions, log_line: Callable[[str], None]):
    """What every run needs before batches flow: the run folder, the accepted exports, the model, the evaluator."""
    _check_options(opts)
    out = Path(opts.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SftoolError(f"cannot create run folder {out}: {exc.strerror}") from None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    accepted = _load_accepted(opts)
    model, manifests = _build_model(opts, log_line)
    evaluator = _make_evaluator(opts, model, manifests)  # before binding: a bad eval file fails fast
    n_train = sum(p.numel() for p in model.trainable_parameters())
    log_line(f"training blocks {model.train_from}..{model.num_layers - 1} with LoRA r={opts.lora.rank} + head: {n_train:,} trainable parameters")
    return out, accepted, model, manifests, evaluator


def serve(
    opts: ServeOptions,
    on_progress: Callable[[Progress], None] | None = None,
    log_line: Callable[[str], None] = print,
) -> dict:
    """Run the server until done; save the adapter and a summary into ``opts.out``. Returns the summary.

    The adapter and summary are written however the run ends (budget, all devices done, Ctrl-C):
    what was trained is never lost.
    """
    link = link_auth_for(opts.bind, opts.curve_secret, opts.allow_keys, opts.insecure)  # before the model loads
    if link is None:
        return _serve(opts, None, on_progress, log_line)
    link.start()  # the ZAP handler must be up before the receiver binds, or the first devices pass unchecked
    try:
        return _serve(opts, link, on_progress, log_line)
    finally:
        link.stop()


def _serve(opts: ServeOptions, link: LinkAuth | None, on_progress, log_line: Callable[[str], None]) -> dict:
    out, accepted, model, manifests, evaluator = _prepare(opts, log_line)
    # Arrival order decides nothing when batches are released in the fixed order (pipelined, paced,
    # a fresh run); a resumed run continues from a checkpoint whose buffer contents are gone anyway.
    ordered = opts.schedule == "pipelined" and opts.pace and not opts.resume
    batches: queue.Queue[ReceivedBatch] = queue.Queue(maxsize=opts.queue_size)
    receiver = Receiver(
        opts.bind,
        accepted,
        batches,
        window=opts.window,
        ack="trained" if opts.schedule == "sequential" else ("taken" if ordered else "queued"),
        device_timeout_s=opts.device_timeout_s,
        pace=opts.pace,
        limits=_link_limits(opts),
        **(link.receiver_options() if link is not None else {}),
    )

    def expected_devices() -> int:  # devices that finished before a restart do not come back
        return opts.devices - len(stream.progress_state.finished_devices)

    inbox = ReceiverInbox(receiver, batches, expected_devices, ordered=ordered)
    stream = StreamTrainer(opts, model, inbox, evaluator, receiver=receiver)
    receiver.done_seqs_for = stream.done_seqs

    def start() -> None:
        receiver.start()
        security = f"CurveZMQ, {len(link.device_keys)} allow-listed key(s)" if link is not None else "plain"
        log_line(f"listening on {receiver.endpoint} ({security}) for {opts.devices} device(s), {opts.schedule} schedule, "
                 f"mixing={opts.mixing}")

    def stop(reason: str) -> None:
        receiver.request_stop(reason)
        receiver.join_stopped(timeout=5)

    return _drive(opts, stream, accepted, start, stop, on_progress, log_line)


def _link_limits(opts: ServeOptions) -> LinkLimits:
    sessions = opts.max_devices or max(2 * opts.devices, opts.devices + 8)
    return LinkLimits(max_sessions=sessions, max_strikes=opts.max_strikes, max_known_devices=4 * sessions)


def serve_in_process(
    opts: ServeOptions,
    devices: Sequence[SimulatedDevice],
    precision: str = "fp32",
    on_progress: Callable[[Progress], None] | None = None,
    log_line: Callable[[str], None] = print,
    progress_every_s: float = 2.0,
    defense=None,
) -> dict:
    """``serve`` with its devices simulated in this process: each runs the exported ONNX of the
    split over its shard, with the batch plan, the noise (``defense``, a NoiseDefense) and the wire
    cast of ``sftool device``, and its batches reach the same trainer in the order a live server
    releases them. Same run folder."""
    from sftool.runtime.local_data import TextEncoder
    from sftool.runtime.onnx_model import DeviceModel, SessionSettings, choose_variant

    if len(opts.artifacts) != 1:
        raise SftoolError("devices simulated in process run one export (one split)")
    out, accepted, model, manifests, evaluator = _prepare(opts, log_line)
    folder, manifest = manifests[0]
    device_model = DeviceModel(folder, manifest, choose_variant(manifest, precision), settings=SessionSettings(opts.threads))
    encoder = TextEncoder(folder / manifest.tokenizer_file, manifest.max_seq_len, manifest.pad_token_id)
    for d in devices:
        if not d.batches:
            d.make_plan(encoder)
    inbox = SimulatedInbox(devices, device_model, encoder, manifest.split, defense=defense)
    stream = StreamTrainer(replace(opts, devices=len(devices)), model, inbox, evaluator)
    return _drive(opts, stream, accepted, lambda: None, lambda reason: None, on_progress, log_line, progress_every_s)


def _drive(opts: ServeOptions, stream: StreamTrainer, accepted, start: Callable[[], None], stop: Callable[[str], None],
           on_progress, log_line: Callable[[str], None], progress_every_s: float = 2.0) -> dict:
    """Evaluate, train, evaluate; then, however the run ends, checkpoint, save the adapter, summarize."""
    out = Path(opts.out)
    if opts.resume:
        stream.resume(latest_checkpoint(out), log_line)
    else:
        write_run_record(out, _run_record(opts, accepted))
        write_run_config(out, opts)
    # Listen first: devices connect and fill their windows while the first evaluation runs.
    start()
    eval_before = (stream.evals[0] if stream.evals else None) if opts.resume else stream.evaluate(log_line)
    restore_signal = _stop_on_sigterm(stream)
    started = time.perf_counter()
    ended: float | None = None
    reason = "interrupted"
    try:
        reason = stream.run(on_progress, progress_every_s, log_line=log_line)
        if reason != "terminated" and (not stream.evals or stream.evals[-1]["step"] != stream.trainer.step_count):
            stream.evaluate(log_line)
        ended = time.perf_counter()
    finally:
        restore_signal()
        stop(reason)
        # Whatever ended the run, what was trained is kept, and it can be resumed.
        stream.checkpoint()
        stream.close()
        stream.model.save_adapter(out / "adapter")
        # Wall time of the run itself: from listening to the last step/evaluation, without saving.
        summary = _summary(opts, stream, reason, (ended or time.perf_counter()) - started)
        summary["eval_before"] = eval_before
        summary["eval_after"] = stream.evals[-1] if len(stream.evals) > (eval_before is not None) else None
        summary["evals"] = stream.evals
        write_summary(out, summary)
    return summary


def _stop_on_sigterm(stream: StreamTrainer) -> Callable[[], None]:
    """SIGTERM ends the run cleanly (checkpoint, adapter, summary), like reaching the budget."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame) -> None:
        stream.stop_requested = "terminated"

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def load_run_options(run_dir: Path) -> ServeOptions:
    """The settings a run was started with: its run.toml (or, for older runs, run.json), to resume it."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)  # also: is this a run folder at all
    if (run_dir / RUN_CONFIG).is_file():
        return replace(load_run_config(run_dir / RUN_CONFIG, ServeOptions(source="", artifacts=[])), out=run_dir)
    o = dict(record["options"])
    o["lora"] = LoraSettings(**o["lora"])
    o["optim"] = OptimSettings(**o["optim"])
    o["artifacts"] = [Path(p) for p in record["artifacts"]]
    o["label_names"] = record.get("label_names")
    o["out"] = run_dir
    for key in ("eval_data",):
        if o.get(key):
            o[key] = Path(o[key])
    known = ServeOptions.__dataclass_fields__
    return ServeOptions(**{k: v for k, v in o.items() if k in known})


def _check_options(opts: ServeOptions) -> None:
    if opts.schedule not in SCHEDULES:
        raise SftoolError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if opts.mixing not in POLICIES:
        raise SftoolError(f"--mixing must be one of {', '.join(POLICIES)}")
    if opts.devices < 1 or opts.batch_size < 1 or opts.window < 1 or opts.queue_size < 1:
        raise SftoolError("--devices, --batch-size, --window and --queue-size must be >= 1")
    if opts.label_names and len(opts.label_names) != opts.num_labels:
        raise SftoolError(f"{len(opts.label_names)} label names for {opts.num_labels} labels")


def _run_record(opts: ServeOptions, accepted: dict[str, AcceptedSplit]) -> dict:
    return {
        "source": opts.source,
        "artifacts": [str(p) for p in opts.artifacts],
        "manifests": {sha: a.manifest.split for sha, a in accepted.items()},
        "num_labels": opts.num_labels,
        "label_names": list(opts.label_names) if opts.label_names else None,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("artifacts", "label_names")},
    }


def _make_evaluator(opts: ServeOptions, model: SplitServerModel, manifests: list[tuple[Path, Manifest]]) -> Evaluator | None:
    if opts.eval_data is None:
        return None
    folder, manifest = next((f, m) for f, m in manifests if m.split == model.train_from)
    if opts.task == "causal-lm":
        examples = read_prompt_answer(opts.eval_data, opts.prompt_fields, opts.answer_field,
                                      template=opts.prompt_template)
    else:
        examples = read_examples(opts.eval_data, opts.eval_text_fields, opts.eval_label_field, label_names=opts.label_names)
        if any(not 0 <= e.label < opts.num_labels for e in examples):
            raise SftoolError(f"{opts.eval_data}: labels outside 0..{opts.num_labels - 1}")
    return Evaluator(model, folder, manifest, examples, precision=opts.eval_precision, threads=opts.threads)


def _summary(opts: ServeOptions, stream: StreamTrainer, reason: str, wall_s: float) -> dict:
    receiver = stream.receiver
    sessions = stream.sessions()
    refused = stream.progress_state.refused_by_device
    return {
        "stopped": reason,
        "samples_trained": stream.samples_trained,
        "steps": stream.trainer.step_count,
        "final_loss": stream.trainer.recent_loss,
        "train_accuracy": stream.trainer.recent_accuracy,
        "bytes_received": stream.source.inbox.bytes_received,
        "device_compute_s": stream.source.inbox.device_compute_s,
        "wall_s": wall_s,
        "train_compute_s": stream.train_s,
        "samples_replayed_from_cache": stream.samples_replayed,
        "eval_compute_s": sum(e["seconds"] for e in stream.evals),
        "trainer_idle_fraction": stream.idle_s / max(wall_s, 1e-9),
        "errors_sent": receiver.errors_sent if receiver else 0,
        "devices": {
            name: {
                "split": s.split,
                "precision": s.precision,
                "wire_dtype": s.wire_dtype,
                "defense": s.defense,
                "batches": s.batches,
                "samples_received": s.samples,
                "samples_trained": stream.ledger.settled_samples(name) - refused.get(name, 0),
                "samples_refused": refused.get(name, 0),
                "bytes": s.bytes_received,
                "duplicates": s.duplicates,
                "rejected": s.rejected,
                "state": s.state,
            }
            for name, s in sessions.items()
        },
        "samples_refused": stream.progress_state.samples_refused,
        # Devices simulated in this process have no sessions: their one defense is recorded here.
        **({"simulated_defense": inbox_defense.wire()} if (inbox_defense := getattr(stream.source.inbox, "defense", None)) else {}),
        "adapter": str(Path(opts.out) / "adapter"),
    }
