"""`sftool device`: local data -> tokenizer -> ONNX device layers -> activation stream.

Torch-free by construction: this module and everything it imports use only numpy,
onnxruntime, pyzmq, msgpack and tokenizers (a test runs it where importing torch fails).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from sftool.errors import SftoolError
from sftool.runtime.activation_noise import NoiseDefense
from sftool.runtime.device_client import ClientConfig, DeviceClient, OutgoingBatch
from sftool.runtime.link_keys import check_plain_endpoint, load_keypair, load_public_key
from sftool.runtime.local_data import (
    TextEncoder,
    bucketed_batches,
    encode_examples,
    example_lengths,
    iter_epochs,
    read_examples,
    read_prompt_answer,
    task_token_labels,
)
from sftool.runtime.manifest import load_manifest, manifest_sha256
from sftool.runtime.onnx_model import DeviceModel, SessionSettings, choose_variant, cpu_target
from sftool.runtime.protocol import FP16_MAX, MsgType, batch_arrays, encode

WIRE_DTYPES = ("fp16", "fp32")
RUNTIMES = ("onnxruntime", "onnx")
#: How long a device waits for the server's WELCOME (a server loading a large model takes a while).
HELLO_TIMEOUT_S = 60.0


@dataclass
class DeviceOptions:
    artifacts: Path
    endpoint: str
    data: Path
    device_id: str
    text_fields: Sequence[str] = ("text",)
    label_field: str = "label"
    id_field: str = "id"
    label_names: Sequence[str] | None = None
    #: "classification" (a label per row), or "causal-lm": prompt and answer fields, token labels on
    #: the answer only (the server must train the same task).
    task: str = "classification"
    prompt_fields: Sequence[str] = ("question",)
    answer_field: str = "answer"
    #: Where the prompt goes in each causal-LM row's text (``{prompt}``), e.g. a chat template's turn.
    prompt_template: str | None = None
    batch_size: int = 8
    epochs: int = 1
    precision: str = "auto"
    wire_dtype: str = "fp16"
    threads: int | None = None
    #: Which files to run: "onnxruntime" (its optimized graphs and int8 models) or "onnx" (standard ONNX only).
    runtime: str = "onnxruntime"
    #: onnxruntime graph optimizations at load: disable|basic|extended|all (the export is saved at extended).
    ort_optimization: str = "basic"
    #: onnxruntime's CPU memory arena (off: lower resident memory, slightly slower).
    memory_arena: bool = True
    #: onnxruntime worker threads spin while idle (off: saves CPU/power between batches).
    spin: bool = True
    max_len: int | None = None
    bucket_window: int = 8
    server_timeout_s: float = 30.0
    #: How long to keep trying to reach the server (None: until stopped).
    connect_timeout_s: float | None = None
    #: CurveZMQ keys {"server_public", "public", "secret"}; ``server_key``/``device_key`` files fill them in.
    curve: dict[str, bytes] | None = None
    #: The server's public NAME.key and this device's NAME.key_secret (CurveZMQ).
    server_key: Path | None = None
    device_key: Path | None = None
    #: Allow a plain (unauthenticated, unencrypted) link to a non-loopback endpoint.
    insecure: bool = False
    #: Each batch takes this many times its measured compute (>= 1): the device sleeps for the rest,
    #: standing in for an edge CPU that much slower than this one.
    slowdown: float = 1.0
    #: Gaussian noise added to every real token's activation before the wire cast (docs/privacy.md).
    defense: NoiseDefense = field(default_factory=NoiseDefense)


@dataclass
class DeviceReport:
    device_id: str
    variant: str
    samples: int
    batches: int
    bytes_sent: int
    #: Seconds of real compute (tokenize + ONNX forward + cast), the sleeps of ``slowdown`` excluded.
    compute_s: float
    wall_s: float
    resent: int
    reconnects: int
    rejected: list[str] = field(default_factory=list)
    finished_by_server: str | None = None
    #: The compute an edge device ``slowdown`` times slower would have spent: compute_s x slowdown.
    slowed_s: float = 0.0
    slowdown: float = 1.0
    #: Wall-clock time (Unix seconds) when the first batch's compute began: lines the device up with
    #: the server's metrics.jsonl, whose step records carry the same clock.
    first_batch_unix: float | None = None
    #: Seconds from the first batch's compute to the last acknowledgement: the streaming alone, without
    #: the model load and the wait for the server that ``wall_s`` includes.
    stream_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def prepare_hidden(hidden: np.ndarray, wire_dtype: str) -> np.ndarray:
    """Cast activations for the wire. fp16 halves the bytes; a batch with values beyond fp16's
    range travels as fp32 instead of arriving as Inf."""
    if wire_dtype == "fp16" and np.abs(hidden).max(initial=0.0) < FP16_MAX:
        return hidden.astype(np.float16)
    return hidden.astype(np.float32, copy=False)


def device_activations(hidden: np.ndarray, attention_mask: np.ndarray, wire_dtype: str, defense: NoiseDefense,
                       rng: np.random.Generator) -> np.ndarray:
    """What leaves the device for one batch: the ONNX output with the defense's noise, cast for the
    wire. The one place noise is added, for real devices and the in-process simulated ones alike."""
    return prepare_hidden(defense.apply(hidden, attention_mask, rng), wire_dtype)


class LocalBatches:
    """The device's batch plan: seq -> (epoch, rows), built on demand (tokenize + ONNX forward).

    Seqs number the batches of all epochs in order, so the same seq always means the same rows;
    a server that restarted can ask for any of them again. With ``slowdown`` X > 1 each batch takes
    X times its measured compute: the device sleeps (X - 1) times it after the forward.
    """

    def __init__(self, examples, plan, epochs, skip_epochs, encoder, model, wire_dtype: str, device_id: str,
                 slowdown: float = 1.0, defense: NoiseDefense | None = None, token_labels: bool = False,
                 eos_token_id: int | None = None):
        check_slowdown(slowdown)
        self.examples = examples
        self.epochs_plan = list(iter_epochs(plan, epochs))
        self.skip = set(skip_epochs)
        self.encoder, self.model = encoder, model
        self.wire_dtype, self.device_id = wire_dtype, device_id
        self.slowdown = float(slowdown)
        self.token_labels, self.eos_token_id = token_labels, eos_token_id
        self.defense = defense or NoiseDefense()
        self.rng = self.defense.generator()
        self.compute_s = 0.0
        self.first_batch_unix: float | None = None
        self.first_batch_at: float | None = None  # perf_counter() of the same moment

    def seqs(self) -> list[int]:
        return [seq for seq, (epoch, _) in enumerate(self.epochs_plan) if epoch not in self.skip]

    def make(self, seq: int) -> OutgoingBatch:
        epoch, idx = self.epochs_plan[seq]
        rows = [self.examples[i] for i in idx]
        started = time.perf_counter()
        if self.first_batch_unix is None:
            self.first_batch_unix, self.first_batch_at = time.time(), started
        ids, mask, labels = encode_examples(self.encoder, rows, self.token_labels, self.eos_token_id)
        hidden = device_activations(self.model.forward(ids, mask), mask, self.wire_dtype, self.defense, self.rng)
        elapsed = time.perf_counter() - started
        self.compute_s += elapsed
        if self.slowdown > 1.0:
            # Sleeping, not spinning: the emulated edge time must not take CPU from the server and
            # the other devices sharing this machine, or it would slow them down as well.
            time.sleep((self.slowdown - 1.0) * elapsed)
        arrays = batch_arrays(hidden, mask, labels, np.array([r.sample_id for r in rows], dtype=np.int64))
        frames = encode(MsgType.BATCH, self.device_id, arrays, seq=seq, epoch=epoch)
        return OutgoingBatch(seq, len(rows), frames)


def check_slowdown(slowdown: float) -> None:
    """``--slowdown`` must be a finite factor >= 1 (a device cannot be made faster than it is)."""
    if not (slowdown >= 1.0 and slowdown != float("inf")):
        raise SftoolError(f"--slowdown must be a number >= 1, not {slowdown:g}")


def link_curve(opts: DeviceOptions) -> dict[str, bytes] | None:
    """The CurveZMQ keys of the link (from ``opts.curve`` or the key files), or None for a plain link,
    which beyond loopback must be asked for with ``insecure``."""
    if (opts.server_key is None) != (opts.device_key is None):
        raise SftoolError("--server-key and --device-key go together: give both (CurveZMQ) or neither")
    curve = opts.curve
    if opts.server_key is not None:
        pair = load_keypair(opts.device_key)
        curve = {"server_public": load_public_key(opts.server_key), "public": pair.public, "secret": pair.secret}
    check_plain_endpoint(opts.endpoint, curve is not None, opts.insecure, "--server-key FILE and --device-key FILE")
    return curve


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the stream like Ctrl-C: the device says BYE and exits instead of vanishing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_device(
    opts: DeviceOptions,
    on_start: Callable[[int, str], None] | None = None,
    on_ack: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> DeviceReport:
    """Stream every local example through the device layers to the server; return totals.

    ``on_start(total_samples, description)`` and ``on_ack(samples)`` let a UI show progress;
    ``log`` receives one-line messages (which model variant runs), which also go to the
    ``sftool.device`` logger.
    """
    if opts.wire_dtype not in WIRE_DTYPES:
        raise SftoolError(f"--wire-dtype must be one of {', '.join(WIRE_DTYPES)}")
    if opts.epochs < 1:
        raise SftoolError("--epochs must be >= 1")
    token_labels = task_token_labels(opts.task)
    check_slowdown(opts.slowdown)
    curve = link_curve(opts)  # before the model loads: a key mistake fails at once
    started = time.perf_counter()
    manifest = load_manifest(opts.artifacts)
    if opts.runtime not in RUNTIMES:
        raise SftoolError(f"--runtime must be one of {', '.join(RUNTIMES)}")
    variant = choose_variant(manifest, opts.precision, runtime=opts.runtime)
    settings = SessionSettings(opts.threads, opts.ort_optimization, opts.memory_arena, opts.spin)
    model = DeviceModel(opts.artifacts, manifest, variant, settings=settings, runtime=opts.runtime)
    message = f"{opts.device_id}: running {model.description}"
    logging.getLogger("sftool.device").info(message)
    if log:
        log(message)
    max_len = min(opts.max_len or manifest.max_seq_len, manifest.max_seq_len)
    if opts.batch_size > manifest.max_batch:
        raise SftoolError(f"--batch-size {opts.batch_size} exceeds the export's max batch {manifest.max_batch}")
    encoder = TextEncoder(Path(opts.artifacts) / manifest.tokenizer_file, max_len, manifest.pad_token_id)
    if token_labels:
        examples = read_prompt_answer(opts.data, opts.prompt_fields, opts.answer_field, opts.id_field, opts.prompt_template)
    else:
        examples = read_examples(opts.data, opts.text_fields, opts.label_field, opts.id_field, opts.label_names)
    plan = bucketed_batches(example_lengths(encoder, examples, token_labels), opts.batch_size, opts.bucket_window)

    precision_label = variant.label
    client = DeviceClient(
        ClientConfig(
            endpoint=opts.endpoint,
            device_id=opts.device_id,
            manifest_sha256=manifest_sha256(opts.artifacts),
            split=manifest.split,
            precision=precision_label,
            wire_dtype=opts.wire_dtype,
            epochs=opts.epochs,
            num_samples=len(examples) * opts.epochs,
            server_timeout_s=opts.server_timeout_s,
            connect_timeout_s=opts.connect_timeout_s,
            hello_timeout_s=float(os.environ.get("SFTOOL_HELLO_TIMEOUT", HELLO_TIMEOUT_S)),
            curve=curve,
            defense=opts.defense.wire(),
            labels="token" if token_labels else "class",
        )
    )
    try:
        client.connect_retrying(log=lambda line: (logging.getLogger("sftool.device").info(line), log and log(line)))
    except TimeoutError as exc:
        raise SftoolError(f"cannot reach the server: {exc}") from None
    skip = client.report.skip_epochs
    total = len(examples) * (opts.epochs - len([e for e in skip if e < opts.epochs]))
    if on_start:
        # Parentheses, not brackets: a UI may render the description as markup.
        on_start(total, f"{opts.device_id} ({precision_label} on {cpu_target()})")

    batches = LocalBatches(examples, plan, opts.epochs, skip, encoder, model, opts.wire_dtype, opts.device_id,
                           slowdown=opts.slowdown, defense=opts.defense, token_labels=token_labels,
                           eos_token_id=manifest.eos_token_id)
    try:
        with _sigterm_as_interrupt():
            report = client.stream(batches, on_ack=(lambda b: on_ack(b.samples)) if on_ack else None)
        streamed = time.perf_counter()
    finally:
        client.close()  # BYE with the totals, however the stream ended
    return DeviceReport(
        device_id=opts.device_id,
        variant=precision_label,
        samples=report.samples_acked,
        batches=report.batches_acked,
        bytes_sent=report.bytes_sent,
        compute_s=batches.compute_s,
        wall_s=time.perf_counter() - started,
        resent=report.resent,
        reconnects=report.reconnects,
        rejected=report.rejected,
        finished_by_server=report.finished_by_server,
        slowed_s=batches.compute_s * batches.slowdown,
        slowdown=batches.slowdown,
        first_batch_unix=batches.first_batch_unix,
        stream_s=streamed - batches.first_batch_at if batches.first_batch_at is not None else 0.0,
    )
