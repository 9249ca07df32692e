"""`sftool bench flood`: a load test of the server's receiver, many devices at once on loopback.

A real `Receiver` runs in a child process of its own, so that the peak resident set size measured
(Linux ``VmHWM``, and ``VmRSS`` sampled over time from ``/proc/PID/status``) is the server's alone.
Beside it a trainer stand-in takes batches off the receiver's bounded queue at a fixed rate (and
acknowledges them under the ``taken`` ACK policy, as ``sftool serve``'s pipelined schedule does),
so the queue fills, credits are withheld and pacing holds devices that run ahead.

In this process, ``devices`` threads share loopback to it:

- well-behaved devices are real `DeviceClient`s streaming a precomputed plan (every device sends the
  same array buffers, zero-copy, with its own header), at most ``window`` batches unacknowledged;
- flooders say HELLO like any device, then send batches from a raw DEALER as fast as the transport
  takes them, new seqs every time, ignoring their window and every answer.

The run stops after ``seconds`` (or when every well-behaved device has sent its plan): flooders stop
and say BYE, the server says BYE to every device still streaming, and every thread and the child are
joined. Reported: per-device ACK counts for both groups, the flooders' ERRORs by code, the server's
peak RSS over time, and the bound it must stay within: the batches the configuration lets the
server hold (its queue, every session's window, and what libzmq may buffer for a connection that
ignores its window) times the largest valid BATCH message, plus a fixed overhead measured with the
same server process and 0 devices.
"""

from __future__ import annotations

import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import zmq
from sftool.bench_link import (
    MANIFEST_SHA,
    NUM_LABELS,
    LinkBenchConfig,
    PrecomputedPlan,
    _accepted,
    _size,
)
from sftool.errors import SftoolError
from sftool.runtime.device_client import ClientConfig, DeviceClient, OutgoingBatch
from sftool.runtime.files import cpu_name, proc_status_mb
from sftool.runtime.protocol import ErrorCode, MsgType, batch_arrays, decode_header, encode

__all__ = ["FloodBenchConfig", "MemoryBound", "memory_bound", "run_flood_bench", "print_flood_bench"]

#: The server's ACK policies this bench can stand in for (``sftool serve``: taken when pipelined).
ACK_POLICIES = ("taken", "queued")
#: The two kinds of device, as the results name them and as the report shows them.
GROUPS = (("well_behaved", "well-behaved"), ("flooders", "flooders"))
#: Extra time the run may take past ``seconds`` to say BYE and join everything before it gives up.
SHUTDOWN_S = 30.0
#: The child server ends itself this long after ``seconds`` if it is never told to stop.
CHILD_MAX_EXTRA_S = 120.0


@dataclass
class FloodBenchConfig:
    """How many devices, how they behave, what they send and how fast the trainer stand-in drains."""

    devices: int = 100
    flooders: int = 10
    seconds: float = 20.0
    #: Batches in each well-behaved device's plan (0: twice its share of drain_rate x seconds, so no
    #: device runs out during the run and pacing, 5% of the plan, comes into play).
    batches: int = 0
    batch: int = 8
    seq_len: int = 128
    hidden: int = 576
    window: int = 4
    queue_size: int = 16
    #: Batches per second the trainer stand-in takes off the receiver's queue.
    drain_rate: float = 200.0
    ack: str = "taken"
    pace: bool = True
    #: How long the 0-device server runs to measure the fixed overhead.
    overhead_seconds: float = 2.0
    #: How often the server's RSS is sampled.
    sample_every_s: float = 0.1
    #: How long the server waits for devices to confirm its BYE.
    goodbye_grace_s: float = 2.0

    @property
    def well_behaved(self) -> int:
        return self.devices - self.flooders

    def plan_batches(self) -> int:
        """Batches in each well-behaved device's plan."""
        if self.batches > 0:
            return self.batches
        share = self.drain_rate * self.seconds / max(1, self.well_behaved)
        return max(8, math.ceil(2 * share))

    def validate(self) -> None:
        """Raise ValueError on a configuration the bench cannot run."""
        if self.devices < 1 or not 0 <= self.flooders <= self.devices:
            raise ValueError("devices must be >= 1 and flooders between 0 and devices")
        if min(self.batch, self.seq_len, self.hidden, self.window, self.queue_size) < 1 or self.batches < 0:
            raise ValueError("batch, seq_len, hidden, window and queue_size must be >= 1, batches >= 0")
        if not self.seconds > 0 or not self.drain_rate > 0:
            raise ValueError("seconds and drain_rate must be > 0")
        if self.ack not in ACK_POLICIES:
            raise ValueError(f"ack must be one of {', '.join(ACK_POLICIES)}")


# -- the bound ---------------------------------------------------------------------------------
@dataclass
class MemoryBound:
    """What the configuration lets the server hold, in batches, and those batches in bytes."""

    queue: int
    sessions: int
    window: int
    flooders: int
    #: The largest BATCH message the server accepts (float32 at the manifest's largest shape).
    largest_message_bytes: int
    #: The message the devices of this run actually send.
    sent_message_bytes: int

    @property
    def per_flooder(self) -> int:
        """Messages libzmq may hold for a connection that ignores its window: its receive high-water
        mark (2 x window + 8, docs/protocol.md section 9) and the one being read off the socket."""
        return 2 * self.window + 8 + 1

    @property
    def messages(self) -> int:
        """The queue, the batch in the trainer's hands, every session's window (accepted and not yet
        acknowledged, or on its way in), and what the transport buffers for each flooder."""
        return self.queue + 1 + self.sessions * self.window + self.flooders * self.per_flooder

    @property
    def data_mb(self) -> float:
        return self.messages * self.largest_message_bytes / 2**20

    @property
    def data_sent_mb(self) -> float:
        """The same count of the message actually sent (what the peak should come near)."""
        return self.messages * self.sent_message_bytes / 2**20

    def describe(self) -> str:
        return (f"(queue {self.queue} + 1 in the trainer's hands + {self.sessions} sessions x window {self.window} + "
                f"{self.flooders} flooders x {self.per_flooder} in the transport) = {self.messages} messages x "
                f"{_size(self.largest_message_bytes)} (largest valid BATCH) = {self.data_mb:.0f} MB "
                f"[{self.data_sent_mb:.0f} MB at the {_size(self.sent_message_bytes)} sent]")


def memory_bound(cfg: FloodBenchConfig) -> MemoryBound:
    """The server's batch memory bound for ``cfg`` (the fixed overhead is measured, not computed)."""
    schema = next(iter(_accepted(_link_cfg(cfg)).values())).schema
    sent = sum(len(f) for f in _encode("d", 0, _shared_arrays(cfg)))
    return MemoryBound(queue=cfg.queue_size, sessions=cfg.devices, window=cfg.window, flooders=cfg.flooders,
                       largest_message_bytes=schema.max_message_bytes, sent_message_bytes=sent)


def _link_cfg(cfg: FloodBenchConfig) -> LinkBenchConfig:
    return LinkBenchConfig(batch=cfg.batch, seq_len=cfg.seq_len, hidden=cfg.hidden, dtype="fp16", window=cfg.window)


# -- what devices send -------------------------------------------------------------------------
def _shared_arrays(cfg: FloodBenchConfig) -> list[tuple[str, np.ndarray]]:
    """One set of batch arrays every device sends (zero-copy): memory stays at one batch on this side."""
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((cfg.batch, cfg.seq_len, cfg.hidden)).astype(np.float16)
    mask = np.ones((cfg.batch, cfg.seq_len), np.uint8)
    return batch_arrays(hidden, mask, np.arange(cfg.batch) % NUM_LABELS, np.arange(cfg.batch))


def _encode(device: str, seq: int, arrays: list[tuple[str, np.ndarray]]) -> list[Any]:
    return encode(MsgType.BATCH, device, arrays, seq=seq, epoch=0)


def device_plan(cfg: FloodBenchConfig, device: str, arrays: list[tuple[str, np.ndarray]]) -> PrecomputedPlan:
    """A well-behaved device's plan: ``cfg.plan_batches()`` batches, headers made once, arrays shared."""
    return PrecomputedPlan([OutgoingBatch(seq, cfg.batch, _encode(device, seq, arrays))
                            for seq in range(cfg.plan_batches())])


# -- the server, in a child process ------------------------------------------------------------
class _Drainer(threading.Thread):
    """Stands in for the trainer: takes one batch off the queue every 1/rate s and lets it go.

    An idle moment is not banked: a late take makes up at most one interval, so over any stretch of
    the run it takes at most one batch more than ``rate`` allows.
    """

    def __init__(self, receiver: Any, batches: queue.Queue, rate: float, ack_taken: bool):
        super().__init__(name="bench-drainer", daemon=True)
        self.receiver, self.batches, self.interval, self.ack_taken = receiver, batches, 1.0 / rate, ack_taken
        self.taken = 0
        self.stop = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
                continue
            try:
                item = self.batches.get(timeout=0.05)
            except queue.Empty:
                continue
            self.taken += 1
            if self.ack_taken:
                self.receiver.acknowledge(item.batch.device, item.batch.seq)
            del item  # the batch's buffers go back to libzmq now
            next_at = max(next_at, time.monotonic() - self.interval) + self.interval


def _emit(out: IO[str], **event: Any) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def serve_child(spec: str) -> None:
    """The child process: a Receiver and a drainer; one JSON line per event on stdout.

    ``ready`` (endpoint) once bound, ``progress`` every second, ``result`` after "stop" on stdin
    (or stdin's end, or a hard time limit).
    """
    import logging

    from sftool.server.receiver import LinkLimits, Receiver

    # Refused messages are logged as warnings, as in `sftool serve`; stderr goes to a file.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    cfg = FloodBenchConfig(**json.loads(spec))
    batches: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
    context = zmq.Context()
    receiver = Receiver("tcp://127.0.0.1:0", _accepted(_link_cfg(cfg)), batches, window=cfg.window, ack=cfg.ack,
                        pace=cfg.pace, context=context, goodbye_grace_s=cfg.goodbye_grace_s,
                        # as `sftool serve --devices N` sets it
                        limits=LinkLimits(max_sessions=max(2 * cfg.devices, cfg.devices + 8)))
    drainer = _Drainer(receiver, batches, cfg.drain_rate, ack_taken=cfg.ack == "taken")
    stdout = sys.stdout
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), name="bench-stdin", daemon=True).start()
    receiver.start()
    drainer.start()
    started = time.monotonic()
    _emit(stdout, event="ready", endpoint=receiver.endpoint, pid=os.getpid())
    while not stop.wait(1.0) and time.monotonic() - started < cfg.seconds + CHILD_MAX_EXTRA_S:
        # CLOCK_MONOTONIC is system-wide: the parent places these on its own timeline
        _emit(stdout, event="progress", t=time.monotonic() - started, mono=time.monotonic(), drained=drainer.taken,
              pending=receiver.pending, queued=batches.qsize(), sessions=len(receiver.sessions))
    alive = receiver.is_alive()
    receiver.request_stop("bench over")
    stopped = receiver.join_stopped(cfg.goodbye_grace_s + 10.0)
    drainer.stop.set()
    drainer.join(2.0)
    sessions = {name: {"batches": s.batches, "samples": s.samples, "rejected": s.rejected, "duplicates": s.duplicates,
                       "state": s.state} for name, s in receiver.snapshot().items()}
    _emit(stdout, event="result", alive=alive, stopped=stopped, drained=drainer.taken,
          seconds=time.monotonic() - started, errors_sent=receiver.errors_sent, bytes_received=receiver.bytes_received,
          sessions=sessions, vmhwm_mb=proc_status_mb("VmHWM", os.getpid()))
    if stopped:
        context.term()


class ServerChild:
    """The child server process, its events, and its RSS sampled from here over time."""

    def __init__(self, cfg: FloodBenchConfig, folder: Path, on_progress: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.stderr_path = folder / f"server-{time.monotonic_ns()}.log"
        self._stderr = open(self.stderr_path, "w")  # closed in close()
        code = "import sys; from sftool.bench_flood import serve_child; serve_child(sys.argv[1])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(cfg))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.on_progress = on_progress
        self.ready = threading.Event()
        self.done = threading.Event()
        self.endpoint = ""
        self.result: dict | None = None
        self.progress: list[dict] = []
        self.rss: list[tuple[float, float]] = []  # (seconds since start, VmRSS MB)
        self.peak_sampled_mb = 0.0
        self._started = time.monotonic()
        threading.Thread(target=self._read, name="bench-server-events", daemon=True).start()
        threading.Thread(target=self._sample, name="bench-server-rss", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            kind = event.pop("event")
            if kind == "ready":
                self.endpoint = event["endpoint"]
                self.ready.set()
            elif kind == "progress":
                self.progress.append(event)
                if self.on_progress:
                    self.on_progress(event)
            elif kind == "result":
                self.result = event
        self.done.set()

    def _sample(self) -> None:
        while not self.done.is_set():
            rss = proc_status_mb("VmRSS", self.proc.pid)
            if not math.isnan(rss):
                self.rss.append((time.monotonic() - self._started, rss))
                self.peak_sampled_mb = max(self.peak_sampled_mb, rss)
            self.done.wait(self.cfg.sample_every_s)

    def wait_ready(self, timeout: float = 60.0) -> str:
        """The server's endpoint once it listens."""
        if not self.ready.wait(timeout):
            raise SftoolError(f"the bench server did not start within {timeout:.0f}s: {self.stderr_tail()}")
        return self.endpoint

    @property
    def rss_now_mb(self) -> float:
        return self.rss[-1][1] if self.rss else float("nan")

    def stop(self, timeout: float = SHUTDOWN_S) -> dict:
        """Tell the server to stop (it says BYE to every device still streaming); its result."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        self.done.wait(timeout)
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5.0)
        if self.result is None:
            raise SftoolError(f"the bench server gave no result (exit {self.proc.returncode}): {self.stderr_tail()}")
        return self.result

    def stderr_tail(self, lines: int = 20) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return " | ".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
        self._stderr.close()


# -- devices -----------------------------------------------------------------------------------
@dataclass
class DeviceOutcome:
    """What one device saw, from its own side."""

    device: str
    flooder: bool
    acks: int = 0
    sent: int = 0
    errors: Counter = field(default_factory=Counter)
    #: The server's BYE reason, if it sent one.
    bye: str | None = None
    failure: str | None = None
    joined: bool = False


def _run_well_behaved(cfg: FloodBenchConfig, endpoint: str, plan: PrecomputedPlan, ctx: zmq.Context,
                      out: DeviceOutcome, clients: dict[str, DeviceClient]) -> None:
    """A real DeviceClient streams its plan until done or until the server's BYE, then says BYE."""
    client = DeviceClient(ClientConfig(
        endpoint, out.device, MANIFEST_SHA, split=1, precision="fp32/any", wire_dtype="fp16",
        num_samples=len(plan.seqs()) * cfg.batch,
        # bounded: a server that stops answering ends this thread within about a minute
        server_timeout_s=15.0, hello_timeout_s=10.0, connect_timeout_s=15.0, max_reconnects=1,
    ), context=ctx)
    clients[out.device] = client
    try:
        report = client.stream(plan)
        client.close(wait_s=2.0)
        out.bye = report.finished_by_server
    except Exception as exc:  # reported per device; one failing must not end the others
        out.failure = f"{type(exc).__name__}: {exc}"
    finally:
        client.close(send_bye=False)
        out.acks, out.sent = client.report.batches_acked, client.report.batches_sent
        out.errors.update("rejected" for _ in client.report.rejected)


def _run_flooder(cfg: FloodBenchConfig, endpoint: str, arrays: list, ctx: zmq.Context, stop: threading.Event,
                 out: DeviceOutcome) -> None:
    """HELLO, then new batches as fast as the transport takes them until ``stop``; then BYE."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, out.device.encode())
    # The flooder's own queue is its own memory: keep it short, the transport still runs flat out.
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.connect(endpoint)
    try:
        sock.send_multipart(encode(MsgType.HELLO, out.device, manifest_sha256=MANIFEST_SHA, split=1,
                                   precision="fp32/any", wire_dtype="fp16",
                                   num_samples=cfg.plan_batches() * cfg.batch, epochs=1))
        if not sock.poll(10_000) or not _count_replies(sock, out, welcome=True):
            out.failure = "no WELCOME"
            return
        seq = 0
        while not stop.is_set():
            _count_replies(sock, out)
            try:
                sock.send_multipart(_encode(out.device, seq, arrays), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                sock.poll(50, zmq.POLLOUT)
                continue
            seq += 1
            out.sent += 1
        sock.send_multipart(encode(MsgType.BYE, out.device, batches=out.acks, samples=out.acks * cfg.batch))
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # answers already on their way
            if sock.poll(50):
                _count_replies(sock, out)
    except zmq.ZMQError as exc:
        out.failure = f"ZMQError: {exc}"
    finally:
        sock.close(0)


def _count_replies(sock: zmq.Socket, out: DeviceOutcome, welcome: bool = False) -> bool:
    """Read every waiting reply into ``out``; True if a WELCOME was among them."""
    welcomed = False
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return welcomed
        header = decode_header(frames[0], 1 << 20)
        if header.type == MsgType.ACK:
            out.acks += 1
        elif header.type == MsgType.ERROR:
            code = header.fields.get("code")
            out.errors[ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)] += 1
        elif header.type == MsgType.BYE:
            out.bye = str(header.fields.get("reason", ""))
        elif header.type == MsgType.WELCOME:
            welcomed = True


# -- the run -----------------------------------------------------------------------------------
def measure_overhead(cfg: FloodBenchConfig, folder: Path) -> float:
    """Peak RSS (MB) of the same server process, drainer running, with 0 devices."""
    child = ServerChild(cfg, folder)
    try:
        child.wait_ready()
        time.sleep(cfg.overhead_seconds)
        result = child.stop()
    finally:
        child.close()
    return max(result["vmhwm_mb"], child.peak_sampled_mb)


def run_flood_bench(cfg: FloodBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure the fixed overhead, then flood the server; every figure of the report."""
    cfg.validate()
    bound = memory_bound(cfg)
    log(f"{cfg.devices} devices ({cfg.well_behaved} well-behaved, {cfg.flooders} flooders), {cfg.seconds:g} s, "
        f"[{cfg.batch}, {cfg.seq_len}, {cfg.hidden}] fp16 batches of {_size(bound.sent_message_bytes)}, window "
        f"{cfg.window}, queue {cfg.queue_size}, drain {cfg.drain_rate:g} batches/s, ack {cfg.ack}, "
        f"plan {cfg.plan_batches()} batches per device")
    log(f"bound on the server's batch memory: {bound.describe()}, plus the fixed overhead")
    loadavg_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sftool-flood-") as tmp:
        overhead = measure_overhead(cfg, Path(tmp))
        log(f"fixed overhead (the same server, 0 devices, {cfg.overhead_seconds:g} s): {overhead:.1f} MB peak RSS; "
            f"bound {overhead + bound.data_mb:.0f} MB")
        run = _flood(cfg, bound, overhead, Path(tmp), log)
    return _results(cfg, bound, overhead, run, loadavg_start)


@dataclass
class _Run:
    outcomes: list[DeviceOutcome]
    server: dict
    wall_s: float
    #: Monotonic times of the devices' start and of the stop (the wall time adds saying BYE and joining).
    started_at: float
    stopped_at: float
    peak_sampled_mb: float
    rss: list[tuple[float, float]]
    progress: list[dict]
    stderr_tail: str


def _flood(cfg: FloodBenchConfig, bound: MemoryBound, overhead: float, folder: Path, log: Callable[[str], None]) -> _Run:
    child = ServerChild(cfg, folder)
    device_ctx, flooder_ctx = zmq.Context(), zmq.Context()  # own I/O threads: flooders cannot starve devices here
    stop_flooders = threading.Event()
    threads: list[tuple[threading.Thread, DeviceOutcome]] = []
    try:
        endpoint = child.wait_ready()
        arrays = _shared_arrays(cfg)
        clients: dict[str, DeviceClient] = {}
        for i in range(cfg.devices):
            flooder = i >= cfg.well_behaved
            out = DeviceOutcome(f"{'flood' if flooder else 'dev'}-{i:03d}", flooder)
            if flooder:
                target, args = _run_flooder, (cfg, endpoint, arrays, flooder_ctx, stop_flooders, out)
            else:
                target, args = _run_well_behaved, (cfg, endpoint, device_plan(cfg, out.device, arrays), device_ctx,
                                                   out, clients)
            threads.append((threading.Thread(target=target, args=args, name=out.device, daemon=True), out))
        started = time.monotonic()
        for thread, _ in threads:
            thread.start()
        _wait_for_end(cfg, child, threads, clients, started, bound, overhead, log)
        stopped = time.monotonic()
        log("stopping: flooders say BYE, the server says BYE to every device still streaming")
        stop_flooders.set()
        _join(t for t in threads if t[1].flooder)
        server = child.stop()
        _join(t for t in threads if not t[1].flooder)
        wall = time.monotonic() - started
    finally:
        stop_flooders.set()
        child.close()
    if all(out.joined for _, out in threads):  # a context with a socket still open would block here
        device_ctx.term()
        flooder_ctx.term()
    return _Run([out for _, out in threads], server, wall, started, stopped, child.peak_sampled_mb, child.rss, child.progress,
                child.stderr_tail(5))


def _wait_for_end(cfg: FloodBenchConfig, child: ServerChild, threads: list, clients: dict[str, DeviceClient],
                  started: float, bound: MemoryBound, overhead: float, log: Callable[[str], None]) -> None:
    """Until ``seconds`` have passed or every well-behaved device is done; a progress line every 2 s."""
    well = [t for t, out in threads if not out.flooder]
    next_log = started + 2.0
    while time.monotonic() - started < cfg.seconds and any(t.is_alive() for t in well):
        time.sleep(0.1)
        if time.monotonic() >= next_log:
            next_log += 2.0
            acks = [c.report.batches_acked for c in clients.values()]
            flood = [out for _, out in threads if out.flooder]
            drained = child.progress[-1]["drained"] if child.progress else 0
            log(f"t={time.monotonic() - started:4.1f}s server RSS {child.rss_now_mb:.0f} MB (peak "
                f"{child.peak_sampled_mb:.0f}, bound {overhead + bound.data_mb:.0f}), drained {drained}, "
                f"well-behaved ACKs min {min(acks, default=0)} median {_median(acks):g}, flooders: "
                f"{sum(o.sent for o in flood)} sent, {sum(sum(o.errors.values()) for o in flood)} errors, "
                f"{sum(1 for o in flood if (o.bye or '').startswith('disconnected'))} disconnected")


def _join(items, timeout: float = SHUTDOWN_S) -> None:
    deadline = time.monotonic() + timeout
    for thread, out in items:
        thread.join(max(0.0, deadline - time.monotonic()))
        out.joined = not thread.is_alive()


def _median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _group(outcomes: list[DeviceOutcome], sessions: dict[str, dict]) -> dict:
    acks = [o.acks for o in outcomes]
    errors: Counter = Counter()
    for o in outcomes:
        errors.update(o.errors)
    return {
        "devices": len(outcomes),
        "acks_min": min(acks, default=0), "acks_median": _median(acks), "acks_max": max(acks, default=0),
        "acks_total": sum(acks),
        "got_none": [o.device for o in outcomes if o.acks == 0],
        "sent": sum(o.sent for o in outcomes),
        "errors": dict(sorted(errors.items())),
        "disconnected": sum(1 for o in outcomes if (o.bye or "").startswith("disconnected")),
        "failures": {o.device: o.failure for o in outcomes if o.failure},
        "not_joined": [o.device for o in outcomes if not o.joined],
        # the server's own count of each device's accepted batches
        "server_accepted": sum(sessions.get(o.device, {}).get("batches", 0) for o in outcomes),
        "server_states": dict(Counter(sessions.get(o.device, {}).get("state", "none") for o in outcomes)),
    }


def _results(cfg: FloodBenchConfig, bound: MemoryBound, overhead: float, run: _Run, loadavg_start) -> dict:
    server = run.server
    peak = max(server["vmhwm_mb"], run.peak_sampled_mb)
    limit = overhead + bound.data_mb
    well = [o for o in run.outcomes if not o.flooder]
    flood = [o for o in run.outcomes if o.flooder]
    sessions = server["sessions"]
    return {
        "config": asdict(cfg) | {"plan_batches": cfg.plan_batches()},
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__,
                    "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()},
        "bound": asdict(bound) | {"messages": bound.messages, "per_flooder": bound.per_flooder,
                                  "data_mb": bound.data_mb, "data_sent_mb": bound.data_sent_mb,
                                  "overhead_mb": overhead, "total_mb": limit},
        "memory": {"peak_rss_mb": peak, "vmhwm_mb": server["vmhwm_mb"], "peak_sampled_rss_mb": run.peak_sampled_mb,
                   "peak_over_overhead_mb": peak - overhead, "within_bound": bool(peak <= limit),
                   "rss_timeline": [[round(t, 2), round(mb, 1)] for t, mb in run.rss]},
        "server": {"alive": server["alive"], "stopped": server["stopped"], "drained": server["drained"],
                   "drain_rate": _drain_rate(run.progress, run.started_at, run.stopped_at, server["drained"]),
                   "errors_sent": server["errors_sent"], "bytes_received": server["bytes_received"],
                   "sessions": sessions, "progress": run.progress, "log_tail": run.stderr_tail},
        "well_behaved": _group(well, sessions) | {"acks": {o.device: o.acks for o in well}},
        "flooders": _group(flood, sessions) | {"acks": {o.device: o.acks for o in flood}},
        "every_device_served": all(o.acks > 0 for o in well),
        "wall_s": run.wall_s,
        "streamed_s": run.stopped_at - run.started_at,
    }


def _drain_rate(progress: list[dict], start: float, stop: float, drained: int) -> float:
    """Batches drained per second while the devices streamed, from the server's progress events (one a
    second; a run shorter than two of them: everything drained over the streaming span)."""
    inside = [p for p in progress if start <= p["mono"] <= stop]
    if len(inside) < 2:
        return drained / (stop - start)
    return (inside[-1]["drained"] - inside[0]["drained"]) / (inside[-1]["mono"] - inside[0]["mono"])


# -- the report --------------------------------------------------------------------------------
def print_flood_bench(results: dict, console: Any = None) -> None:
    """The devices table (both groups side by side), the memory table (peak beside the bound)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg, machine, bound, mem = results["config"], results["machine"], results["bound"], results["memory"]
    shape = f"{cfg['batch']}x{cfg['seq_len']}x{cfg['hidden']}"
    devices = Table(title=(f"sftool bench flood: {cfg['devices']} devices on loopback, {shape} fp16 "
                           f"({_size(bound['sent_message_bytes'])}), window {cfg['window']}, queue {cfg['queue_size']}, "
                           f"drain {cfg['drain_rate']:g}/s, {results['wall_s']:.1f} s; CPU: {machine['cpu']} "
                           f"({machine['cpus']} cores)"))
    rows = [[label, str(g["devices"]), str(g["acks_min"]), f"{g['acks_median']:g}", str(g["acks_max"]),
             str(len(g["got_none"])), str(g["sent"]), str(sum(g["errors"].values()))]
            for g, label in ((results[name], label) for name, label in GROUPS)]
    # a narrow terminal wraps the headers, never a figure; errors by code and disconnections follow below
    for i, col in enumerate(("devices", "count", "ACKs min", "median", "max", "got none", "sent", "errors")):
        devices.add_column(col, justify="left" if i == 0 else "right", min_width=max(len(r[i]) for r in rows))
    for row in rows:
        devices.add_row(*row)
    console.print(devices)
    memory = Table(title="server memory (child process, peak RSS)")
    for col in ("fixed overhead, 0 devices", "batch bound", "bound", "peak RSS", "peak - overhead", "within bound"):
        memory.add_column(col, justify="right")
    memory.add_row(f"{bound['overhead_mb']:.1f} MB", f"{bound['data_mb']:.0f} MB", f"{bound['total_mb']:.0f} MB",
                   f"{mem['peak_rss_mb']:.0f} MB", f"{mem['peak_over_overhead_mb']:.0f} MB",
                   "[green]yes[/]" if mem["within_bound"] else "[red]NO[/]")
    console.print(memory)

    def say(text: str) -> None:
        console.print(text, highlight=False)

    server, well = results["server"], results["well_behaved"]
    say(f"  batch bound: {MemoryBound(**{k: bound[k] for k in MemoryBound.__dataclass_fields__}).describe()}")
    say(f"  every well-behaved device served: {'yes' if results['every_device_served'] else 'NO: ' + ', '.join(well['got_none'])}"
        f"; server alive to the end: {'yes' if server['alive'] else 'NO'}; drained {server['drained']} batches "
        f"({server['drain_rate']:.0f}/s of {cfg['drain_rate']:g}/s); {server['errors_sent']} ERRORs sent")
    for name, label in GROUPS:
        g = results[name]
        errors = ", ".join(f"{code} {n}" for code, n in g["errors"].items()) or "none"
        say(f"  {label}: ERRORs by code {errors}; disconnected by the server {g['disconnected']} of {g['devices']}")
    say(f"  peak RSS: VmHWM {mem['vmhwm_mb']:.0f} MB, highest VmRSS sampled every {cfg['sample_every_s']:g} s "
        f"{mem['peak_sampled_rss_mb']:.0f} MB; load average {machine['loadavg_start'][0]:.2f} at the start, "
        f"{machine['loadavg_end'][0]:.2f} at the end")
    for name in ("well_behaved", "flooders"):
        g = results[name]
        if g["failures"] or g["not_joined"]:
            say(f"  {name}: failures {g['failures']}, threads not joined {g['not_joined']}")
