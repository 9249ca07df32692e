"""`sftool bench link`: goodput of the device-server protocol against a bare pyzmq loop, on loopback.

Both sides send the very same pre-encoded BATCH frames (msgpack header + zero-copy array buffers)
from a DEALER to a ROUTER over 127.0.0.1, with at most ``window`` batches unacknowledged:

- bare pyzmq: the ROUTER receives each message and answers a small ACK frame, nothing else;
- the sftool protocol: a real `DeviceClient` (HELLO/WELCOME, credit window, one ACK per batch)
  streams a plan whose ``make(seq)`` returns the frames (no compute) into a real `Receiver`
  (header decode, full batch validation, bounded queue), and a consumer thread drains the queue.

Each runs over plain TCP and over CurveZMQ, with the device and the server side on their own ZeroMQ
contexts (one I/O thread each, as two processes would have). Goodput is the array payload of the
batches delivered per second, from the first batch sent to the last one delivered (taken from the
receiver's queue; for the bare loop, the last ACK back). The handshake (and the CURVE key exchange)
happens before the clock starts. Measurements are interleaved over repetitions and the median is
reported, with the per-batch cost of the receiver's validation measured alone on the same frames,
and the CPU time per batch of the receiving thread (the bare ROUTER loop, or the `Receiver`) and of
the sending thread over the same span, which says which side's Python bounds the stream.
"""

from __future__ import annotations

import os
import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import zmq
from sftool.runtime.device_client import ClientConfig, DeviceClient, OutgoingBatch
from sftool.runtime.files import cpu_name
from sftool.runtime.protocol import MsgType, batch_arrays, decode_batch, decode_header, encode

#: The protocol's goodput must reach this fraction of the bare loop's, on every transport.
TARGET_RATIO = 0.80
TRANSPORTS = ("tcp", "curve")
DTYPES = {"fp16": np.float16, "fp32": np.float32}
#: The server's default queue size (``sftool serve --queue-size``).
QUEUE_SIZE = 16
DEVICE_ID = "bench"
#: Any 64-character id: the bench's receiver accepts exactly this manifest.
MANIFEST_SHA = "b" * 64
NUM_LABELS = 2
#: Give up on one measurement after this long (a stalled stream must not hang the bench).
RUN_TIMEOUT_S = 120.0


@dataclass
class LinkBenchConfig:
    """What to send and how often; defaults are the SmolLM2-135M split's real batch shape."""

    batch: int = 8
    seq_len: int = 128
    hidden: int = 576
    dtype: str = "fp16"
    batches: int = 300
    window: int = 4
    repeats: int = 5
    #: The receiver's ACK policy: "queued" (ACK when the batch enters the queue) or "taken" (when the
    #: consumer takes it, as the pipelined server does with its fixed release order).
    ack: str = "queued"
    transports: tuple[str, ...] = TRANSPORTS


@dataclass
class Measurement:
    """One timed stream: how many batches arrived (counted by the receiving side) and how fast."""

    seconds: float
    batches: int
    payload_bytes: int
    #: CPU time of the whole process (both sides, their ZeroMQ I/O threads included) over the same span.
    cpu_seconds: float = 0.0
    #: CPU time of the receiving thread (bare ROUTER loop or Receiver) and of the sending thread over
    #: the span; None where the platform cannot read another thread's CPU clock.
    server_thread_cpu_seconds: float | None = None
    device_thread_cpu_seconds: float | None = None

    @property
    def goodput_gbs(self) -> float:
        return self.payload_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


# -- the message -------------------------------------------------------------------------------
def make_batches(cfg: LinkBenchConfig) -> list[OutgoingBatch]:
    """``cfg.batches`` encoded BATCH messages; they share one set of arrays (only the header differs),
    so memory stays at one batch however many are sent."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((cfg.batch, cfg.seq_len, cfg.hidden)).astype(DTYPES[cfg.dtype])
    mask = np.ones((cfg.batch, cfg.seq_len), np.uint8)
    labels = np.arange(cfg.batch) % NUM_LABELS
    arrays = batch_arrays(hidden, mask, labels, np.arange(cfg.batch))
    return [
        OutgoingBatch(seq, cfg.batch, encode(MsgType.BATCH, DEVICE_ID, arrays, seq=seq, epoch=0))
        for seq in range(cfg.batches)
    ]


def payload_bytes(batch: OutgoingBatch) -> int:
    """The array frames' bytes (the header is not payload)."""
    return sum(len(f) for f in batch.frames[1:])


class PrecomputedPlan:
    """A `BatchPlan` whose batches are already encoded: the stream measures the link, not compute."""

    def __init__(self, batches: list[OutgoingBatch]):
        self._batches = batches

    def seqs(self) -> list[int]:
        return [b.seq for b in self._batches]

    def make(self, seq: int) -> OutgoingBatch:
        return self._batches[seq]


class ThreadClock:
    """CPU time of one running thread, readable from another (Linux and most Unixes; else None)."""

    def __init__(self, thread: threading.Thread):
        try:
            self._clock: int | None = time.pthread_getcpuclockid(thread.ident)  # type: ignore[arg-type]
        except (AttributeError, OSError, TypeError):
            self._clock = None

    def read(self) -> float | None:
        """The thread's CPU seconds so far; None if unreadable or the thread has ended."""
        if self._clock is None:
            return None
        try:
            return time.clock_gettime(self._clock)
        except OSError:  # the thread has ended
            return None


def _spent(clock: ThreadClock, started: float | None) -> float | None:
    now = clock.read()
    return None if now is None or started is None else now - started


# -- keys and contexts -------------------------------------------------------------------------
@dataclass
class CurveKeys:
    server_public: bytes
    server_secret: bytes
    device_public: bytes
    device_secret: bytes

    @classmethod
    def generate(cls) -> CurveKeys:
        server_public, server_secret = zmq.curve_keypair()
        device_public, device_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, device_public, device_secret)


def _secure_router(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    if keys:
        sock.curve_server = True
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public


def _secure_dealer(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    if keys:
        sock.curve_serverkey = keys.server_public
        sock.curve_publickey = keys.device_public
        sock.curve_secretkey = keys.device_secret


# -- (a) bare pyzmq ----------------------------------------------------------------------------
def run_bare(batches: list[OutgoingBatch], window: int, keys: CurveKeys | None) -> Measurement:
    """DEALER -> ROUTER with the same frames, a one-frame ACK per message, at most ``window`` in flight."""
    server_ctx, device_ctx = zmq.Context(), zmq.Context()
    router = server_ctx.socket(zmq.ROUTER)
    router.linger = 0
    _secure_router(router, keys)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = device_ctx.socket(zmq.DEALER)
    dealer.linger = 0
    _secure_dealer(dealer, keys)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    got: dict[str, Any] = {"batches": 0, "bytes": 0, "cpu": None}

    def serve() -> None:
        cpu_started = 0.0
        for _ in range(len(batches) + 1):  # + the handshake ping
            if not router.poll(int(RUN_TIMEOUT_S * 1000)):
                return
            frames = router.recv_multipart(copy=False)
            if len(frames) > 2:
                got["batches"] += 1
                got["bytes"] += sum(len(f.buffer) for f in frames[2:])
            router.send_multipart([frames[0], b"ACK"])
            if len(frames) <= 2:
                cpu_started = time.thread_time()  # the clock starts once the ping is answered
        got["cpu"] = time.thread_time() - cpu_started

    thread = threading.Thread(target=serve, name="bench-bare-router", daemon=True)
    thread.start()
    try:
        dealer.send(b"ping")  # connection (and CURVE handshake) before the clock starts
        _recv_ack(dealer)
        started, cpu_started = time.perf_counter(), time.process_time()
        device_started = time.thread_time()
        in_flight = 0
        for batch in batches:
            if in_flight >= window:
                _recv_ack(dealer)
                in_flight -= 1
            dealer.send_multipart(batch.frames, copy=False)
            in_flight += 1
        for _ in range(in_flight):
            _recv_ack(dealer)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        device_cpu = time.thread_time() - device_started
        thread.join(RUN_TIMEOUT_S)
    finally:
        dealer.close(0)
        device_ctx.term()
        thread.join(1.0)
        if not thread.is_alive():  # a socket may only be closed by the thread that uses it
            router.close(0)
            server_ctx.term()
    return Measurement(elapsed, got["batches"], got["bytes"], cpu, got["cpu"], device_cpu)


def _recv_ack(sock: zmq.Socket) -> None:
    if not sock.poll(int(RUN_TIMEOUT_S * 1000)):
        raise TimeoutError(f"bare loop: no ACK within {RUN_TIMEOUT_S:.0f}s")
    sock.recv()


# -- (b) the sftool protocol -------------------------------------------------------------------
def _accepted(cfg: LinkBenchConfig) -> dict[str, Any]:
    """The receiver's accepted split: a manifest made for this message shape (no export needed)."""
    from sftool.runtime.manifest import Manifest
    from sftool.server.receiver import AcceptedSplit

    manifest = Manifest(
        family="bench", source="bench", split=1, num_layers=2, hidden_size=cfg.hidden, max_seq_len=cfg.seq_len,
        pad_token_id=0, variants=[], files={}, weights_fingerprint="", opset=18, max_batch=cfg.batch,
        # Standard-normal activations stay far inside any bound derived from this.
        activation_abs_max=100.0,
    )
    return {MANIFEST_SHA: AcceptedSplit(MANIFEST_SHA, manifest, manifest.batch_schema(NUM_LABELS))}


class _Consumer(threading.Thread):
    """Stands in for the trainer: takes every batch off the receiver's queue (ACKs it under ``taken``)."""

    def __init__(self, receiver: Any, batches: queue.Queue, expected: int, ack_taken: bool):
        super().__init__(name="bench-consumer", daemon=True)
        self.receiver, self.batches, self.expected, self.ack_taken = receiver, batches, expected, ack_taken
        self.taken = 0
        self.payload_bytes = 0
        self.last_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while self.taken < self.expected and not self.stop.is_set():
            try:
                item = self.batches.get(timeout=0.05)
            except queue.Empty:
                continue
            b = item.batch
            self.taken += 1
            self.payload_bytes += b.hidden.nbytes + b.attention_mask.nbytes + b.labels.nbytes + b.sample_ids.nbytes
            self.last_at = time.perf_counter()
            if self.ack_taken:
                self.receiver.acknowledge(b.device, b.seq)


def run_protocol(cfg: LinkBenchConfig, batches: list[OutgoingBatch], keys: CurveKeys | None) -> Measurement:
    """A real DeviceClient streams ``batches`` into a real Receiver; the count is the receiver's."""
    from sftool.errors import SftoolError
    from sftool.server.receiver import Receiver

    server_ctx, device_ctx = zmq.Context(), zmq.Context()
    received: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
    curve = {"secret": keys.server_secret, "public": keys.server_public} if keys else None
    receiver = Receiver("tcp://127.0.0.1:0", _accepted(cfg), received, window=cfg.window, ack=cfg.ack, pace=False,
                        context=server_ctx, curve=curve, goodbye_grace_s=0.2)
    consumer = _Consumer(receiver, received, len(batches), ack_taken=cfg.ack == "taken")
    client_curve = (
        {"server_public": keys.server_public, "public": keys.device_public, "secret": keys.device_secret} if keys else None
    )
    client = DeviceClient(
        ClientConfig(receiver.endpoint, DEVICE_ID, MANIFEST_SHA, split=1, precision="fp32/any",
                     wire_dtype=cfg.dtype, num_samples=len(batches) * cfg.batch,
                     server_timeout_s=RUN_TIMEOUT_S, hello_timeout_s=30.0, curve=client_curve),
        context=device_ctx,
    )
    receiver.start()
    consumer.start()
    receiver_clock = ThreadClock(receiver)
    try:
        client.connect()  # HELLO/WELCOME (and the CURVE handshake) before the clock starts
        started, cpu_started = time.perf_counter(), time.process_time()
        receiver_started, device_started = receiver_clock.read(), time.thread_time()
        report = client.stream(PrecomputedPlan(batches))
        streamed, device_cpu = time.perf_counter(), time.thread_time() - device_started
        consumer.join(RUN_TIMEOUT_S)
        elapsed, cpu = max(streamed, consumer.last_at) - started, time.process_time() - cpu_started
        receiver_cpu = _spent(receiver_clock, receiver_started)
        client.close(wait_s=2.0)
    finally:
        consumer.stop.set()
        client.close(send_bye=False)
        receiver.request_stop("bench over")
        receiver.join_stopped(5.0)
        device_ctx.term()
        server_ctx.term()
    session = receiver.snapshot().get(DEVICE_ID)
    rejected = report.rejected + ([f"{session.rejected} rejected by the receiver"] if session and session.rejected else [])
    if rejected or session is None or session.batches != consumer.taken:
        raise SftoolError(
            f"the protocol run lost batches: receiver accepted {session.batches if session else 0}, consumer took "
            f"{consumer.taken} of {len(batches)}; rejected: {rejected[:3]}"
        )
    return Measurement(elapsed, session.batches, consumer.payload_bytes, cpu, receiver_cpu, device_cpu)


# -- where the receiver's time goes ------------------------------------------------------------
def validation_cost(cfg: LinkBenchConfig, batch: OutgoingBatch, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per batch of the receiver's per-message work, each timed alone on the bench's frames.

    ``decode_validate_ms`` is the real header decode plus batch validation; the others are single
    scans of the hidden array that a NaN/Inf and bound check can be built from, for comparison:
    numpy's float min and max, ``isfinite``, and the max of the bit patterns read as unsigned and
    signed integers (no temporary array; IEEE magnitudes order like their bit patterns, so these two
    maxima bound |x| on both signs and catch NaN and Inf).
    """
    schema = next(iter(_accepted(cfg).values())).schema
    frames = [memoryview(f) for f in batch.frames]
    hidden = np.frombuffer(frames[1], dtype=DTYPES[cfg.dtype])
    unsigned, signed = (np.uint16, np.int16) if hidden.itemsize == 2 else (np.uint32, np.int32)

    def decode() -> None:
        decode_batch(decode_header(frames[0]), frames[1:], schema)

    return {
        "decode_validate_ms": _median_ms(decode, repeats),
        "float_min_max_ms": _median_ms(lambda: (hidden.min(), hidden.max()), repeats),
        "isfinite_ms": _median_ms(lambda: np.isfinite(hidden).all(), repeats),
        "bits_max_ms": _median_ms(lambda: (hidden.view(unsigned).max(), hidden.view(signed).max()), repeats),
    }


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


# -- the whole bench ---------------------------------------------------------------------------
def run_link_bench(cfg: LinkBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Bare loop and protocol on every transport, interleaved over ``cfg.repeats``; medians and the target."""
    if cfg.batch < 1 or cfg.seq_len < 1 or cfg.hidden < 1 or cfg.batches < 1 or cfg.window < 1 or cfg.repeats < 1:
        raise ValueError("batch, seq_len, hidden, batches, window and repeats must be >= 1")
    unknown = set(cfg.transports) - set(TRANSPORTS)
    if unknown:
        raise ValueError(f"unknown transports {sorted(unknown)} (have: {', '.join(TRANSPORTS)})")
    batches = make_batches(cfg)
    per_batch = payload_bytes(batches[0])
    keys = CurveKeys.generate()
    loadavg_start = os.getloadavg()
    log(f"{cfg.batches} batches of {_size(per_batch)} ([{cfg.batch}, {cfg.seq_len}, {cfg.hidden}] {cfg.dtype}), "
        f"window {cfg.window}, {cfg.repeats} repetitions on {', '.join(cfg.transports)}")
    warm = batches[: min(len(batches), 20)]
    for transport in cfg.transports:  # first connections, imports and allocator growth, not timed
        k = keys if transport == "curve" else None
        run_bare(warm, cfg.window, k)
        run_protocol(cfg, warm, k)
    runs: dict[str, dict[str, list[Measurement]]] = {t: {"bare": [], "protocol": []} for t in cfg.transports}
    for rep in range(cfg.repeats):
        for transport in cfg.transports:
            k = keys if transport == "curve" else None
            # Alternate which goes first, so a drift in the machine's load hits both alike.
            order = ("bare", "protocol") if rep % 2 == 0 else ("protocol", "bare")
            for side in order:
                m = run_bare(batches, cfg.window, k) if side == "bare" else run_protocol(cfg, batches, k)
                runs[transport][side].append(m)
            b, p = runs[transport]["bare"][-1], runs[transport]["protocol"][-1]
            log(f"repetition {rep + 1}/{cfg.repeats} {transport}: bare {b.goodput_gbs:.3f} GB/s, "
                f"protocol {p.goodput_gbs:.3f} GB/s ({p.batches} batches delivered)")
    log("timing the receiver's validation alone")
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "message": {"shape": [cfg.batch, cfg.seq_len, cfg.hidden], "dtype": cfg.dtype, "payload_bytes": per_batch,
                    "header_bytes": len(batches[0].frames[0])},
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__,
                    "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()},
        "target_ratio": TARGET_RATIO,
        "transports": {t: _summary(runs[t], per_batch) for t in cfg.transports},
        "receiver_cost": validation_cost(cfg, batches[0]),
    }


def _summary(runs: dict[str, list[Measurement]], per_batch: int) -> dict:
    bare = statistics.median(m.goodput_gbs for m in runs["bare"])
    protocol = statistics.median(m.goodput_gbs for m in runs["protocol"])
    ratio = protocol / bare if bare > 0 else 0.0
    return {
        "bare_gbs": bare,
        "protocol_gbs": protocol,
        "ratio": ratio,
        "met": ratio >= TARGET_RATIO,
        # At the median goodputs: how long one batch takes on each path.
        "bare_ms_per_batch": per_batch / bare / 1e6 if bare else float("nan"),
        "protocol_ms_per_batch": per_batch / protocol / 1e6 if protocol else float("nan"),
        "bare_runs": [asdict(m) | {"goodput_gbs": m.goodput_gbs} for m in runs["bare"]],
        "protocol_runs": [asdict(m) | {"goodput_gbs": m.goodput_gbs} for m in runs["protocol"]],
        "bare_cpu_ms_per_batch": _median_cpu_ms(runs["bare"]),
        "protocol_cpu_ms_per_batch": _median_cpu_ms(runs["protocol"]),
        # The receiving thread's and the sending thread's share of it.
        "bare_server_thread_cpu_ms_per_batch": _median_cpu_ms(runs["bare"], "server_thread_cpu_seconds"),
        "protocol_server_thread_cpu_ms_per_batch": _median_cpu_ms(runs["protocol"], "server_thread_cpu_seconds"),
        "bare_device_thread_cpu_ms_per_batch": _median_cpu_ms(runs["bare"], "device_thread_cpu_seconds"),
        "protocol_device_thread_cpu_ms_per_batch": _median_cpu_ms(runs["protocol"], "device_thread_cpu_seconds"),
        "protocol_delivered": [m.batches for m in runs["protocol"]],
    }


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


def _median_cpu_ms(runs: list[Measurement], field: str = "cpu_seconds") -> float:
    """Median over ``runs`` of one CPU time, in ms per batch; NaN where it was not measured."""
    values = [getattr(m, field) / m.batches * 1000 for m in runs if getattr(m, field) is not None and m.batches]
    return statistics.median(values) if values else float("nan")


def print_link_bench(results: dict, console: Any = None) -> None:
    """The side-by-side table, the target per transport and the receiver's validation cost."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    msg, machine = results["message"], results["machine"]
    shape = "x".join(str(d) for d in msg["shape"])
    table = Table(title=(f"sftool bench link: {shape} {msg['dtype']} batches, {_size(msg['payload_bytes'])} payload, "
                         f"window {results['config']['window']}, loopback; CPU: {machine['cpu']} ({machine['cpus']} cores)"))
    for col in ("transport", "bare pyzmq GB/s", "sftool protocol GB/s", "ratio", f"target >= {results['target_ratio']:.0%}"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for name, r in results["transports"].items():
        label = "plain TCP" if name == "tcp" else "CurveZMQ"
        table.add_row(label, f"{r['bare_gbs']:.3f}", f"{r['protocol_gbs']:.3f}", f"{r['ratio']:.1%}",
                      "[green]met[/]" if r["met"] else "[red]not met[/]")
    console.print(table)
    cfg, cost = results["config"], results["receiver_cost"]

    def say(text: str) -> None:
        console.print(text, highlight=False)

    say(f"  medians of {cfg['repeats']} interleaved repetitions of {cfg['batches']} batches (receiver ack policy "
        f"{cfg['ack']}); load average {machine['loadavg_start'][0]:.2f} at the start, {machine['loadavg_end'][0]:.2f} at the end")
    for name, r in results["transports"].items():
        say(f"  {name}: per batch {r['bare_ms_per_batch']:.3f} ms bare, {r['protocol_ms_per_batch']:.3f} ms through the "
            f"protocol; process CPU {r['bare_cpu_ms_per_batch']:.3f} ms bare, {r['protocol_cpu_ms_per_batch']:.3f} ms "
            f"protocol; batches the receiver delivered: {r['protocol_delivered']}")
        say(f"    receiving thread CPU {r['bare_server_thread_cpu_ms_per_batch']:.3f} ms bare, "
            f"{r['protocol_server_thread_cpu_ms_per_batch']:.3f} ms Receiver; sending thread "
            f"{r['bare_device_thread_cpu_ms_per_batch']:.3f} ms bare, {r['protocol_device_thread_cpu_ms_per_batch']:.3f} ms "
            f"DeviceClient")
    say(f"  receiver work per batch, timed alone: decode + validation {cost['decode_validate_ms']:.3f} ms; scans of the "
        f"hidden array: float min+max {cost['float_min_max_ms']:.3f} ms, isfinite {cost['isfinite_ms']:.3f} ms, "
        f"integer max of the bit patterns {cost['bits_max_ms']:.3f} ms")

