"""The device's ZeroMQ client: handshake, credit-limited streaming, heartbeats, reconnect.

Delivery is at-least-once: a batch stays in memory until the server acknowledges it, and after a
reconnect every unacknowledged batch is sent again (the server drops duplicates by seq). Memory
stays bounded because the server's window caps the number of unacknowledged batches.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import zmq
from sftool.errors import SftoolError
from sftool.runtime.protocol import (
    MAX_SERVER_HEADER_BYTES,
    ErrorCode,
    MsgType,
    ProtocolError,
    decode_header,
    encode,
    parse_message,
)
from zmq.utils.monitor import recv_monitor_message

# Plain ints: pyzmq's flag enums cost an IntFlag operation per use.
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


@dataclass
class ClientConfig:
    endpoint: str
    device_id: str
    manifest_sha256: str
    split: int
    precision: str
    wire_dtype: str = "fp16"
    epochs: int = 1
    num_samples: int = -1
    heartbeat_s: float = 2.0
    #: Silence from the server for this long triggers a reconnect.
    server_timeout_s: float = 30.0
    #: Reconnects after a lost server before giving up (None: until stopped).
    max_reconnects: int | None = None
    #: How long to wait for the server's answer to one HELLO before trying again.
    hello_timeout_s: float = 30.0
    #: How long to keep trying to reach the server, with backoff (None: until stopped).
    connect_timeout_s: float | None = None
    #: Backoff between attempts: doubles from the first value up to the second.
    retry_backoff_s: tuple[float, float] = (1.0, 30.0)
    curve: dict[str, bytes] | None = None  # {"server_public", "public", "secret"} for CurveZMQ
    #: HELLO's ``defense``: the noise this device adds to its activations (runtime/activation_noise.py).
    defense: str = "none"
    #: HELLO's ``labels``: ``class`` ids per sample, or ``token`` labels per position (causal LM).
    labels: str = "class"


@dataclass
class OutgoingBatch:
    """A batch ready to send: its seq, number of samples and encoded frames."""

    seq: int
    samples: int
    frames: list[Any]

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames)


class BatchPlan(Protocol):
    """A device's batches, addressable by seq, so any of them can be rebuilt after a server restart.

    Batch contents must be a pure function of the seq (the device's data and bucketing are
    deterministic); ``make`` does the compute (tokenize + ONNX forward).
    """

    def seqs(self) -> Sequence[int]: ...

    def make(self, seq: int) -> OutgoingBatch: ...


def ranges_to_set(ranges: Sequence[Sequence[int]]) -> set[int]:
    """[[start, end), ...] -> the set of ints they cover (WELCOME's compact ``done_seqs``)."""
    return {i for start, end in ranges for i in range(int(start), int(end))}


def set_to_ranges(values: set[int]) -> list[list[int]]:
    """The inverse of ``ranges_to_set``: sorted half-open ranges."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out


@dataclass
class ClientReport:
    batches_sent: int = 0
    batches_acked: int = 0
    samples_acked: int = 0
    bytes_sent: int = 0
    resent: int = 0
    reconnects: int = 0
    rejected: list[str] = field(default_factory=list)
    finished_by_server: str | None = None
    skip_epochs: list[int] = field(default_factory=list)


class HandshakeWatch:
    """The ZeroMQ handshake of one connection attempt, from the socket's monitor events: turns a
    refused key or a security mismatch (which the application never sees as a message) into a message."""

    #: Connections closed before their CurveZMQ handshake completed, in a row, before blaming the keys.
    MAX_BROKEN_HANDSHAKES = 3
    EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def __init__(self, sock: zmq.Socket, ctx: zmq.Context, config: ClientConfig):
        self.sock, self.config = sock, config
        address = f"inproc://sftool-handshake-{uuid.uuid4().hex}"
        sock.monitor(address, self.EVENTS)
        self.events: zmq.Socket | None = ctx.socket(zmq.PAIR)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.connect(address)
        self._open_handshake = False
        self._broken = 0

    def problem(self) -> str | None:
        """A one-line explanation once the handshake has failed for a reason retrying cannot fix, else None."""
        while self.events is not None:
            try:
                event = recv_monitor_message(self.events, zmq.NOBLOCK)
            except zmq.Again:
                return None
            problem = self._on_event(event["event"], int(event["value"] or 0))
            if problem:
                return problem
        return None

    def _on_event(self, event: int, value: int) -> str | None:
        c = self.config
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the server at {c.endpoint} refused this device's key (ZAP status {value}): its public key must be "
                    f"{c.device_id}.key in the server's --allow-keys folder")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                if c.curve:
                    return f"the server at {c.endpoint} does not use CurveZMQ (it runs without --curve-secret): drop the keys or restart it with them"
                return f"the server at {c.endpoint} requires CurveZMQ: give --server-key and --device-key"
            return f"the handshake with {c.endpoint} failed (ZeroMQ protocol error {value:#x})"
        if event == zmq.EVENT_CONNECTED:
            self._open_handshake = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._open_handshake, self._broken = False, 0
        elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) and self._open_handshake:
            # A server that cannot decrypt our HELLO (we hold the wrong server key) just hangs up.
            self._open_handshake = False
            self._broken += 1
            if c.curve and self._broken >= self.MAX_BROKEN_HANDSHAKES:
                return (f"the CurveZMQ handshake with {c.endpoint} failed {self._broken} times: --server-key is "
                        "probably not this server's public key")
        return None

    def close(self) -> None:
        """Stop watching (the socket itself stays open)."""
        if self.events is None:
            return
        if not self.sock.closed:
            self.sock.disable_monitor()
        self.events.close(linger=0)
        self.events = None


class DeviceClient:
    """Streams batches to the server under its credit window."""

    def __init__(self, config: ClientConfig, context: zmq.Context | None = None):
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.window = 1
        self.report = ClientReport()
        self._last_heard = time.monotonic()
        self._last_sent = time.monotonic()
        self._unacked: OrderedDict[int, OutgoingBatch] = OrderedDict()
        self._session: str | None = None
        self._done: set[int] = set()  # seqs the server says are already trained (after its restart)
        self._restarted = False
        self._acked: dict[int, int] = {}  # seq -> samples, acknowledged by the current server

    # -- connection -------------------------------------------------------------------------
    def _open(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, self.config.device_id.encode())
        if self.config.curve:
            sock.curve_serverkey = self.config.curve["server_public"]
            sock.curve_publickey = self.config.curve["public"]
            sock.curve_secretkey = self.config.curve["secret"]
        # A refused key or a security mismatch never reaches the application: only the socket's
        # events tell, so connect() watches them until the server's WELCOME.
        self._handshake = HandshakeWatch(sock, self.ctx, self.config)
        sock.connect(self.config.endpoint)
        self.sock = sock

    def _close(self, linger_ms: int = 0) -> None:
        if self.sock is not None:
            self.sock.close(linger=linger_ms)
            self.sock = None

    def _send(self, frames: list[Any]) -> None:
        assert self.sock is not None
        self.sock.send_multipart(frames, copy=False)
        self._last_sent = time.monotonic()

    def connect(self) -> dict[str, Any]:
        """Open the socket, say HELLO and wait for WELCOME. Returns the WELCOME fields."""
        self._open()
        c = self.config
        hello = encode(
            MsgType.HELLO,
            c.device_id,
            manifest_sha256=c.manifest_sha256,
            split=c.split,
            precision=c.precision,
            wire_dtype=c.wire_dtype,
            num_samples=c.num_samples,
            epochs=c.epochs,
            defense=c.defense,
            labels=c.labels,
        )
        self._send(hello)
        deadline = time.monotonic() + c.hello_timeout_s
        watch = self._handshake
        while time.monotonic() < deadline:
            header, _ = self._recv(timeout_s=min(0.25, max(0.0, deadline - time.monotonic())))
            if header is None:
                problem = watch.problem()
                if problem:
                    watch.close()
                    self._close()
                    raise SftoolError(problem)
                continue
            if header.type == MsgType.WELCOME:
                watch.close()
                self._on_welcome(header.fields)
                return header.fields
            if header.type == MsgType.ERROR:
                watch.close()
                self._close()
                raise SftoolError(f"server refused this device: {header.fields.get('reason', 'no reason given')}")
        watch.close()
        self._close()
        hint = " (CurveZMQ: the server may have refused this device's key, or --server-key is not its key)" if c.curve else ""
        raise TimeoutError(f"no answer from {c.endpoint} within {c.hello_timeout_s:.0f}s{hint}")

    def connect_retrying(self, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """``connect`` until the server answers, with backoff, for ``connect_timeout_s`` (None: until
        stopped): devices and server of a fleet start in any order. A refusal is final."""
        c = self.config
        deadline = None if c.connect_timeout_s is None else time.monotonic() + c.connect_timeout_s
        wait, attempt = c.retry_backoff_s[0], 1
        while True:
            try:
                return self.connect()
            except TimeoutError as exc:
                if deadline is not None and time.monotonic() + wait > deadline:
                    raise TimeoutError(f"{exc}; gave up after {c.connect_timeout_s:.0f}s of retries") from None
                if log:
                    log(f"{c.device_id}: no answer from {c.endpoint} (attempt {attempt}); retrying in {wait:.0f}s")
                time.sleep(wait)
                wait, attempt = min(2 * wait, c.retry_backoff_s[1]), attempt + 1

    def _on_welcome(self, fields: dict[str, Any]) -> None:
        self.window = max(1, int(fields.get("window", 1)))
        self.report.skip_epochs = [int(e) for e in fields.get("skip_epochs", [])]
        session = str(fields.get("session", ""))
        if self._session is not None and session != self._session:
            # A different server process: what the old one acknowledged but had not trained is
            # gone with it. It tells us what is trained (from its checkpoint); redo the rest.
            self._restarted = True
        self._session = session
        self._done = ranges_to_set(fields.get("done_seqs", []))

    def _recv(self, timeout_s: float):
        assert self.sock is not None
        # Without a wait, the socket's EVENTS tells whether a message is here, and the GIL is kept (a
        # poll lets another thread take it); with one, zmq_poll on this socket alone (Socket.poll
        # builds a Poller per call).
        wait_ms = int(timeout_s * 1000)
        if wait_ms <= 0:
            if not self.sock.getsockopt(_EVENTS) & _POLLIN:
                return None, []
        elif not zmq.zmq_poll([(self.sock, _POLLIN)], wait_ms):
            return None, []
        frames = self.sock.recv_multipart(copy=True)
        try:
            header = decode_header(frames[0], MAX_SERVER_HEADER_BYTES)
            parse_message(header)
        except ProtocolError:
            return None, []  # a server we cannot parse is treated like silence
        self._last_heard = time.monotonic()
        return header, frames[1:]

    def _reconnect(self) -> None:
        self._close()
        self.report.reconnects += 1
        limit = self.config.max_reconnects
        if limit is not None and self.report.reconnects > limit:
            raise SftoolError(
                f"lost the server at {self.config.endpoint} ({self.config.max_reconnects} reconnects failed); "
                f"{len(self._unacked)} batches were not acknowledged"
            )
        try:
            self.connect()
        except TimeoutError:
            return  # counted; the main loop tries again
        if self._restarted:
            return  # stream() rebuilds its to-do list from the new server's done_seqs
        for batch in self._unacked.values():
            self._send(batch.frames)
            self.report.resent += 1

    # -- streaming --------------------------------------------------------------------------
    def stream(self, plan: BatchPlan, on_ack: Callable[[OutgoingBatch], None] | None = None) -> ClientReport:
        """Send every batch of ``plan`` (computing each only when the window has room) until all are acked.

        Batches are built lazily, so a device computes batch n+1 while batch n is in flight and
        never runs ahead of the server's window. If the server restarts, the batches it has not
        trained are rebuilt from the plan and sent again.
        """
        if self.sock is None:
            try:
                self.connect_retrying()
            except TimeoutError as exc:
                raise SftoolError(f"cannot reach the server: {exc}") from None
        todo = [seq for seq in plan.seqs() if seq not in self._done]
        position = 0
        while True:
            if self._restarted:
                # Everything not trained by the new server's reckoning is redone, including batches
                # the old process acknowledged but never trained.
                self._restarted = False
                redo = (set(self._acked) | set(self._unacked)) - self._done
                self.report.resent += len(redo)
                self._acked = {seq: n for seq, n in self._acked.items() if seq in self._done}
                self.report.batches_acked, self.report.samples_acked = len(self._acked), sum(self._acked.values())
                self._unacked.clear()
                todo = [seq for seq in plan.seqs() if seq not in self._done]
                position = 0
            while position < len(todo) and self.report.finished_by_server is None and len(self._unacked) < self.window:
                batch = plan.make(todo[position])
                position += 1
                if self.sock is not None:
                    self._send(batch.frames)
                self._unacked[batch.seq] = batch
                self.report.batches_sent += 1
                self.report.bytes_sent += batch.nbytes
                self._drain(0.0, on_ack)  # pick up ACKs that arrived while computing
            if self.report.finished_by_server is not None or (position >= len(todo) and not self._unacked):
                if not self._restarted:
                    break
                continue
            self._drain(min(self.config.heartbeat_s, 0.5), on_ack)
            now = time.monotonic()
            if self.sock is None or now - self._last_heard > self.config.server_timeout_s:
                self._reconnect()
            elif now - self._last_sent > self.config.heartbeat_s:
                self._send(encode(MsgType.HEARTBEAT, self.config.device_id))
        return self.report

    def _drain(self, timeout_s: float, on_ack: Callable[[OutgoingBatch], None] | None) -> None:
        """Handle every message waiting (blocking at most ``timeout_s`` for the first)."""
        if self.sock is None:
            return
        header, _ = self._recv(timeout_s)
        while header is not None:
            self._handle(header, on_ack)
            header, _ = self._recv(0.0)

    def _handle(self, header, on_ack) -> None:
        if header.type == MsgType.ACK:
            batch = self._unacked.pop(header.fields.get("seq"), None)
            if batch is not None:  # a duplicate ACK after a resend is harmless
                if batch.seq not in self._acked:  # a running total: summing every ACK would grow with the run
                    self.report.samples_acked += batch.samples
                self._acked[batch.seq] = batch.samples
                self.report.batches_acked = len(self._acked)
                if on_ack:
                    on_ack(batch)
        elif header.type == MsgType.ERROR:
            seq = header.fields.get("seq")
            reason = str(header.fields.get("reason", ""))
            if seq in self._unacked:
                # The server dropped this batch as invalid: resending the same bytes cannot help.
                self._unacked.pop(seq)
                self.report.rejected.append(f"seq {seq}: {reason}")
            elif header.fields.get("code") in (ErrorCode.NOT_WELCOMED, ErrorCode.MANIFEST_MISMATCH):
                # The server restarted and forgot us: say HELLO again, resend what is pending.
                self._reconnect()
            else:
                self.report.rejected.append(reason)
        elif header.type == MsgType.BYE:
            self.report.finished_by_server = str(header.fields.get("reason", "done"))
        elif header.type == MsgType.WELCOME:
            self._on_welcome(header.fields)

    def close(self, send_bye: bool = True, wait_s: float = 2.0) -> None:
        """Say BYE (with totals) and wait briefly for the server's confirmation; after the server's
        own BYE, confirm it instead, and let the socket deliver that before it closes (the server
        keeps its connection open until then)."""
        if self.sock is None or not send_bye:
            return self._close()
        self._send(
            encode(
                MsgType.BYE, self.config.device_id, batches=self.report.batches_acked, samples=self.report.samples_acked
            )
        )
        if self.report.finished_by_server is not None:
            return self._close(linger_ms=int(wait_s * 1000))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            header, _ = self._recv(0.2)
            if header is not None and header.type == MsgType.BYE:
                break
        self._close()
