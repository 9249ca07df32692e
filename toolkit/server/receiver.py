"""The server's receiver thread: one ZeroMQ ROUTER socket, every message validated before use.

It owns the socket (ZeroMQ sockets are not thread-safe); the trainer talks to it only through
the bounded batch queue and a thread-safe notification channel. It never blocks on the trainer:
when the queue is full it keeps the batch aside and withholds the ACK, which is the device's
credit, so memory stays bounded by the queue, the devices' windows and what libzmq may queue per
connection (``2 x window + 8`` messages; docs/protocol.md, "Limits the server enforces").
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq
from sftool.runtime.manifest import Manifest
from sftool.runtime.protocol import (
    MAX_BATCH_FRAMES,
    Batch,
    BatchSchema,
    Bye,
    ErrorCode,
    Header,
    Hello,
    MsgType,
    ProtocolError,
    decode_batch,
    decode_header,
    encode,
    parse_message,
)

#: How far (as a fraction of its announced data) a device may run ahead of the slowest active device
#: before its credits are held back.
PACE_SLACK = 0.05

#: After its BYE to devices, how long the server keeps its socket open for their confirming BYE.
#: Closing at once can drop a connection while a device is still writing a batch, and libzmq then
#: aborts the device process (errno_assert in session_base clean_pipes; zeromq/libzmq#3442).
GOODBYE_GRACE_S = 2.0

log = logging.getLogger("sftool.server")
SERVER_ID = "server"

#: Messages handled in a row before the housekeeping (queue flush, trainer ACKs, held credits) runs.
BURST = 64
#: How often silent devices are looked for: a timeout found this much late is harmless, and the scan
#: over every session is not worth doing after each message.
TIMEOUT_CHECK_S = 0.1
# Plain ints: pyzmq's flag enums cost an IntFlag operation per frame.
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


#: When a batch is acknowledged (see ``Receiver.ack``).
ACK_POLICIES = ("queued", "taken", "trained")


@dataclass(frozen=True)
class LinkLimits:
    """What bounds the server's memory and time whatever devices send or claim (docs/protocol.md)."""

    #: Device sessions at once; a HELLO from a new device beyond it is refused.
    max_sessions: int = 256
    #: Most samples one device may announce, or send, in a run.
    max_samples_per_device: int = 10_000_000
    #: Invalid messages from one connection before it is disconnected for the rest of the run.
    max_strikes: int = 16
    #: Longest a pacing hold keeps one credit: a device that lags, or lies about its size, slows the
    #: others by at most this much per credit instead of stopping them.
    pace_max_hold_s: float = 30.0
    #: Device ids the server keeps a session record for, finished ones included (their counts go into
    #: the summary); a HELLO from a new id beyond it is refused, so churning ids cannot grow memory.
    max_known_devices: int = 1024


@dataclass
class AcceptedSplit:
    """One export the server accepts: its manifest (by hash) and the batch rules derived from it."""

    manifest_sha256: str
    manifest: Manifest
    schema: BatchSchema


@dataclass
class DeviceSession:
    device: str
    routing_id: bytes
    split: int
    precision: str
    wire_dtype: str
    connected_at: float
    last_seen: float
    #: The noise the device says it adds (HELLO's ``defense``): recorded, it cannot be checked.
    defense: str = "none"
    #: Every seq accepted from this device (dedupe for at-least-once delivery).
    seen: set[int] = field(default_factory=set)
    #: Accepted but not yet acknowledged (waiting for queue space, or for training when sequential).
    unacked: set[int] = field(default_factory=set)
    batches: int = 0
    samples: int = 0
    bytes_received: int = 0
    duplicates: int = 0
    rejected: int = 0
    said_bye: bool = False
    timed_out: bool = False
    #: Disconnected by the server for sending invalid messages.
    banned: bool = False
    #: Told by the server's BYE to stop (the run ended before the device was done).
    stopped_by_server: bool = False
    schema: BatchSchema | None = None
    skip_epochs: list[int] = field(default_factory=list)
    #: Samples the device announced it will send in this run (0: unknown, never paced).
    planned_samples: int = 0
    #: Most samples the device may send: what it announced, or the server's limit if it announced none.
    sample_cap: int = 0

    @property
    def finished(self) -> bool:
        return self.said_bye or self.timed_out or self.banned

    @property
    def state(self) -> str:
        """How the session stands: streaming, finished (said BYE when done), stopped (by the server's BYE),
        silent (timed out), disconnected (for invalid messages)."""
        if self.banned:
            return "disconnected"
        if self.stopped_by_server:
            return "stopped"
        if self.said_bye:
            return "finished"
        return "silent" if self.timed_out else "streaming"

    @property
    def progress(self) -> float | None:
        """Fraction of its announced samples received, None if it announced none."""
        return self.samples / self.planned_samples if self.planned_samples > 0 else None


@dataclass
class ReceivedBatch:
    """A validated batch plus where it came from; what the trainer consumes."""

    batch: Batch
    split: int
    received_at: float


class Receiver(threading.Thread):
    """Accepts devices, validates their batches and feeds the trainer's queue."""

    def __init__(
        self,
        bind: str,
        accepted: dict[str, AcceptedSplit],
        batches: queue.Queue[ReceivedBatch],
        window: int = 4,
        ack: str = "queued",
        device_timeout_s: float = 120.0,
        pace: bool = True,
        context: zmq.Context | None = None,
        curve: dict[str, Any] | None = None,
        device_keys: dict[str, str] | None = None,
        goodbye_grace_s: float = GOODBYE_GRACE_S,
        limits: LinkLimits = LinkLimits(),
    ):
        super().__init__(name="sftool-receiver", daemon=True)
        self.goodbye_grace_s = goodbye_grace_s
        #: With CurveZMQ: device id -> its Z85 public key. A message is taken only from the connection
        #: whose key (the ZAP User-Id) is the one bound to the device id it names.
        self.device_keys = device_keys
        self.accepted = accepted
        self.limits = limits
        self.queue = batches
        if ack not in ACK_POLICIES:
            raise ValueError(f"ack must be one of {ACK_POLICIES}")
        #: When a batch's ACK (the device's credit) goes out: "queued" (it entered the queue), "taken"
        #: (the trainer took it: the fixed release order holds batches outside the queue, and the
        #: devices' windows must bound that hold), "trained" (sequential split learning, window 1).
        self.ack = ack
        self.window = 1 if ack == "trained" else window
        # ACKs the trainer releases go out at the next poll: keep that wait short when credits depend
        # on the trainer, or a device with small batches waits a poll interval per credit.
        self._poll_ms = 50 if ack == "queued" else 5
        self.device_timeout_s = device_timeout_s
        #: Pace credits by announced data size, so devices finish together (see _ahead).
        self.pace = pace
        #: Credits a pacing hold keeps back: device -> [(seq, since)].
        self._held: dict[str, list[tuple[int, float]]] = {}
        #: Invalid messages per connection, and connections disconnected for them.
        self._strikes: dict[bytes, int] = {}
        self._banned: dict[bytes, None] = {}  # insertion-ordered: the oldest ban is forgotten first
        self.session_id = uuid.uuid4().hex[:12]
        self.sessions: dict[str, DeviceSession] = {}
        self.errors_sent = 0
        self.bytes_received = 0
        self._pending: deque[ReceivedBatch] = deque()
        self._trained: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._flags: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._stop_reason: str | None = None
        self._header_bytes = 0
        self._next_timeout_check = 0.0
        self._handlers: dict[MsgType, Callable[[bytes, Header, list], None]] = {
            MsgType.HELLO: self._on_hello,
            MsgType.BATCH: self._on_batch,
            MsgType.HEARTBEAT: self._on_heartbeat,
            MsgType.BYE: self._on_bye,
        }
        #: Trained seqs of a device (set by the trainer), sent in WELCOME so a device that comes
        #: back to a restarted server sends only what still needs training.
        self.done_seqs_for: Callable[[str], list[list[int]]] = lambda device: []
        #: Epochs a device need not send (the trainer replays them from its activation cache),
        #: decided once per device from the epochs and samples it announces in HELLO.
        self.plan_skip_epochs: Callable[[str, int, int, int], list[int]] = lambda device, epochs, samples, max_len: []
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # A reconnecting device reuses its identity; let the new connection take it over. With keys,
        # not: another allow-listed device could take a device's identity, and its replies, that way.
        # A dead connection then frees its identity through ZeroMQ heartbeats instead.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 0 if device_keys is not None else 1)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        # Drop (at the transport) any frame larger than the largest valid batch could be.
        largest = max(a.schema.max_frame_bytes for a in accepted.values())
        self.sock.setsockopt(zmq.MAXMSGSIZE, largest + 64 * 1024)
        self._max_message_bytes = max(a.schema.max_message_bytes for a in accepted.values())
        # libzmq queues whole messages per connection up to this many; past it, it stops reading that
        # connection (TCP backpressure), so a device ignoring its window cannot fill memory.
        self.sock.setsockopt(zmq.RCVHWM, 2 * self.window + 8)
        if curve:
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve["secret"]
            self.sock.curve_publickey = curve["public"]
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            from sftool.errors import SftoolError

            raise SftoolError(f"cannot bind {bind}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # zmq_poll on a prepared list: Socket.poll builds a Poller for every call.
        self._poll_items = [(self.sock, _POLLIN)]

    # -- API for the trainer thread ---------------------------------------------------------
    def acknowledge(self, device: str, seq: int) -> None:
        """The trainer took (``ack="taken"``) or trained (``ack="trained"``) a batch: its ACK goes out now."""
        self._trained.put((device, seq))

    def request_stop(self, reason: str) -> None:
        """Finish: tell every connected device to stop (BYE with the reason) and end the thread."""
        self._stop_reason = reason

    def snapshot(self) -> dict[str, DeviceSession]:
        with self._lock:
            return {k: DeviceSession(**vars(v)) for k, v in self.sessions.items()}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def all_finished(self, expected_devices: int) -> bool:
        """Every expected device has said BYE (or went silent) and nothing is left in flight."""
        with self._lock:
            done = sum(1 for s in self.sessions.values() if s.finished)
        return done >= expected_devices and not self._pending

    # -- thread body ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while self._stop_reason is None:
                if zmq.zmq_poll(self._poll_items, self._poll_ms):
                    self._handle_burst()
                self._housekeeping()
            self._await_goodbyes(self._say_goodbye(self._stop_reason))
        finally:
            self.sock.close(linger=500)
            self._stopped.set()

    def join_stopped(self, timeout: float | None = None) -> bool:
        """Wait until the thread has closed its socket; False if ``timeout`` passed first."""
        return self._stopped.wait(timeout)

    def _handle_burst(self) -> None:
        """Handle up to BURST waiting messages, then let the housekeeping run."""
        for _ in range(BURST):
            try:
                frames, oversized = self._recv_bounded()
            except zmq.Again:
                return
            self._on_message(frames, oversized)
            # Is another message waiting? The socket's EVENTS says so without the exception a failing
            # non-blocking recv raises (several times the cost).
            if not self.sock.getsockopt(_EVENTS) & _POLLIN:
                return

    def _housekeeping(self) -> None:
        """Between bursts: queue what waits for space, send the ACKs the trainer released, release held
        credits and, now and then, count silent devices as gone."""
        self._flush_pending()
        self._take_flags()
        self._send_trained_acks()
        self._release_held()
        now = time.monotonic()
        if now >= self._next_timeout_check:
            self._next_timeout_check = now + TIMEOUT_CHECK_S
            self._check_timeouts()

    # -- message handling -------------------------------------------------------------------
    def _recv_bounded(self) -> tuple[list[zmq.Frame], bool]:
        """One message, frame by frame: frames past the most a valid message has, or past its byte
        budget, are read and let go at once, never held together. True when it had too many."""
        recv = self.sock.recv
        frames = [recv(_NOBLOCK, copy=False)]
        total, oversized, more = 0, False, frames[0].more
        while more:  # the rest of a message is already here: libzmq delivers whole messages
            frame = recv(copy=False)
            more = frame.more
            total += len(frame)
            if oversized or len(frames) > MAX_BATCH_FRAMES or total > self._max_message_bytes:
                oversized = True
                continue
            frames.append(frame)
        return frames, oversized

    def _send(self, routing_id: bytes, msg_type: MsgType, **fields: Any) -> None:
        # Frame by frame with int flags: send_multipart's per-frame checks cost more than the sends.
        *head, last = encode(msg_type, SERVER_ID, **fields)
        send = self.sock.send
        send(routing_id, _SNDMORE)
        for frame in head:
            send(frame, _SNDMORE)
        send(last)

    def _error(self, routing_id: bytes, code: ErrorCode, reason: str, seq: int | None = None) -> None:
        self.errors_sent += 1
        log.warning("rejected a message from %r: %s", routing_id.decode(errors="replace"), reason)
        # The spec bounds a reason's length: a client drops an ERROR beyond it as malformed.
        fields: dict[str, Any] = {"code": int(code), "reason": reason if len(reason) <= 1024 else reason[:1021] + "..."}
        if seq is not None:
            fields["seq"] = seq
        self._send(routing_id, MsgType.ERROR, **fields)

    def _offender(self, frames: list[zmq.Frame]) -> bytes:
        """Who answers for a message: its connection's key with an allow-list (a device picks its own
        routing id, so that would let one device earn strikes for another), else the routing id."""
        if self.device_keys is not None:
            try:
                return (frames[-1].get("User-Id") or "").encode()
            except zmq.ZMQError:
                return b""
        return frames[0].bytes

    def _on_message(self, frames: list[zmq.Frame], oversized: bool = False) -> None:
        routing_id = frames[0].bytes
        offender = self._offender(frames)
        if offender in self._banned:
            return  # disconnected for the rest of the run: not even an answer
        if len(frames) < 2:
            return self._refuse(routing_id, ProtocolError(ErrorCode.BAD_HEADER, "empty message"), offender)
        if oversized:
            return self._refuse(routing_id, ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"message exceeds {MAX_BATCH_FRAMES} frames or {self._max_message_bytes} bytes: dropped unread"), offender)
        self._header_bytes = len(frames[1])
        try:
            header = decode_header(frames[1].buffer)
            self._check_key(frames[1], header, routing_id)
            handler = self._handlers.get(header.type)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"a device may not send {header.type.value}")
            handler(routing_id, header, frames[2:])
            session = self.sessions.get(header.device)
            if session is not None and session.routing_id == routing_id:
                session.last_seen = time.monotonic()  # only a valid message shows a device is alive
        except ProtocolError as exc:
            self._refuse(routing_id, exc, offender)
        except Exception as exc:  # a bug in handling one message must not take the server down
            log.exception("internal error handling a message")
            self._error(routing_id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _refuse(self, routing_id: bytes, exc: ProtocolError, offender: bytes) -> None:
        """Answer a refused message with an ERROR; disconnect whoever keeps sending them."""
        session = self._session_for(routing_id)
        own = session is not None and (self.device_keys is None or self.device_keys.get(session.device, "").encode() == offender)
        if own:
            session.rejected += 1
        self._error(routing_id, exc.code, exc.reason, exc.seq)
        if len(self._strikes) > 4 * self.limits.max_sessions and offender not in self._strikes:
            self._strikes.pop(next(iter(self._strikes)))  # bounded: forget the oldest offender
        strikes = self._strikes[offender] = self._strikes.get(offender, 0) + 1
        if strikes >= self.limits.max_strikes:
            self.disconnect(routing_id, f"{strikes} invalid messages", offender, session if own else None)

    def disconnect(self, routing_id: bytes, why: str, offender: bytes, session: DeviceSession | None) -> None:
        """End a connection for the rest of the run: BYE with the reason, then ignore it (and, with
        keys, its key); the session it owns, if any, ends too."""
        log.warning("disconnecting %r: %s", routing_id.decode(errors="replace"), why)
        self._banned[offender] = None
        if len(self._banned) > self.limits.max_known_devices:
            self._banned.pop(next(iter(self._banned)))  # bounded: it must earn its strikes again
        if session is not None:
            with self._lock:
                session.banned = True
            self._held.pop(session.device, None)
        self._send(routing_id, MsgType.BYE, reason=f"disconnected: {why}")

    def flag(self, device: str, why: str) -> None:
        """The trainer refused a batch of this device (its step would not have been finite): a strike."""
        self._flags.put((device, why))

    def _take_flags(self) -> None:
        while not self._flags.empty():  # this thread is the only reader: not empty means a get succeeds
            device, why = self._flags.get_nowait()
            session = self.sessions.get(device)
            if session is not None and not session.banned:
                offender = self.device_keys.get(device, "").encode() if self.device_keys is not None else session.routing_id
                self._refuse(session.routing_id, ProtocolError(ErrorCode.BAD_VALUES, why), offender)

    def _check_key(self, frame: zmq.Frame, header: Header, routing_id: bytes) -> None:
        """With an allow-list, the connection's key must be the key bound to the device id it names, and
        its ZeroMQ identity that device id (so no other connection can hold that device's replies)."""
        if self.device_keys is None:
            return
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            user = None
        if user is None or self.device_keys.get(header.device) != user:
            raise ProtocolError(ErrorCode.NOT_AUTHORIZED, f"this connection's key may not speak for device {header.device!r}")
        if routing_id != header.device.encode():
            raise ProtocolError(ErrorCode.NOT_AUTHORIZED, "with keys, a device's ZeroMQ identity must be its device id")

    def _session_for(self, routing_id: bytes) -> DeviceSession | None:
        for session in self.sessions.values():
            if session.routing_id == routing_id:
                return session
        return None

    def _welcomed(self, routing_id: bytes, header: Header) -> DeviceSession:
        session = self.sessions.get(header.device)
        if session is None or session.routing_id != routing_id:
            raise ProtocolError(ErrorCode.NOT_WELCOMED, f"device {header.device!r} must say HELLO first")
        return session

    def _on_hello(self, routing_id: bytes, header: Header, frames: list) -> None:
        # Every check comes before any change: a refused HELLO leaves no trace.
        hello = parse_message(header)
        assert isinstance(hello, Hello)
        accepted = self.accepted.get(hello.manifest_sha256)
        if accepted is None:
            raise ProtocolError(
                ErrorCode.MANIFEST_MISMATCH,
                f"manifest {hello.manifest_sha256[:12]} is not one this server accepts (export the device artifacts "
                f"from the same model; accepted splits: {sorted(a.manifest.split for a in self.accepted.values())})",
            )
        if hello.split != accepted.manifest.split:
            raise ProtocolError(ErrorCode.MANIFEST_MISMATCH, f"split {hello.split} != manifest split {accepted.manifest.split}")
        token_labels = hello.labels == "token"
        if token_labels != accepted.schema.token_labels:
            trains = "a causal LM (token labels)" if accepted.schema.token_labels else "a classifier (class labels)"
            raise ProtocolError(ErrorCode.REFUSED, f"this server trains {trains}; the device sends {hello.labels} labels")
        if hello.num_samples > self.limits.max_samples_per_device:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"{hello.num_samples} samples announced; this server takes at most "
                                f"{self.limits.max_samples_per_device} per device")
        session = self.sessions.get(hello.device)
        if session is None and sum(not s.finished for s in self.sessions.values()) >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"the server has {self.limits.max_sessions} devices already")
        if session is None and len(self.sessions) >= self.limits.max_known_devices:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"the server has seen {self.limits.max_known_devices} device ids in this run")
        if session is not None and session.banned:
            raise ProtocolError(ErrorCode.REFUSED, f"device {hello.device!r} was disconnected for invalid messages")
        schema = accepted.schema.for_wire(hello.wire_dtype)
        now = time.monotonic()
        if session is None:
            epochs = hello.epochs
            samples = max(hello.num_samples, 0)
            skip = self.plan_skip_epochs(hello.device, epochs, samples // epochs, accepted.manifest.max_seq_len)
            session = DeviceSession(
                device=hello.device, routing_id=routing_id, split=hello.split, precision=hello.precision,
                wire_dtype=hello.wire_dtype, connected_at=now, last_seen=now, schema=schema, skip_epochs=skip,
                defense=hello.defense, planned_samples=samples * max(0, epochs - len(skip)) // epochs,
            )
            # Announced 0 means 0; only -1 (unknown) leaves the server's own limit.
            session.sample_cap = session.planned_samples if hello.num_samples >= 0 else self.limits.max_samples_per_device
            with self._lock:
                self.sessions[hello.device] = session
            log.info("device %s joined: split %d, %s, wire %s", hello.device, hello.split, hello.precision, hello.wire_dtype)
        else:
            # A reconnect (or, without keys, another connection naming this device): keep what was
            # seen, so resent batches are deduplicated.
            with self._lock:
                # A device back after its BYE streams again (its seen seqs still dedupe what it resends).
                session.routing_id, session.last_seen, session.timed_out, session.said_bye = routing_id, now, False, False
                session.split, session.precision, session.wire_dtype, session.schema, session.defense = (
                    hello.split, hello.precision, hello.wire_dtype, schema, hello.defense)
            log.info("device %s reconnected", hello.device)
        self._send(
            routing_id,
            MsgType.WELCOME,
            window=self.window,
            session=self.session_id,
            skip_epochs=session.skip_epochs,
            done_seqs=self.done_seqs_for(hello.device),
        )

    def _on_batch(self, routing_id: bytes, header: Header, frames: list) -> None:
        session = self._welcomed(routing_id, header)
        assert session.schema is not None
        buffers = [f.buffer for f in frames]
        batch = decode_batch(header, buffers, session.schema)
        nbytes = sum(map(len, frames)) + self._header_bytes
        if batch.seq in session.seen:
            # A resend after a reconnect: never train it twice; re-ACK unless its ACK is still due.
            session.duplicates += 1
            if batch.seq not in session.unacked:
                self._send(routing_id, MsgType.ACK, seq=batch.seq)
            return
        if len(session.unacked) >= self.window:
            raise ProtocolError(ErrorCode.WINDOW_EXCEEDED,
                                f"BATCH seq {batch.seq}: {len(session.unacked)} batches unacknowledged, window {self.window}",
                                seq=batch.seq)
        cap = session.sample_cap
        if session.samples + batch.size > cap:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"BATCH seq {batch.seq}: more samples than the {cap} announced", seq=batch.seq)
        with self._lock:
            session.seen.add(batch.seq)
            session.unacked.add(batch.seq)
            session.batches += 1
            session.samples += batch.size
            session.bytes_received += nbytes
            self.bytes_received += nbytes
        self._pending.append(ReceivedBatch(batch, session.split, time.monotonic()))
        self._flush_pending()

    def _on_heartbeat(self, routing_id: bytes, header: Header, frames: list) -> None:
        parse_message(header)
        self._welcomed(routing_id, header)
        self._send(routing_id, MsgType.HEARTBEAT)

    def _on_bye(self, routing_id: bytes, header: Header, frames: list) -> None:
        bye = parse_message(header)
        assert isinstance(bye, Bye)
        session = self._welcomed(routing_id, header)
        with self._lock:
            session.said_bye = True
        self._held.pop(session.device, None)
        log.info("device %s finished: %d batches, %d samples", session.device, session.batches, session.samples)
        self._send(routing_id, MsgType.BYE, reason="bye")

    # -- flow control -----------------------------------------------------------------------
    def _flush_pending(self) -> None:
        while self._pending:
            item = self._pending[0]
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                return  # backpressure: the ACK (credit) waits until the trainer catches up
            self._pending.popleft()
            if self.ack == "queued":
                self._ack(item.batch.device, item.batch.seq)

    def _send_trained_acks(self) -> None:
        while not self._trained.empty():  # this thread is the only reader
            device, seq = self._trained.get_nowait()
            self._ack(device, seq)

    def _ack(self, device: str, seq: int) -> None:
        session = self.sessions.get(device)
        if session is None:
            return
        if self._ahead(session):
            # This credit waits for the others to catch up, but not for longer than pace_max_hold_s.
            self._held.setdefault(device, []).append((seq, time.monotonic()))
            return
        self._send_ack(session, seq)

    def _send_ack(self, session: DeviceSession, seq: int) -> None:
        session.unacked.discard(seq)
        self._send(session.routing_id, MsgType.ACK, seq=seq)

    def _ahead(self, session: DeviceSession) -> bool:
        """Is this device further through its data than the slowest active device, by more than PACE_SLACK?

        Devices stream at the same rate whatever their data size, so without pacing one with less data
        finishes early and the rest of the run sees only the others' labels: with one label per device,
        the last half of a run could train on one class (measured: SST-2 eval accuracy 0.61 instead of
        0.83). Pacing credits by announced size keeps every device's share of the stream (and of the
        mixing buffer) steady from start to end. A lagging device slows the others; a silent one stops
        counting at the device timeout.
        """
        mine = session.progress
        if not self.pace or mine is None:
            return False
        others = [
            s.progress for s in self.sessions.values()
            if s is not session and not s.finished and s.progress is not None and s.progress < 1.0
        ]
        return bool(others) and mine > min(others) + PACE_SLACK

    def _release_held(self) -> None:
        if not self._held:
            return
        now = time.monotonic()
        for device in list(self._held):
            session = self.sessions[device]
            held = self._held[device]
            if not self._ahead(session) or now - held[0][1] > self.limits.pace_max_hold_s:
                del self._held[device]
                for seq, _ in held:
                    self._send_ack(session, seq)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            for session in self.sessions.values():
                if not session.finished and now - session.last_seen > self.device_timeout_s:
                    session.timed_out = True
                    log.warning("device %s silent for %.0fs: counted as gone", session.device, self.device_timeout_s)

    def _say_goodbye(self, reason: str) -> set[bytes]:
        """BYE with ``reason`` to every device still streaming; returns their routing ids."""
        streaming = [session for session in self.sessions.values() if not session.finished]
        with self._lock:
            for session in streaming:
                session.stopped_by_server = True
        for session in streaming:
            self._send(session.routing_id, MsgType.BYE, reason=reason)
        return {session.routing_id for session in streaming}

    def _await_goodbyes(self, told: set[bytes]) -> None:
        """Keep the socket open until every device in ``told`` has confirmed with its BYE (or
        ``goodbye_grace_s`` passed), so devices close their connections first. Anything else that
        arrives now is dropped: the run is over."""
        deadline = time.monotonic() + self.goodbye_grace_s
        while told and time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart(copy=False)
            try:
                if len(frames) >= 2 and decode_header(frames[1].buffer).type == MsgType.BYE:
                    told.discard(frames[0].bytes)
            except ProtocolError:
                continue
