"""Fuzzing the device-server link: mutated messages against a real `Receiver` on loopback.

Every message starts as a valid HELLO, BATCH, HEARTBEAT or BYE of a welcomed device and is then
mutated: header fields (wrong types, out of range, missing, extra), the envelope (`v`, `type`,
`device`), the `arrays` specs (names, dtypes, shapes), the frames (truncated, extended, dropped,
added, bit flips, not msgpack, bin and ext types) and the values (NaN, Inf, beyond the bound, masks,
labels, sample ids). Seeded random mutators do most of it; `hypothesis` strategies add arbitrary
values. Scripted scenarios abuse the protocol's state (batches before HELLO, seq extremes, the
window, the announced samples, the session cap, BYE for another device, a device that ignores its
ERRORs, HELLO/BYE churn).

What a message should get is decided here, independently of the receiver, from docs/protocol.md:
an oracle reads the frames with its own checks and its own model of the sessions, and says which
ERROR codes would name the problem, or which reply a valid message gets. The receiver runs in its
own process (``python -m sftool.link_fuzz serve``), so its RSS is the server's alone; a consumer
there takes every batch from the trainer's queue and checks it on its own (shapes, dtypes, finite,
within the bound, mask, labels, distinct ids) before the batch's content is matched against what
the oracle expected to be queued.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import select
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import msgpack
import numpy as np

#: The only export the fuzzed server accepts, and its split.
SHA = "5f" * 32
SPLIT = 2
MAX_INT = 2**31 - 1
#: Types a device may send, and every type of the protocol (docs/protocol.md section 3).
DEVICE_TYPES = ("HELLO", "BATCH", "HEARTBEAT", "BYE")
ALL_TYPES = (*DEVICE_TYPES, "WELCOME", "ACK", "ERROR")
#: Error codes by number (docs/protocol.md section 7).
CODE_NAMES = {1: "BAD_HEADER", 2: "BAD_ARRAY", 3: "UNKNOWN_TYPE", 4: "VERSION_MISMATCH", 5: "MANIFEST_MISMATCH",
              6: "NOT_WELCOMED", 7: "REFUSED", 8: "INTERNAL", 9: "NOT_AUTHORIZED", 10: "WINDOW_EXCEEDED",
              11: "LIMIT_EXCEEDED", 12: "BAD_VALUES"}
CODE = {name: number for number, name in CODE_NAMES.items()}
#: The four arrays of a BATCH: allowed dtypes and rank (section 3).
ARRAY_RULES = {"hidden": (("float16", "float32"), 3), "attention_mask": (("uint8",), 2),
               "labels": (("int64",), 1), "sample_ids": (("int64",), 1)}
WIRE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int64": np.dtype("<i8"), "uint8": np.dtype("u1")}
HEADER_LIMIT = 16 * 1024
SERVER_HEADER_LIMIT = 1 << 20


@dataclass(frozen=True)
class FuzzConfig:
    """The fuzzed server: a tiny export (H=8, T<=16, B<=4, 3 labels) and its link limits."""

    hidden_size: int = 8
    max_seq_len: int = 16
    max_batch: int = 4
    num_labels: int = 3
    #: |activation| bound, given to the server explicitly so nothing here recomputes its formula.
    bound: float = 24.0
    queue_size: int = 16
    window: int = 4
    devices: int = 8
    max_sessions: int = 4096
    #: Large for the campaign (one device sends thousands of invalid messages); small in the scenarios.
    max_strikes: int = 1_000_000_000
    max_samples: int = 10_000_000
    #: Long enough for a loaded machine: a reply that comes later is counted as stray, and its message as unanswered.
    reply_timeout_s: float = 3.0

    @property
    def largest_array_frame(self) -> int:
        """The largest array frame of a valid BATCH: hidden as float32 at the largest shape."""
        return self.max_batch * self.max_seq_len * self.hidden_size * 4

    @property
    def largest_frame(self) -> int:
        """The largest frame of a valid BATCH: its biggest array, or a header at its 16 KiB limit."""
        return max(self.largest_array_frame, HEADER_LIMIT)

    @property
    def largest_message(self) -> int:
        """Bytes of the largest valid BATCH: all four arrays at the largest shape, and the header's limit."""
        b, t = self.max_batch, self.max_seq_len
        return self.largest_array_frame + b * t + 8 * b + 8 * b + HEADER_LIMIT


# -- independent checks from docs/protocol.md ------------------------------------------------

def is_printable(text: str) -> bool:
    """No Unicode 'Other' or 'Separator' character except the ASCII space."""
    return all(ch == " " or unicodedata.category(ch)[0] not in "CZ" for ch in text)


def _int_ok(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _str_ok(value: Any, max_len: int, min_len: int = 0) -> bool:
    return isinstance(value, str) and min_len <= len(value) <= max_len and is_printable(value)


def _hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _ranges(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 65536 and all(
        isinstance(p, list) and len(p) == 2 and _int_ok(p[0], 0, MAX_INT + 1) and _int_ok(p[1], 0, MAX_INT + 1)
        and p[0] < p[1] for p in value)


#: Fields per message type: name -> (required, check), as the spec's tables state them.
FIELD_RULES: dict[str, dict[str, tuple[bool, Callable[[Any], bool]]]] = {
    "HELLO": {
        "manifest_sha256": (True, _hex64),
        "split": (True, lambda v: _int_ok(v, 1, 4096)),
        "precision": (True, lambda v: _str_ok(v, 32)),
        "wire_dtype": (True, lambda v: isinstance(v, str) and v in ("fp16", "fp32")),
        "num_samples": (False, lambda v: _int_ok(v, -1, MAX_INT)),
        "epochs": (False, lambda v: _int_ok(v, 1, 1000)),
    },
    "BATCH": {
        "seq": (True, lambda v: _int_ok(v, 0, MAX_INT)),
        "arrays": (True, lambda v: isinstance(v, list)),
        "epoch": (False, lambda v: _int_ok(v, 0, 999)),
    },
    "HEARTBEAT": {},
    "BYE": {
        "batches": (False, lambda v: _int_ok(v, 0, MAX_INT)),
        "samples": (False, lambda v: _int_ok(v, 0, MAX_INT)),
        "reason": (False, lambda v: _str_ok(v, 256)),
    },
    "WELCOME": {
        "window": (True, lambda v: _int_ok(v, 1, 1024)),
        "session": (True, lambda v: _str_ok(v, 64)),
        "skip_epochs": (False, lambda v: isinstance(v, list) and len(v) <= 1000 and all(_int_ok(e, 0, 999) for e in v)),
        "done_seqs": (False, _ranges),
    },
    "ACK": {"seq": (True, lambda v: _int_ok(v, 0, MAX_INT))},
    "ERROR": {
        "code": (True, lambda v: _int_ok(v, 1, 255)),
        "reason": (True, lambda v: _str_ok(v, 1024)),
        "seq": (False, lambda v: _int_ok(v, -1, MAX_INT)),
    },
}


def read_header(raw: bytes, limit: int = HEADER_LIMIT) -> tuple[dict | None, str]:
    """Frame 0 as the spec allows it: one msgpack map, string keys, no bin or ext, within ``limit``.
    Returns (header, "") if it is one; (None, what is wrong) if it is no map at all; (header, what is
    wrong) for a map holding what the spec forbids (its fields can still be checked)."""
    if len(raw) > limit:
        return None, f"header of {len(raw)} bytes"
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # every way msgpack refuses bytes means the same: not a header
        return None, f"not msgpack ({type(exc).__name__})"
    if not isinstance(header, dict):
        return None, "not a map"
    return header, _foreign(header)


def _foreign(obj: Any) -> str:
    """What in a decoded header the spec forbids: a bin, an ext (timestamps too), a non-str key."""
    if isinstance(obj, (bytes, bytearray)):
        return "bin type"
    if isinstance(obj, (msgpack.ExtType, msgpack.Timestamp)):
        return "ext type"
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                return "non-str key"
            found = _foreign(value)
            if found:
                return found
    if isinstance(obj, list):
        for item in obj:
            found = _foreign(item)
            if found:
                return found
    return ""


@dataclass
class Reply:
    """One server message as the device sees it, with what it breaks of the spec (empty: valid)."""

    type: str
    fields: dict
    problems: list[str]

    @property
    def code(self) -> int | None:
        return self.fields.get("code") if self.type == "ERROR" else None


def parse_reply(frames: list[bytes]) -> Reply:
    """Read a server message and check it against the spec's rules for what a server sends."""
    header, wrong = read_header(frames[0], SERVER_HEADER_LIMIT)
    if header is None:
        return Reply("?", {}, [f"server header: {wrong}"])
    msg_type = header.get("type")
    problems = [f"server header: {wrong}"] if wrong else []
    if not _int_ok(header.get("v"), 1, 1):
        problems.append("v is not 1")
    if header.get("device") != "server":
        problems.append("device is not 'server'")
    if msg_type not in ("WELCOME", "ACK", "HEARTBEAT", "BYE", "ERROR"):
        return Reply(str(msg_type), header, [*problems, f"type {msg_type!r} is not a server message"])
    problems += _field_problems(msg_type, header)
    return Reply(msg_type, header, problems)


def _field_problems(msg_type: str, header: dict) -> list[str]:
    problems = []
    for name, (required, ok) in FIELD_RULES[msg_type].items():
        if name not in header:
            if required:
                problems.append(f"{msg_type}: {name} missing")
        elif not ok(header[name]):
            problems.append(f"{msg_type}: {name} invalid ({_short(header[name])})")
    return problems


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


# -- the oracle: what the spec says a message gets --------------------------------------------

@dataclass
class SessionModel:
    """The oracle's view of one device session."""

    routing: bytes
    wire: str
    cap: int
    seen: set[int] = field(default_factory=set)
    samples: int = 0
    finished: bool = False
    banned: bool = False


@dataclass
class LinkModel:
    """The sessions the server should hold, from the replies seen so far."""

    cfg: FuzzConfig
    sessions: dict[str, SessionModel] = field(default_factory=dict)
    banned: set[bytes] = field(default_factory=set)

    def live(self) -> int:
        return sum(not s.finished and not s.banned for s in self.sessions.values())

    def hello(self, name: str, routing: bytes, wire: str, num_samples: int) -> None:
        session = self.sessions.get(name)
        if session is None:
            # The spec: a device sends no more samples than it announced; -1 is "unknown".
            cap = self.cfg.max_samples if num_samples < 0 else num_samples
            self.sessions[name] = SessionModel(routing, wire, cap)
        else:  # a device back after its BYE streams again
            session.routing, session.wire, session.finished = routing, wire, False


@dataclass
class Expect:
    """What a message should get. ``codes``: the ERROR codes that name its problems (empty: it is
    valid). ``accept``: a non-ERROR reply of type ``reply`` is correct. ``silent``: no reply is correct."""

    codes: frozenset[int] = frozenset()
    accept: bool = False
    reply: str | None = None
    silent: bool = False
    #: An accepted BATCH's credit may be withheld (the queue is full): no reply yet is correct too.
    held: bool = False
    why: str = ""
    targets: tuple[str, ...] = ()
    #: What accepting it changes: type, device, and per type hello fields or the batch's seq/size/digest.
    info: dict = field(default_factory=dict)


def _violation(codes: Iterable[str], target: str, why: str) -> tuple[frozenset[int], str, str]:
    return frozenset(CODE[c] for c in codes), target, why


def expect(frames: list[bytes], sender: bytes, model: LinkModel) -> Expect:
    """The spec's verdict on ``frames`` sent from the connection ``sender``, given ``model``."""
    cfg = model.cfg
    if sender in model.banned:
        return Expect(silent=True, why="disconnected connection")
    if any(len(f) > cfg.largest_frame for f in frames):
        # Section 1: the transport drops the connection; a server may also refuse it.
        return Expect(codes=frozenset({CODE["LIMIT_EXCEEDED"], CODE["BAD_HEADER"], CODE["BAD_ARRAY"]}), silent=True,
                      why="frame beyond the largest valid frame", targets=("frame", "header"))
    found: list[tuple[frozenset[int], str, str]] = []
    if len(frames) > 5 or sum(len(f) for f in frames) > cfg.largest_message:
        found.append(_violation(("LIMIT_EXCEEDED", "BAD_ARRAY", "BAD_HEADER"), "frames", "frames or bytes beyond a valid batch"))
    header, wrong = read_header(frames[0])
    if header is None:
        return _verdict([*found, _violation(("BAD_HEADER",), "header", wrong)], {})
    if wrong:
        found.append(_violation(("BAD_HEADER",), "header", wrong))
    msg_type, device, envelope = _envelope(header)
    found += envelope
    if msg_type is None or device is None:
        return _verdict(found, {})
    info: dict[str, Any] = {"type": msg_type, "device": device}
    found += [_violation(("BAD_HEADER",), name, f"{name} missing or invalid") for name in _bad_fields(msg_type, header)]
    if msg_type == "HELLO":
        found += _hello_rules(header, device, model, info)
    else:
        session = model.sessions.get(device)
        if session is None or session.routing != sender:
            found.append(_violation(("NOT_WELCOMED",), "HELLO", "no session of this device on this connection"))
        elif msg_type == "BATCH":
            found += _batch_rules(header, frames[1:], session, cfg, info)
    if msg_type != "BATCH" and len(frames) > 1:
        # Frames after a non-BATCH header: the spec lists them for BATCH only; ignoring or refusing both fit.
        info["ambiguous"] = "frames after a non-BATCH header"
    return _verdict(found, info, reply={"HELLO": "WELCOME", "BATCH": "ACK"}.get(msg_type, msg_type))


#: What a server may answer to a message the spec neither allows nor forbids outright.
AMBIGUOUS_CODES = frozenset({CODE["BAD_ARRAY"], CODE["BAD_HEADER"], CODE["LIMIT_EXCEEDED"]})


def _verdict(found: list, info: dict, reply: str | None = None) -> Expect:
    if not found:
        ambiguous = info.get("ambiguous")
        return Expect(accept=True, reply=reply, info=info, why=ambiguous or "valid",
                      codes=AMBIGUOUS_CODES if ambiguous else frozenset())
    codes = frozenset().union(*(codes for codes, _, _ in found))
    return Expect(codes=codes, why="; ".join(why for _, _, why in found), targets=tuple(t for _, t, _ in found), info=info)


def _envelope(header: dict) -> tuple[str | None, str | None, list]:
    found = []
    if not _int_ok(header.get("v"), 1, 1):
        found.append(_violation(("VERSION_MISMATCH", "BAD_HEADER"), "version", f"v {_short(header.get('v'))}"))
    msg_type = header.get("type")
    if not isinstance(msg_type, str) or msg_type not in ALL_TYPES:
        found.append(_violation(("UNKNOWN_TYPE", "BAD_HEADER"), "type", f"type {_short(msg_type)}"))
        msg_type = None
    elif msg_type not in DEVICE_TYPES:
        found.append(_violation(("UNKNOWN_TYPE",), "type", f"a device may not send {msg_type}"))
        msg_type = None
    device = header.get("device")
    if not _str_ok(device, 64, 1):
        found.append(_violation(("BAD_HEADER",), "device", f"device {_short(device)}"))
        device = None
    return msg_type, device, found


def _bad_fields(msg_type: str, header: dict) -> list[str]:
    bad = []
    for name, (required, ok) in FIELD_RULES[msg_type].items():
        if (name not in header and required) or (name in header and not ok(header[name])):
            bad.append(name)
    return bad


def _hello_rules(header: dict, device: str, model: LinkModel, info: dict) -> list:
    if _bad_fields("HELLO", header):
        return []
    found = []
    if header["manifest_sha256"] != SHA or header["split"] != SPLIT:
        found.append(_violation(("MANIFEST_MISMATCH",), "manifest", "not the accepted export or split"))
    samples = header.get("num_samples", -1)
    if samples > model.cfg.max_samples:
        found.append(_violation(("LIMIT_EXCEEDED",), "samples", "more samples announced than the server takes"))
    session = model.sessions.get(device)
    if session is None and model.live() >= model.cfg.max_sessions:
        found.append(_violation(("LIMIT_EXCEEDED",), "devices", "session cap reached"))
    if session is None and len(model.sessions) >= 4 * model.cfg.max_sessions:
        found.append(_violation(("LIMIT_EXCEEDED",), "devices", "known device ids cap (4 x max_sessions) reached"))
    if session is not None and session.banned:
        found.append(_violation(("REFUSED",), "disconnected", "device was disconnected"))
    info.update(wire=header["wire_dtype"], num_samples=samples)
    return found


def _batch_rules(header: dict, blobs: list[bytes], session: SessionModel, cfg: FuzzConfig, info: dict) -> list:
    """Section 3's BATCH rules on the arrays, then dedupe and the announced samples."""
    if _bad_fields("BATCH", header) and "seq" in _bad_fields("BATCH", header):
        return []
    info["seq"] = header.get("seq")
    specs, found = _read_specs(header.get("arrays"), session.wire, info)
    if found or len(blobs) > 4:
        return found
    if len(blobs) != 4:
        return [_violation(("BAD_ARRAY",), "frames", f"{len(blobs)} array frames for 4 arrays")]
    found = _shape_rules(specs, cfg)
    for name, (dtype, shape, index) in specs.items():
        if int(np.prod(shape, dtype=object)) * WIRE[dtype].itemsize != len(blobs[index]):
            found.append(_violation(("BAD_ARRAY",), name, f"{name} frame size"))
    if found or _bad_fields("BATCH", header):
        return found
    arrays = {name: np.frombuffer(blobs[index], WIRE[dtype]).reshape(shape) for name, (dtype, shape, index) in specs.items()}
    found = _value_rules(arrays, cfg)
    size = int(arrays["labels"].shape[0])
    info.update(size=size, digest=batch_digest(*(arrays[n] for n in ARRAY_RULES)), wire=session.wire)
    if not found and header["seq"] not in session.seen and session.samples + size > session.cap:
        found.append(_violation(("LIMIT_EXCEEDED",), "samples", "more samples than announced"))
    return found


def _read_specs(specs: Any, wire: str, info: dict) -> tuple[dict, list]:
    """name -> (dtype, shape, frame index) if ``arrays`` declares the four arrays once each."""
    structural = ("BAD_ARRAY", "BAD_HEADER")
    if not isinstance(specs, list) or len(specs) != 4:
        return {}, [_violation(structural, "arrays", "arrays is not a list of 4 specs")]
    out: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            return {}, [_violation(structural, "arrays", "an array spec is not a map")]
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or name not in ARRAY_RULES or name in out:
            return {}, [_violation(structural, "arrays", f"array name {_short(name)}")]
        dtypes, rank = ARRAY_RULES[name]
        if not isinstance(dtype, str) or dtype not in dtypes:
            return {}, [_violation(structural, name, f"{name} dtype {_short(dtype)}")]
        if not isinstance(shape, list) or len(shape) != rank or not all(type(d) is int and d >= 0 for d in shape):
            return {}, [_violation(structural, name, f"{name} shape {_short(shape)}")]
        if set(spec) - {"name", "dtype", "shape"}:
            info["ambiguous"] = "unknown keys in an array spec"
        out[name] = (dtype, tuple(shape), index)
    if wire == "fp32" and out["hidden"][0] != "float32":
        return {}, [_violation(("BAD_ARRAY",), "hidden", "float16 from an fp32 device")]
    return out, []


def _shape_rules(specs: dict, cfg: FuzzConfig) -> list:
    b, t, h = specs["hidden"][1]
    found = []
    if h != cfg.hidden_size or not 1 <= b <= cfg.max_batch or not 1 <= t <= cfg.max_seq_len:
        found.append(_violation(("BAD_ARRAY",), "hidden", f"hidden shape {[b, t, h]}"))
    if specs["attention_mask"][1] != (b, t):
        found.append(_violation(("BAD_ARRAY",), "attention_mask", "mask shape"))
    for name in ("labels", "sample_ids"):
        if specs[name][1] != (b,):
            found.append(_violation(("BAD_ARRAY",), name, f"{name} shape"))
    return found


def _value_rules(arrays: dict[str, np.ndarray], cfg: FuzzConfig) -> list:
    found = []
    mask = arrays["attention_mask"].astype(np.int64)
    if not np.isin(mask, (0, 1)).all():
        found.append(_violation(("BAD_ARRAY",), "attention_mask", "mask values not 0/1"))
    elif (mask.sum(axis=1) == 0).any():
        found.append(_violation(("BAD_ARRAY",), "attention_mask", "a row without a real token"))
    labels = arrays["labels"]
    if ((labels < 0) | (labels >= cfg.num_labels)).any():
        found.append(_violation(("BAD_ARRAY",), "labels", "label out of range"))
    if len(set(arrays["sample_ids"].tolist())) != len(arrays["sample_ids"]):
        found.append(_violation(("BAD_ARRAY",), "sample_ids", "duplicate sample ids"))
    values = arrays["hidden"].astype(np.float64)
    if not np.isfinite(values).all() or np.abs(values).max() > cfg.bound:
        found.append(_violation(("BAD_VALUES",), "hidden", "non-finite or beyond the bound"))
    return found


def batch_digest(hidden: np.ndarray, mask: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> str:
    """A fingerprint of a batch's four arrays (dtype, shape, bytes), to match a queued batch to what was sent."""
    digest = hashlib.sha1()
    for arr in (hidden, mask, labels, ids):
        digest.update(f"{np.dtype(arr.dtype).str}{tuple(arr.shape)}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def check_queued(batch: Any, cfg: FuzzConfig) -> list[str]:
    """What is wrong with a batch taken from the trainer's queue, checked from its arrays alone."""
    hidden, mask = np.asarray(batch.hidden), np.asarray(batch.attention_mask)
    labels, ids = np.asarray(batch.labels), np.asarray(batch.sample_ids)
    if hidden.dtype.str not in ("<f2", "<f4") or hidden.ndim != 3:
        return [f"hidden {hidden.dtype} rank {hidden.ndim}"]
    b, t, h = hidden.shape
    problems = []
    if h != cfg.hidden_size or not 1 <= b <= cfg.max_batch or not 1 <= t <= cfg.max_seq_len:
        problems.append(f"hidden shape {hidden.shape}")
    for name, arr, dtype, shape in (("attention_mask", mask, "|u1", (b, t)), ("labels", labels, "<i8", (b,)),
                                    ("sample_ids", ids, "<i8", (b,))):
        if arr.dtype.str != dtype or arr.shape != shape:
            problems.append(f"{name} {arr.dtype} {arr.shape}")
    if problems:
        return problems
    values = hidden.astype(np.float64)
    if not np.isfinite(values).all():
        problems.append("non-finite activation")
    elif np.abs(values).max() > cfg.bound:
        problems.append(f"activation {np.abs(values).max():.6g} beyond {cfg.bound}")
    wide = mask.astype(np.int64)
    if not np.isin(wide, (0, 1)).all() or (wide.sum(axis=1) == 0).any():
        problems.append("mask not 0/1 with a real token per row")
    if ((labels < 0) | (labels >= cfg.num_labels)).any():
        problems.append("label out of range")
    if len(set(ids.tolist())) != b:
        problems.append("duplicate sample ids")
    return problems


# -- the server, in its own process ------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve(cfg: FuzzConfig) -> None:
    """Child process: a real Receiver, a consumer that checks every batch it takes, an RSS sampler;
    driven by JSON commands on stdin, one JSON answer per line on stdout."""
    import logging
    import queue
    import threading

    import zmq
    from sftool.runtime.manifest import Manifest
    from sftool.server.receiver import AcceptedSplit, LinkLimits, Receiver

    logged = Counter()

    class _Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged[record.levelname] += 1

    server_log = logging.getLogger("sftool.server")
    server_log.handlers[:] = [_Count()]
    server_log.propagate = False
    server_log.setLevel(logging.WARNING)
    manifest = Manifest(family="fuzz", source="fuzz", split=SPLIT, num_layers=4, hidden_size=cfg.hidden_size,
                        max_seq_len=cfg.max_seq_len, pad_token_id=0, variants=[], files={}, weights_fingerprint="",
                        opset=18, max_batch=cfg.max_batch)
    schema = manifest.batch_schema(cfg.num_labels, activation_bound=cfg.bound)
    batches: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
    receiver = Receiver("tcp://127.0.0.1:0", {SHA: AcceptedSplit(SHA, manifest, schema)}, batches, window=cfg.window,
                        device_timeout_s=3600.0, goodbye_grace_s=0.1, context=zmq.Context(),
                        limits=LinkLimits(max_sessions=cfg.max_sessions, max_strikes=cfg.max_strikes,
                                          max_samples_per_device=cfg.max_samples,
                                          max_known_devices=4 * cfg.max_sessions))
    receiver.start()
    state = {"reports": [], "paused": threading.Event(), "idle": threading.Event(), "stop": threading.Event(), "baseline": _rss_bytes(),
             "peak": _rss_bytes(), "pending_max": 0, "queued": 0, "held_max": {}}
    lock = threading.Lock()

    def consume() -> None:
        while not state["stop"].is_set():
            if state["paused"].is_set():
                state["idle"].set()
                time.sleep(0.01)
                continue
            state["idle"].clear()
            try:
                item = batches.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = item.batch
            report = {"device": batch.device, "seq": int(batch.seq), "dtype": np.asarray(batch.hidden).dtype.str,
                      "split": item.split, "problems": check_queued(batch, cfg),
                      "digest": batch_digest(batch.hidden, batch.attention_mask, batch.labels, batch.sample_ids)}
            with lock:
                state["reports"].append(report)
                state["queued"] += 1

    def sample() -> None:
        while not state["stop"].is_set():
            state["peak"] = max(state["peak"], _rss_bytes())
            state["pending_max"] = max(state["pending_max"], receiver.pending)
            time.sleep(0.01)

    for target in (consume, sample):
        threading.Thread(target=target, daemon=True).start()

    def stats() -> dict:
        sessions = receiver.snapshot()
        return {"alive": receiver.is_alive(), "logged": dict(logged), "sessions": len(sessions),
                "live_sessions": sum(not s.finished for s in sessions.values()),
                "banned": len(getattr(receiver, "_banned", ())), "strikes": len(getattr(receiver, "_strikes", {})),
                "seen": sum(len(s.seen) for s in sessions.values()), "pending": receiver.pending,
                "pending_max": state["pending_max"], "qsize": batches.qsize(), "queued": state["queued"],
                "errors_sent": receiver.errors_sent, "rss_baseline": state["baseline"], "rss_peak": state["peak"],
                "rss_now": _rss_bytes()}

    _answer({"endpoint": receiver.endpoint})
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        cmd = json.loads(line)["cmd"]
        if cmd == "reports":
            with lock:
                out, state["reports"] = state["reports"], []
            _answer({"reports": out})
        elif cmd == "mark":
            state["baseline"] = state["peak"] = _rss_bytes()
            state["pending_max"] = 0
            _answer(stats())
        elif cmd == "pause":
            state["paused"].set()
            # Answer once the consumer is idle: a batch it was taking as the pause came is out of the queue by then.
            _answer({"ok": state["idle"].wait(5.0)})
        elif cmd == "resume":
            state["paused"].clear()
            _answer({"ok": True})
        elif cmd == "stop":
            final = stats()
            receiver.request_stop("fuzzing over")
            final["stopped"] = receiver.join_stopped(5)
            state["stop"].set()
            _answer(final)
            return
        else:
            _answer(stats())


def _answer(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class FuzzServer:
    """The receiver under test in its own process (``python -m sftool.link_fuzz serve CONFIG``)."""

    def __init__(self, cfg: FuzzConfig):
        self.cfg = cfg
        self.proc = subprocess.Popen([sys.executable, "-m", "sftool.link_fuzz", "serve", json.dumps(asdict(cfg))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.endpoint = self._read(60.0)["endpoint"]
        self.final: dict | None = None

    def _read(self, timeout_s: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"fuzzed server process gave no answer (exit code {self.proc.poll()})")
        return json.loads(line)

    def call(self, cmd: str, timeout_s: float = 30.0) -> dict:
        """Send a command (stats, reports, mark, pause, resume, stop) and return its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s)

    def close(self) -> dict:
        """Stop the receiver and the process; the last stats."""
        if self.final is None:
            try:
                self.final = self.call("stop")
            except (RuntimeError, OSError, ValueError):
                self.final = {"alive": False, "stopped": False}
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.final

    def __enter__(self) -> FuzzServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- devices and the engine that sends, judges and counts ------------------------------------

class Dealer:
    """A raw DEALER connection with a fixed ZeroMQ identity (its routing id, known to the oracle)."""

    def __init__(self, ctx: Any, endpoint: str, name: str, identity: bytes):
        import zmq

        self.name, self.identity = name, identity
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 20)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([bytes(f) for f in frames])

    def replies(self, wait_s: float, more_s: float = 0.0) -> list[list[bytes]]:
        """The first message within ``wait_s``, then any that follow within ``more_s``."""
        got: list[list[bytes]] = []
        timeout = wait_s
        while self.sock.poll(int(timeout * 1000)):
            got.append(self.sock.recv_multipart())
            timeout = more_s
        return got

    def close(self) -> None:
        self.sock.close(0)


@dataclass
class Outcome:
    """One message's fate: what came back and how it compares with the spec's verdict."""

    cls: str
    expect: Expect
    replies: list[Reply]
    verdict: str  # ok | no-reply | wrong-code | refused-valid | accepted-invalid | wrong-reply
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def first(self) -> Reply | None:
        return self.replies[0] if self.replies else None


def judge(exp: Expect, replies: list[Reply]) -> tuple[str, str]:
    """Compare the first reply with the verdict: (kind, detail)."""
    if not replies:
        return ("ok", "") if exp.silent or exp.held else ("no-reply", exp.why)
    first = replies[0]
    if first.type == "ERROR":
        code = first.code
        if code in exp.codes:
            return "ok", ""
        if exp.silent and not exp.codes:
            return "reply-when-silent", f"{CODE_NAMES.get(code, code)} on a disconnected connection"
        if not exp.codes:
            return "refused-valid", f"{CODE_NAMES.get(code, code)}: {_short(first.fields.get('reason'), 200)}"
        return "wrong-code", (f"{CODE_NAMES.get(code, code)} for {exp.why}: {_short(first.fields.get('reason'), 200)}")
    if exp.accept and first.type == exp.reply:
        if first.type == "ACK" and first.fields.get("seq") != exp.info.get("seq"):
            return "wrong-reply", f"ACK for seq {first.fields.get('seq')} instead of {exp.info.get('seq')}"
        return "ok", ""
    if exp.accept or not exp.codes:
        return "wrong-reply", f"{first.type} instead of {exp.reply}"
    return "accepted-invalid", f"{first.type} for {exp.why}"


@dataclass
class Row:
    """Counts for one mutator class."""

    sent: int = 0
    errors: Counter = field(default_factory=Counter)
    no_reply: int = 0
    accepted: int = 0
    wrong: int = 0
    named: int = 0

    def add(self, outcome: Outcome) -> None:
        self.sent += 1
        first = outcome.first
        if first is None:
            self.no_reply += 1
        elif first.type == "ERROR":
            self.errors[CODE_NAMES.get(first.code, str(first.code))] += 1
            self.named += _names_target(first, outcome.expect)
        else:
            self.accepted += 1
        self.wrong += not outcome.ok


#: Words an ERROR's reason may use for what a violation names.
_SYNONYMS = {"version": ("version",), "attention_mask": ("attention_mask", "real token"), "frames": ("frame", "bytes"),
             "header": ("header", "msgpack", "map"), "HELLO": ("hello",), "devices": ("devices",),
             "samples": ("samples",), "manifest": ("manifest", "split"), "disconnected": ("disconnected",),
             "type": ("type", "may not send"), "hidden": ("hidden", "batch size", "sequence length"),
             "window": ("window",)}


def _names_target(reply: Reply, exp: Expect) -> bool:
    reason = str(reply.fields.get("reason", "")).lower()
    return any(word.lower() in reason for target in exp.targets for word in _SYNONYMS.get(target, (target,)))


def _disconnects(reply: Reply) -> bool:
    """Is this the server's BYE that ends a connection for its invalid messages?"""
    return reply.type == "BYE" and str(reply.fields.get("reason", "")).startswith("disconnected:")


class Runner:
    """Sends messages to one FuzzServer, judges each against the oracle, keeps the counts and
    cross-checks every batch the server's consumer took from the queue."""

    def __init__(self, server: FuzzServer, ctx: Any):
        self.server, self.cfg, self.ctx = server, server.cfg, ctx
        self.model = LinkModel(server.cfg)
        self.rows: dict[str, Row] = {}
        self.mismatches: list[dict] = []
        self.bad_replies: list[dict] = []
        self.internal = 0
        self.stray = 0
        self.queued: dict[tuple[str, int], dict] = {}
        self.queue_problems: list[dict] = []
        self.queued_ok = 0
        self.queued_despite = 0
        self.dealers: list[Dealer] = []

    def dealer(self, name: str, identity: str | None = None) -> Dealer:
        made = Dealer(self.ctx, self.server.endpoint, name, (identity or name).encode())
        self.dealers.append(made)
        return made

    def step(self, cls: str, dealer: Dealer, frames: list[bytes], exp: Expect | None = None,
             more_s: float = 0.0) -> Outcome:
        """Send one message, judge its reply and record it under ``cls``."""
        for late in map(parse_reply, dealer.replies(0.0)):
            if _disconnects(late):  # the disconnecting BYE that followed the previous message's ERROR
                self._banned(dealer)
            else:
                self.stray += 1
        exp = exp or expect(frames, dealer.identity, self.model)
        dealer.send(frames)
        # Wait the full time unless no reply is the only right answer (a disconnected connection) or a
        # withheld credit is: a reply that comes after the wait would be taken for the next message's.
        wait = 0.3 if (exp.silent and not exp.codes) or exp.held else self.cfg.reply_timeout_s
        return self.record(cls, dealer, frames, exp, [parse_reply(r) for r in dealer.replies(wait, more_s)])

    def record(self, cls: str, dealer: Dealer, frames: list[bytes], exp: Expect, replies: list[Reply]) -> Outcome:
        """Judge the replies one message got and count it under ``cls``. A disconnecting BYE is no reply
        to a message but follows the ERROR of the one that used up the strikes; alone, it came late
        for the previous message, and this one was read on a disconnected connection."""
        answers = [x for x in replies if not _disconnects(x)]
        if len(answers) < len(replies) and not answers:
            self._banned(dealer)
            exp = expect(frames, dealer.identity, self.model)
        outcome = Outcome(cls, exp, answers + [x for x in replies if _disconnects(x)], *judge(exp, answers))
        self._after(dealer, frames, outcome)
        self.rows.setdefault(cls, Row()).add(outcome)
        return outcome

    def _after(self, dealer: Dealer, frames: list[bytes], outcome: Outcome) -> None:
        for reply in outcome.replies:
            if reply.problems:
                self.bad_replies.append({"class": outcome.cls, "reply": reply.type, "problems": reply.problems})
            self.internal += reply.code == CODE["INTERNAL"]
            if _disconnects(reply):
                self._banned(dealer)
        if not outcome.ok:
            self.mismatches.append({"class": outcome.cls, "verdict": outcome.verdict, "detail": outcome.detail,
                                    "expected": sorted(CODE_NAMES.get(c, c) for c in outcome.expect.codes) or
                                    [outcome.expect.reply or "no reply"], "why": outcome.expect.why,
                                    "header": _short(frames[0], 300)})
        first = outcome.first
        if (first is not None and first.type != "ERROR") or (first is None and outcome.expect.held):
            self._apply(dealer, outcome)

    def _banned(self, dealer: Dealer) -> None:
        self.model.banned.add(dealer.identity)
        for session in self.model.sessions.values():
            if session.routing == dealer.identity:
                session.banned = True

    def _apply(self, dealer: Dealer, outcome: Outcome) -> None:
        """An accepted message changes the model as the server should have changed."""
        info, reply = outcome.expect.info, outcome.first
        kind = info.get("type")
        if kind == "HELLO" and (reply is None or reply.type == "WELCOME") and "wire" in info:
            self.model.hello(info["device"], dealer.identity, info["wire"], info.get("num_samples", -1))
        elif kind == "BATCH" and (reply is None or reply.type == "ACK") and "digest" in info:
            session = self.model.sessions.get(info["device"])
            if session is None or info["seq"] in session.seen:
                return
            session.seen.add(info["seq"])
            session.samples += info["size"]
            self.queued[(info["device"], info["seq"])] = {"digest": info["digest"], "wire": info["wire"],
                                                          "despite": not outcome.expect.accept}
        elif kind == "BYE" and reply is not None and reply.type == "BYE":
            session = self.model.sessions.get(info["device"])
            if session is not None:
                session.finished = True

    def collect_reports(self) -> None:
        """Cross-check the batches the server's consumer took: expected, same content, announced dtype."""
        for report in self.server.call("reports")["reports"]:
            key = (report["device"], report["seq"])
            sent = self.queued.pop(key, None)
            problems = list(report["problems"])
            if sent is None:
                problems.append("not a batch the spec lets the server accept")
            else:
                if sent["digest"] != report["digest"]:
                    problems.append("content differs from what was sent")
                if sent["wire"] == "fp32" and report["dtype"] != "<f4":
                    problems.append("float16 batch of an fp32 device")
                self.queued_despite += sent["despite"]
            if report["split"] != SPLIT or report["device"] not in self.model.sessions:
                problems.append("device never welcomed")
            if problems:
                self.queue_problems.append({"device": report["device"], "seq": report["seq"], "problems": problems})
            else:
                self.queued_ok += 1

    def settle(self, timeout_s: float = 5.0) -> dict:
        """Wait until the server's queue and pending batches are empty, then collect the reports."""
        deadline = time.monotonic() + timeout_s
        stats = self.server.call("stats")
        while (stats["qsize"] or stats["pending"]) and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = self.server.call("stats")
        time.sleep(0.05)
        self.collect_reports()
        return stats

    def close(self) -> None:
        for dealer in self.dealers:
            dealer.close()
        self.dealers.clear()


# -- valid messages and their mutations -------------------------------------------------------

@dataclass
class Draft:
    """A message being built: its header (BATCH: with ``arrays`` specs) and array frames."""

    header: dict
    blobs: list[bytes] = field(default_factory=list)

    def frames(self) -> list[bytes]:
        return [msgpack.packb(self.header, use_bin_type=True), *self.blobs]

    def index(self, name: str) -> int:
        return next(i for i, spec in enumerate(self.header["arrays"]) if spec["name"] == name)

    def array(self, name: str) -> np.ndarray:
        spec = self.header["arrays"][self.index(name)]
        return np.frombuffer(self.blobs[self.index(name)], WIRE[spec["dtype"]]).reshape(spec["shape"]).copy()

    def set_array(self, name: str, arr: np.ndarray, dtype: str | None = None) -> None:
        """Replace an array, its spec following it (a consistent change)."""
        i = self.index(name)
        dtype = dtype or self.header["arrays"][i]["dtype"]
        arr = np.ascontiguousarray(arr, WIRE[dtype])
        self.header["arrays"][i] = {"name": name, "dtype": dtype, "shape": list(arr.shape)}
        self.blobs[i] = arr.tobytes()


@dataclass
class Fleet:
    """A fuzzing device: its connection, announced wire dtype, next seq."""

    dealer: Dealer
    wire: str
    next_seq: int = 0
    high_seq: int = MAX_INT
    accepted: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.dealer.name

    def seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1


def hello_draft(name: str, wire: str, **fields: Any) -> Draft:
    return Draft({"v": 1, "type": "HELLO", "device": name, "manifest_sha256": SHA, "split": SPLIT,
                  "precision": "fp32/any", "wire_dtype": wire, "num_samples": -1, "epochs": 1, **fields})


def batch_draft(rng: random.Random, name: str, seq: int, wire: str, cfg: FuzzConfig, b: int | None = None) -> Draft:
    """A valid BATCH: random shape within the limits, right-padded mask, values inside the bound."""
    gen = np.random.default_rng(rng.getrandbits(32))
    b = b or rng.randint(1, cfg.max_batch)
    t = rng.randint(1, cfg.max_seq_len)
    lengths = gen.integers(1, t + 1, size=b)
    lengths[gen.integers(b)] = t
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.uint8)
    dtype = "float32" if wire == "fp32" or rng.random() < 0.2 else "float16"
    hidden = (gen.uniform(-cfg.bound, cfg.bound, size=(b, t, cfg.hidden_size)) * mask[:, :, None])
    labels = gen.integers(0, cfg.num_labels, size=b)
    ids = gen.choice(1 << 40, size=b, replace=False)
    arrays = [("hidden", hidden, dtype), ("attention_mask", mask, "uint8"), ("labels", labels, "int64"),
              ("sample_ids", ids, "int64")]
    if rng.random() < 0.3:
        rng.shuffle(arrays)  # the server matches frames by name, never by position
    specs, blobs = [], []
    for arr_name, arr, dt in arrays:
        arr = np.ascontiguousarray(arr, WIRE[dt])
        specs.append({"name": arr_name, "dtype": dt, "shape": list(arr.shape)})
        blobs.append(arr.tobytes())
    return Draft({"v": 1, "type": "BATCH", "device": name, "seq": seq, "epoch": rng.randint(0, 3), "arrays": specs},
                 blobs)


def base_draft(rng: random.Random, dev: Fleet, kind: str, cfg: FuzzConfig) -> Draft:
    """A valid message of ``kind`` from ``dev``."""
    if kind == "HELLO":
        return hello_draft(dev.name, dev.wire)
    if kind == "BATCH":
        return batch_draft(rng, dev.name, dev.seq(), dev.wire, cfg)
    if kind == "HEARTBEAT":
        return Draft({"v": 1, "type": "HEARTBEAT", "device": dev.name})
    return Draft({"v": 1, "type": "BYE", "device": dev.name, "batches": len(dev.accepted), "samples": 0})


@dataclass
class Ctx:
    """What a mutator may use beyond its draft."""

    rng: random.Random
    cfg: FuzzConfig
    dev: Fleet
    others: list[str]


Mutator = Callable[[Draft, Ctx], list[bytes]]

INT_EXTREMES = [-1, 0, 1, -(2**31), -(2**31) - 1, 2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1,
                -(2**63), 999, 1000, 1024, 4096, 4097, 10_000_000, 10_000_001]
WRONG_TYPES: list[Any] = ["7", "", 7.0, 1.5, float("nan"), True, False, None, [1], [], {"a": 1}, {}, b"\x01"]
BAD_STRINGS = ["", " ", "a" * 32, "a" * 33, "a" * 64, "a" * 65, "a" * 257, "x\x00y", "tab\there", "new\nline", "\x7f",
               "\u200b", "é", "\u2028", "FP16", "fp16 ", "fp8", "bf16", "fp32/any" * 5]
BAD_DEVICES: list[Any] = ["", "a" * 64, "a" * 65, "dev\x00", "dev\n", "\x1b[31m", "\u00e9t\u00e9", "\u200e", " ", b"dev",
                          7, None, ["d"], {"d": 1}, 1.5, True]


def _fields_of(draft: Draft) -> list[str]:
    return ["v", "type", "device", *FIELD_RULES[draft.header["type"]]]


def m_field_type(draft: Draft, c: Ctx) -> list[bytes]:
    """A field gets a value of another wire type (str/float/bool/None/list/dict/bin, or its own value retyped)."""
    name = c.rng.choice(_fields_of(draft))
    old = draft.header.get(name)
    options = [*WRONG_TYPES, str(old), [old]]
    if type(old) is int:
        options += [float(old), bool(old)]
    draft.header[name] = c.rng.choice(options)
    return draft.frames()


def m_field_range(draft: Draft, c: Ctx) -> list[bytes]:
    """An int field at an extreme (negative, huge, 2**63, 2**64-1, off by one) or a str field out of its rules."""
    names = [n for n in _fields_of(draft) if n not in ("type", "device", "arrays")]
    name = c.rng.choice(names)
    old = draft.header.get(name)
    if isinstance(old, str):
        draft.header[name] = c.rng.choice([*BAD_STRINGS, old.upper(), old[:-1], old + "0", "g" * 64])
    else:
        draft.header[name] = c.rng.choice(INT_EXTREMES)
    return draft.frames()


def m_field_missing(draft: Draft, c: Ctx) -> list[bytes]:
    """One or more fields (envelope, required or optional) left out."""
    names = [n for n in draft.header if c.rng.random() < 0.3] or [c.rng.choice(list(draft.header))]
    for name in names:
        draft.header.pop(name, None)
    return draft.frames()


def m_field_extra(draft: Draft, c: Ctx) -> list[bytes]:
    """Unknown fields (ignored by the spec), sometimes a bin value or a non-str key (refused)."""
    for _ in range(c.rng.randint(1, 4)):
        key = c.rng.choice(["x", "extra", "v2", "Seq", "arrays2", "\u00fc", "a" * 100, "future_option"])
        draft.header[key] = c.rng.choice([1, "s", [1, 2], {"k": [None]}, None, 1.5, True, -(2**63)])
    roll = c.rng.random()
    if roll < 0.15:
        draft.header["blob"] = b"\x00\x01"
    elif roll < 0.3:
        raw = msgpack.packb(draft.header, use_bin_type=True)
        # A map with one more entry, keyed by an int: rewrite the map header's count.
        return [_map_with_int_key(raw), *draft.blobs]
    return draft.frames()


def _map_with_int_key(raw: bytes) -> bytes:
    count, body = _map_count(raw)
    return _map_header(count + 1) + body + msgpack.packb(7) + msgpack.packb("int key")


def _map_count(raw: bytes) -> tuple[int, bytes]:
    first = raw[0]
    if 0x80 <= first <= 0x8F:
        return first & 0x0F, raw[1:]
    if first == 0xDE:
        return int.from_bytes(raw[1:3], "big"), raw[3:]
    return int.from_bytes(raw[1:5], "big"), raw[5:]


def _map_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x80 | count])
    if count < 65536:
        return b"\xde" + count.to_bytes(2, "big")
    return b"\xdf" + count.to_bytes(4, "big")


def m_envelope(draft: Draft, c: Ctx) -> list[bytes]:
    """Wrong ``v``, ``type`` or ``device``: other versions and types, non-printable, empty, 65+ chars, bytes, another device."""
    which = c.rng.choice(["v", "type", "device"])
    if which == "v":
        draft.header["v"] = c.rng.choice([0, 2, -1, 255, 2**64 - 1, "1", 1.0, True, None, [1], b"\x01"])
    elif which == "type":
        draft.header["type"] = c.rng.choice(["", "hello", "batch ", "WELCOME", "ACK", "ERROR", "BATCHES", "X" * 2000,
                                             5, None, b"BATCH", ["BATCH"], {"t": 1}, True, "HELLO\x00"])
    else:
        draft.header["device"] = c.rng.choice([*BAD_DEVICES, *c.others])
    return draft.frames()


def m_array_names(draft: Draft, c: Ctx) -> list[bytes]:
    """Array names swapped (with or without their frames), duplicated, missing, unknown, not a str."""
    specs = draft.header["arrays"]
    i, j = c.rng.sample(range(len(specs)), 2)
    how = c.rng.choice(["swap", "swap-frames", "dup", "drop", "drop-spec", "unknown", "not-str", "case"])
    if how in ("swap", "swap-frames"):
        specs[i]["name"], specs[j]["name"] = specs[j]["name"], specs[i]["name"]
        if how == "swap-frames":  # the frames follow their names: still valid unless shapes differ
            specs[i]["dtype"], specs[j]["dtype"] = specs[j]["dtype"], specs[i]["dtype"]
            specs[i]["shape"], specs[j]["shape"] = specs[j]["shape"], specs[i]["shape"]
            draft.blobs[i], draft.blobs[j] = draft.blobs[j], draft.blobs[i]
    elif how == "dup":
        specs[i]["name"] = specs[j]["name"]
    elif how == "drop":
        del specs[i], draft.blobs[i]
    elif how == "drop-spec":
        del specs[i]
    elif how == "unknown":
        specs[i]["name"] = c.rng.choice(["logits", "mask", "", "hidden ", "input_ids"])
    elif how == "not-str":
        specs[i]["name"] = c.rng.choice([None, 3, ["hidden"], {"n": "hidden"}, 1.5])
    else:
        specs[i]["name"] = specs[i]["name"].upper()
    return draft.frames()


def m_array_dtype(draft: Draft, c: Ctx) -> list[bytes]:
    """A spec's dtype changed (frames kept), or an array sent in another dtype (consistently)."""
    name = c.rng.choice(list(ARRAY_RULES))
    if c.rng.random() < 0.5:
        spec = draft.header["arrays"][draft.index(name)]
        spec["dtype"] = c.rng.choice(["float32", "float16", "int64", "uint8", "float64", "bfloat16", "<f4", "", None,
                                      7, "int8", "FLOAT32"])
    else:
        arr = draft.array(name)
        dtype = c.rng.choice([d for d in WIRE if d != draft.header["arrays"][draft.index(name)]["dtype"]])
        with np.errstate(all="ignore"):  # values that do not fit the new dtype wrap: that is the point
            draft.set_array(name, arr.astype(np.float64).astype(WIRE[dtype]), dtype)
    return draft.frames()


def m_array_shape(draft: Draft, c: Ctx) -> list[bytes]:
    """Shapes: rank changed, negative, huge, zero, B/T/H mismatched (with frames kept or resized)."""
    name = c.rng.choice(list(ARRAY_RULES))
    spec = draft.header["arrays"][draft.index(name)]
    shape = list(spec["shape"])
    how = c.rng.choice(["rank+", "rank-", "negative", "huge", "zero", "off", "not-list", "float", "consistent"])
    k = c.rng.randrange(len(shape))
    if how == "rank+":
        shape.append(1)
    elif how == "rank-":
        shape.pop()
    elif how == "negative":
        shape[k] = -shape[k] or -1
    elif how == "huge":
        shape[k] = c.rng.choice([2**31, 2**31 - 1, 2**40, 2**63, 2**64 - 1, 1 << 20])
    elif how == "zero":
        shape[k] = 0
    elif how == "off":
        shape[k] += c.rng.choice([-1, 1, 8])
    elif how == "not-list":
        shape = c.rng.choice(["[2, 4]", None, 4, {"0": 1}])
    elif how == "float":
        shape[k] = float(shape[k])
    else:  # resize the array itself: a B/T/H mismatch whose frame size agrees with its spec
        arr = draft.array(name)
        grown = np.resize(arr, [d + c.rng.choice([-1, 1]) if d > 1 else d + 1 for d in arr.shape])
        draft.set_array(name, grown)
        return draft.frames()
    spec["shape"] = shape
    return draft.frames()


def m_frames(draft: Draft, c: Ctx) -> list[bytes]:
    """Frames truncated, extended, dropped, added, many, empty, reordered; a header alone."""
    frames = draft.frames()
    how = c.rng.choice(["truncate", "extend", "drop", "extra", "many", "empty", "empty-msg", "header-only", "reorder",
                        "huge-extra", "dup"])
    k = c.rng.randrange(len(frames))
    if how == "truncate":
        frames[k] = frames[k][: c.rng.randrange(max(1, len(frames[k])))]
    elif how == "extend":
        frames[k] = frames[k] + bytes(c.rng.choice([1, 2, 7, 64]))
    elif how == "drop" and len(frames) > 1:
        del frames[c.rng.randrange(1, len(frames))]
    elif how == "extra":
        frames += [b"\x00" * c.rng.choice([0, 1, 16])] * c.rng.randint(1, 2)
    elif how == "many":
        frames += [b"x" * c.rng.choice([0, 10, 100])] * c.rng.choice([6, 50, 300])
    elif how == "empty":
        frames[k] = b""
    elif how == "empty-msg":
        frames = [b""]
    elif how == "header-only":
        frames = frames[:1]
    elif how == "reorder" and len(frames) > 2:
        tail = frames[1:]
        c.rng.shuffle(tail)
        frames = [frames[0], *tail]
    elif how == "huge-extra":
        frames.append(b"\x00" * c.rng.choice([3000, 20_000]))
    else:
        frames.append(frames[-1])
    return frames


def m_bitflip(draft: Draft, c: Ctx) -> list[bytes]:
    """1-4 random bits of the header frame flipped."""
    frames = draft.frames()
    header = bytearray(frames[0])
    for _ in range(c.rng.randint(1, 4)):
        bit = c.rng.randrange(len(header) * 8)
        header[bit // 8] ^= 1 << (bit % 8)
    return [bytes(header), *frames[1:]]


def m_encoding(draft: Draft, c: Ctx) -> list[bytes]:
    """Not a header: random bytes, JSON, a non-map, bin or ext values, trailing data, invalid UTF-8,
    beyond 16 KiB (and just within it), deep nesting."""
    frames = draft.frames()
    how = c.rng.choice(["random", "json", "list", "int", "str", "bin", "ext", "timestamp", "trailing", "utf8", "big",
                        "at-limit", "deep", "reserved"])
    header = dict(draft.header)
    if how == "random":
        frames[0] = c.rng.randbytes(c.rng.randint(0, 64))
    elif how == "json":
        frames[0] = json.dumps({k: v for k, v in header.items() if not isinstance(v, bytes)}).encode()
    elif how in ("list", "int", "str"):
        frames[0] = msgpack.packb({"list": list(header.items()), "int": 1, "str": "HELLO"}[how])
    elif how == "bin":
        header[c.rng.choice(list(header))] = b"BATCH"
        frames[0] = msgpack.packb(header, use_bin_type=True)
    elif how == "ext":
        header["ext"] = msgpack.ExtType(c.rng.randint(0, 127), b"\x00" * c.rng.choice([1, 4, 8]))
        frames[0] = msgpack.packb(header)
    elif how == "timestamp":
        frames[0] = _with_raw_field(header, "t", b"\xd6\xff\x00\x00\x00\x01")
    elif how == "trailing":
        frames[0] = frames[0] + c.rng.choice([b"\x00", b"\xc0", msgpack.packb({"v": 1})])
    elif how == "utf8":
        key = c.rng.choice([k for k, v in header.items() if isinstance(v, str)])
        frames[0] = msgpack.packb({**header, key: b"\xff\xfe" + header[key].encode()}, use_bin_type=False)
    elif how in ("big", "at-limit"):
        frames[0] = _padded(header, HEADER_LIMIT + (1 if how == "big" else 0))
    elif how == "deep":  # written by hand: msgpack's packer refuses to nest this deep itself
        depth = c.rng.choice([50, 600, 5000])
        frames[0] = _with_raw_field(header, "deep", b"\x91" * depth + b"\xc0")
    else:
        frames[0] = bytes([0xC1]) + frames[0][1:]  # 0xc1 is never used by msgpack
    return frames


def _padded(header: dict, size: int) -> bytes:
    """``header`` with a padding field making it exactly ``size`` bytes."""
    base = len(msgpack.packb({**header, "pad": ""}))
    pad = size - base
    for extra in range(0, 6):  # the str's own length prefix grows with it
        packed = msgpack.packb({**header, "pad": "p" * max(0, pad - extra)})
        if len(packed) == size:
            return packed
    return packed


def _with_raw_field(header: dict, key: str, raw_value: bytes) -> bytes:
    """``header`` packed with one more entry whose value is the msgpack bytes ``raw_value``."""
    return _map_header(len(header) + 1) + _map_count(msgpack.packb(header))[1] + msgpack.packb(key) + raw_value


def _hidden_mut(draft: Draft, value: float, dtype: str | None = None, pad: bool = False) -> None:
    hidden = draft.array("hidden").astype(np.float64)
    mask = draft.array("attention_mask")
    rows, cols = np.nonzero(mask == 0) if pad and (mask == 0).any() else np.nonzero(mask)
    k = len(rows) // 2
    hidden[rows[k], cols[k], 0] = value
    draft.set_array("hidden", hidden.astype(WIRE[dtype or draft.header["arrays"][draft.index("hidden")]["dtype"]]), dtype)


def m_values_float(draft: Draft, c: Ctx) -> list[bytes]:
    """NaN, +-Inf, 3e38, 65504, the bound exactly, one float step beyond or within it, in fp16 or fp32,
    in a real or a padding position; a batch in the other wire dtype."""
    bound = c.cfg.bound
    how = c.rng.choice(["nan", "inf", "-inf", "3e38", "65504", "bound", "-bound", "over", "under", "-over", "pad-nan",
                        "as-fp32", "as-fp16", "subnormal", "-0"])
    dtype = c.rng.choice(["float16", "float32"])
    step = np.nextafter(np.array(bound, WIRE[dtype]), np.array(np.inf, WIRE[dtype]))
    down = np.nextafter(np.array(bound, WIRE[dtype]), np.array(0, WIRE[dtype]))
    values = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "3e38": 3e38, "65504": 65504.0, "bound": bound,
              "-bound": -bound, "over": float(step), "under": float(down), "-over": -float(step), "pad-nan": np.nan,
              "subnormal": 1e-42 if dtype == "float32" else 6e-8, "-0": -0.0}
    if how in ("as-fp32", "as-fp16"):
        draft.set_array("hidden", draft.array("hidden"), "float32" if how == "as-fp32" else "float16")
    elif how == "3e38":
        _hidden_mut(draft, 3e38, "float32")
    else:
        _hidden_mut(draft, values[how], dtype, pad=how == "pad-nan")
    return draft.frames()


def m_values_mask(draft: Draft, c: Ctx) -> list[bytes]:
    """Mask values 2 and 255, an all-zero row, all zeros, left padding (valid)."""
    mask = draft.array("attention_mask")
    how = c.rng.choice(["2", "255", "zero-row", "all-zero", "left-pad", "ones"])
    r = c.rng.randrange(mask.shape[0])
    if how in ("2", "255"):
        mask[r, c.rng.randrange(mask.shape[1])] = int(how)
    elif how == "zero-row":
        mask[r] = 0
    elif how == "all-zero":
        mask[:] = 0
    elif how == "left-pad":
        mask = mask[:, ::-1].copy()
    else:
        mask[:] = 1
    draft.set_array("attention_mask", mask)
    return draft.frames()


def m_values_labels(draft: Draft, c: Ctx) -> list[bytes]:
    """Labels -1, num_labels, 2**62, -2**63, num_labels-1 (valid)."""
    labels = draft.array("labels")
    labels[c.rng.randrange(len(labels))] = c.rng.choice([-1, c.cfg.num_labels, 2**62, -(2**63), c.cfg.num_labels - 1])
    draft.set_array("labels", labels)
    return draft.frames()


def m_values_ids(draft: Draft, c: Ctx) -> list[bytes]:
    """Duplicate sample ids; negative and extreme ids (valid)."""
    ids = draft.array("sample_ids")
    how = c.rng.choice(["dup", "dup", "negative", "extreme"])
    if how == "dup" and len(ids) > 1:
        ids[1] = ids[0]
    elif how == "negative":
        ids[0] = -ids[0] - 1
    else:
        ids[0] = c.rng.choice([2**63 - 1, -(2**63)])
        if len(ids) > 1 and ids[1] == ids[0]:
            ids[1] = 0
    draft.set_array("sample_ids", ids)
    return draft.frames()


def m_state(draft: Draft, c: Ctx) -> list[bytes]:
    """Protocol state inside the stream: a resent seq (deduplicated), a seq near 2**31, another device's name."""
    how = c.rng.choice(["resend", "high-seq", "other-device"])
    if how == "resend" and c.dev.accepted:
        draft.header["seq"] = c.rng.choice(c.dev.accepted)
    elif how == "high-seq":
        draft.header["seq"] = c.dev.high_seq
        c.dev.high_seq -= 1
    elif c.others:
        draft.header["device"] = c.rng.choice(c.others)
    return draft.frames()


def m_valid(draft: Draft, c: Ctx) -> list[bytes]:
    """No mutation: a valid message must be accepted."""
    return draft.frames()


#: Mutator classes: (mutator, message kinds it applies to).
MUTATORS: dict[str, tuple[Mutator, tuple[str, ...]]] = {
    "field-type": (m_field_type, DEVICE_TYPES),
    "field-range": (m_field_range, DEVICE_TYPES),
    "field-missing": (m_field_missing, DEVICE_TYPES),
    "field-extra": (m_field_extra, DEVICE_TYPES),
    "envelope": (m_envelope, DEVICE_TYPES),
    "array-names": (m_array_names, ("BATCH",)),
    "array-dtype": (m_array_dtype, ("BATCH",)),
    "array-shape": (m_array_shape, ("BATCH",)),
    "frames": (m_frames, DEVICE_TYPES),
    "bitflip": (m_bitflip, DEVICE_TYPES),
    "encoding": (m_encoding, DEVICE_TYPES),
    "values-float": (m_values_float, ("BATCH",)),
    "values-mask": (m_values_mask, ("BATCH",)),
    "values-labels": (m_values_labels, ("BATCH",)),
    "values-ids": (m_values_ids, ("BATCH",)),
    "state-stream": (m_state, ("BATCH",)),
    "valid": (m_valid, DEVICE_TYPES),
}
#: How often each base message kind is drawn (a BATCH carries most of what can be wrong).
KIND_WEIGHTS = {"HELLO": 2, "BATCH": 6, "HEARTBEAT": 1, "BYE": 1}


# -- hypothesis strategies ----------------------------------------------------------------------

@functools.cache
def _msgpack_values(max_leaves: int = 6):
    """Any value msgpack can carry: None, bools, ints up to uint64, floats, str, bin, lists, maps."""
    from hypothesis import strategies as st

    leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.sampled_from(INT_EXTREMES)
              | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=70) | st.binary(max_size=8))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                        max_leaves=max_leaves)


@functools.cache
def hyp_mutation(kind: str):
    """A strategy of (class, mutator) for a base message of ``kind``: arbitrary header values, array
    specs, array contents (BATCH) and frame bytes."""
    from hypothesis import strategies as st

    options = [st.tuples(st.just("hyp-header"), _hyp_header(kind)), st.tuples(st.just("hyp-frames"), _hyp_frames())]
    if kind == "BATCH":
        options += [st.tuples(st.just("hyp-arrays"), _hyp_arrays()), st.tuples(st.just("hyp-values"), _hyp_values())]
    return st.one_of(*options)


def _hyp_header(kind: str):
    from hypothesis import strategies as st

    names = st.sampled_from(["v", "type", "device", *FIELD_RULES[kind]]) | st.text(max_size=8)
    sets = st.lists(st.tuples(names, _msgpack_values()), min_size=1, max_size=3)
    drops = st.lists(st.sampled_from(["v", "type", "device", *FIELD_RULES[kind]]), max_size=2)

    def build(changes: list, removed: list) -> Mutator:
        def mutate(draft: Draft, c: Ctx) -> list[bytes]:
            for name in removed:
                draft.header.pop(name, None)
            for name, value in changes:
                draft.header[name] = value
            return draft.frames()
        return mutate

    return st.builds(build, sets, drops)


def _hyp_arrays():
    from hypothesis import strategies as st

    dims = st.integers(-2, 20) | st.sampled_from([2**31, 2**63, 2**64 - 1, -(2**63)])
    values = (st.sampled_from([*ARRAY_RULES, *WIRE]) | st.lists(dims, max_size=4) | _msgpack_values(3))
    edits = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["name", "dtype", "shape", "extra"]), values),
                     min_size=1, max_size=3)

    def build(changes: list, order: list[int], move_frames: bool) -> Mutator:
        def mutate(draft: Draft, c: Ctx) -> list[bytes]:
            specs = draft.header["arrays"]
            for i, key, value in changes:
                specs[i % len(specs)][key] = value
            draft.header["arrays"] = [specs[i] for i in order]
            if move_frames:
                draft.blobs = [draft.blobs[i] for i in order]
            return draft.frames()
        return mutate

    return st.builds(build, edits, st.permutations(range(4)), st.booleans())


def _hyp_values():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def batch(draw) -> Mutator:
        cfg = FuzzConfig()
        b, t = draw(st.integers(1, cfg.max_batch)), draw(st.integers(1, cfg.max_seq_len))
        dtype = draw(st.sampled_from(["float16", "float32"]))
        width = 16 if dtype == "float16" else 32
        inside = st.floats(-cfg.bound, cfg.bound, width=width)
        wild = st.floats(width=width, allow_nan=True, allow_infinity=True)
        hidden = draw(hnp.arrays(WIRE[dtype], (b, t, cfg.hidden_size), elements=inside | wild if draw(st.booleans()) else inside))
        mask = draw(hnp.arrays(np.uint8, (b, t), elements=st.sampled_from([0, 1, 1, 1, 2, 255])))
        if draw(st.booleans()):
            mask[:, 0] = 1
        labels = draw(hnp.arrays(np.int64, (b,), elements=st.integers(-1, cfg.num_labels) | st.sampled_from([2**62, -(2**63)])))
        ids = draw(hnp.arrays(np.int64, (b,), elements=st.integers(0, 2 * b) | st.integers(-(2**63), 2**63 - 1)))
        arrays = {"hidden": (hidden, dtype), "attention_mask": (mask, "uint8"), "labels": (labels, "int64"),
                  "sample_ids": (ids, "int64")}

        def mutate(draft: Draft, c: Ctx) -> list[bytes]:
            for name, (arr, dt) in arrays.items():
                draft.set_array(name, arr, dt)
            return draft.frames()
        return mutate

    return batch()


def _hyp_frames():
    from hypothesis import strategies as st

    edits = st.lists(st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 4), st.integers(0, 1 << 16)),
        st.tuples(st.just("cut"), st.integers(0, 4), st.integers(0, 4096)),
        st.tuples(st.just("add"), st.integers(0, 4), st.binary(max_size=16)),
        st.tuples(st.just("frame"), st.integers(0, 6), st.binary(max_size=64)),
        st.tuples(st.just("drop"), st.integers(0, 4), st.none()),
    ), min_size=1, max_size=4)

    def build(changes: list) -> Mutator:
        def mutate(draft: Draft, c: Ctx) -> list[bytes]:
            frames = [bytearray(f) for f in draft.frames()]
            for op, k, arg in changes:
                _frame_edit(frames, op, k, arg)
            return [bytes(f) for f in frames] or [b""]
        return mutate

    return st.builds(build, edits)


def _frame_edit(frames: list[bytearray], op: str, k: int, arg: Any) -> None:
    if op == "frame":
        frames.insert(min(k, len(frames)), bytearray(arg))
        return
    if not frames:
        return
    k %= len(frames)
    if op == "flip" and frames[k]:
        frames[k][(arg // 8) % len(frames[k])] ^= 1 << (arg % 8)
    elif op == "cut":
        del frames[k][len(frames[k]) - min(arg, len(frames[k])):]
    elif op == "add":
        frames[k] += arg
    elif op == "drop":
        del frames[k]


# -- scripted abuse of the protocol's state -----------------------------------------------------

@dataclass
class Observation:
    """A scenario's finding beyond per-message verdicts. ``ok`` None: informational."""

    name: str
    ok: bool | None
    detail: str


def _batch(r: Runner, dev: Dealer, seq: int, wire: str = "fp16", b: int | None = None, seed: int = 0) -> list[bytes]:
    return batch_draft(random.Random(seed * 7919 + seq), dev.name, seq, wire, r.cfg, b=b).frames()


def _hello(dev: Dealer, wire: str = "fp16", **fields: Any) -> list[bytes]:
    return hello_draft(dev.name, wire, **fields).frames()


def _msg(kind: str, device: Any, **fields: Any) -> list[bytes]:
    return [msgpack.packb({"v": 1, "type": kind, "device": device, **fields}, use_bin_type=True)]


def scenario_before_hello(r: Runner) -> list[Observation]:
    """BATCH, HEARTBEAT and BYE before any HELLO; HELLO with each bad field, then a BATCH."""
    dev = r.dealer("early")
    for frames in (_batch(r, dev, 0), _msg("HEARTBEAT", "early"), _msg("BYE", "early")):
        r.step("state:before-hello", dev, frames)
    bad = {"manifest_sha256": ["ab" * 31, "AB" * 32, "0" * 64, 7], "split": [0, 3, 4097, "2", True],
           "precision": ["p" * 33, "\x00", None], "wire_dtype": ["bf16", "FP16", ""], "num_samples": [-2, 2**31, 1.0],
           "epochs": [0, 1001, -1, None]}
    for name, values in bad.items():
        for i, value in enumerate(values):
            dev = r.dealer(f"bad-{name}-{i}")
            r.step("state:hello-bad-field", dev, _hello(dev, **{name: value}))
            r.step("state:hello-bad-field", dev, _batch(r, dev, 0))
    return []


def scenario_seq_extremes(r: Runner) -> list[Observation]:
    """seq at 2**31-1 (valid, then resent), past it, at 2**63 and 2**64-1, negative."""
    dev = r.dealer("seqx")
    r.step("state:seq-extremes", dev, _hello(dev))
    for seq in (MAX_INT, MAX_INT, MAX_INT - 1, 2**31, 2**32, 2**63, 2**64 - 1, -1, -(2**63)):
        frames = batch_draft(random.Random(seq), dev.name, 0, "fp16", r.cfg).frames()
        header = msgpack.unpackb(frames[0])
        header["seq"] = seq
        r.step("state:seq-extremes", dev, [msgpack.packb(header), *frames[1:]])
    return []


def scenario_other_device(r: Runner) -> list[Observation]:
    """BYE, HEARTBEAT and BATCH naming another device; HELLO taking another device's id (allowed without keys)."""
    alice, bob = r.dealer("alice"), r.dealer("bob")
    for dev in (alice, bob):
        r.step("state:other-device", dev, _hello(dev))
    r.step("state:other-device", alice, _msg("BYE", "bob"))
    r.step("state:other-device", alice, _msg("HEARTBEAT", "bob"))
    r.step("state:other-device", alice, batch_draft(random.Random(1), "bob", 0, "fp16", r.cfg).frames())
    after = r.step("state:other-device", bob, _batch(r, bob, 1))
    thief = r.dealer("victim-thief", "thief")
    victim = r.dealer("victim")
    r.step("state:other-device", victim, _hello(victim))
    r.step("state:other-device", thief, hello_draft("victim", "fp16").frames())
    lost = r.step("state:other-device", victim, _batch(r, victim, 0))
    return [Observation("BYE for another device leaves it streaming", after.ok and after.first is not None
                        and after.first.type == "ACK", after.detail or "bob's next batch was acknowledged"),
            Observation("without keys a HELLO naming another device takes its session", None,
                        f"the victim's next batch got {lost.first.type if lost.first else 'no reply'} "
                        f"{CODE_NAMES.get(lost.first.code, '') if lost.first else ''} (docs/protocol.md section 1)")]


def scenario_samples(r: Runner) -> list[Observation]:
    """More samples than announced; announcing 0 samples; announcing more than the server takes; BATCH after BYE."""
    four = r.dealer("four")
    r.step("state:samples", four, _hello(four, num_samples=4))
    for seq in range(3):
        r.step("state:samples", four, _batch(r, four, seq, b=2))
    zero = r.dealer("zero")
    r.step("state:samples", zero, _hello(zero, num_samples=0))
    zero_out = r.step("state:samples", zero, _batch(r, zero, 0, b=1))
    big = r.dealer("toomany")
    r.step("state:samples", big, _hello(big, num_samples=r.cfg.max_samples + 1))
    late = r.dealer("late")
    r.step("state:bye-then-batch", late, _hello(late))
    r.step("state:bye-then-batch", late, _msg("BYE", "late"))
    exp = replace(expect(_batch(r, late, 0), late.identity, r.model),
                  codes=frozenset({CODE["NOT_WELCOMED"], CODE["REFUSED"], CODE["LIMIT_EXCEEDED"]}), why="after BYE")
    after_bye = r.step("state:bye-then-batch", late, _batch(r, late, 0), exp)
    first = after_bye.first
    return [Observation("a device that announced 0 samples sends none", zero_out.ok,
                        f"its batch got {first_kind(zero_out)}"),
            Observation("a BATCH after the device's own BYE", None,
                        f"got {first.type if first else 'no reply'} (the spec does not say; the session counts as finished)")]


def first_kind(outcome: Outcome) -> str:
    first = outcome.first
    if first is None:
        return "no reply"
    return f"ERROR {CODE_NAMES.get(first.code, first.code)}" if first.type == "ERROR" else first.type


def scenario_frames(r: Runner) -> list[Observation]:
    """A batch with 500 extra frames; a frame past ZMQ_MAXMSGSIZE (the transport drops the connection);
    the same identity reconnects and keeps its session."""
    dev = r.dealer("frames")
    r.step("state:frames", dev, _hello(dev))
    r.step("state:frames", dev, [*_batch(r, dev, 0), *([b"x" * 1000] * 500)])
    r.step("state:frames", dev, [*_batch(r, dev, 1)[:1], b"\x00" * 200_000, *_batch(r, dev, 1)[2:]])
    time.sleep(0.3)  # the DEALER reconnects with the same identity
    back = r.step("state:frames", dev, _batch(r, dev, 2))
    return [Observation("after a dropped connection the same identity keeps its session", back.ok, first_kind(back))]


def scenario_window(r: Runner) -> list[Observation]:
    """Queue 1, window 2, trainer paused: credits withheld, then WINDOW_EXCEEDED for every batch beyond."""
    r.server.call("pause")
    dev = r.dealer("greedy")
    r.step("state:window", dev, _hello(dev))
    r.step("state:window", dev, _batch(r, dev, 0))
    for seq in (1, 2):
        r.step("state:window", dev, _batch(r, dev, seq), replace(expect(_batch(r, dev, seq), dev.identity, r.model), held=True))
    over = Expect(codes=frozenset({CODE["WINDOW_EXCEEDED"]}), why="window overrun", targets=("window",))
    r.step("state:window", dev, _batch(r, dev, 3), over)
    sent = [_batch(r, dev, seq) for seq in range(4, 44)]
    for frames in sent:  # a burst, sent without waiting
        dev.send(frames)
    burst: list[Reply] = []
    deadline = time.monotonic() + 4 * r.cfg.reply_timeout_s
    while len(burst) < len(sent) and time.monotonic() < deadline:  # a loaded machine may pause between replies
        burst += [parse_reply(f) for f in dev.replies(0.2)]
    for i, frames in enumerate(sent):
        r.record("state:window", dev, frames, over, burst[i:i + 1])
    codes = Counter(CODE_NAMES.get(x.code, x.type) for x in burst)
    stats = r.server.call("stats")
    r.server.call("resume")
    late = [parse_reply(f) for f in dev.replies(2.0, 0.3)]
    acked = sorted(x.fields.get("seq") for x in late if x.type == "ACK")
    return [Observation("a burst past the window is refused, nothing more held",
                        stats["pending"] <= r.cfg.window and codes.get("WINDOW_EXCEEDED", 0) == 40,
                        f"burst of 40: {dict(codes)}; pending {stats['pending']} (window {r.cfg.window}), "
                        f"queue {stats['qsize']}/{r.cfg.queue_size}"),
            Observation("withheld credits arrive once the trainer takes the batches", acked == [1, 2], f"late ACKs {acked}")]


def scenario_limits(r: Runner, cycles: int = 300) -> list[Observation]:
    """max_sessions 3, max_strikes 4: the session cap; a device ignoring ERRORs is disconnected; HELLO/BYE
    churn with fresh ids; connections disconnected one after another."""
    devs = [r.dealer(n) for n in ("s1", "s2", "s3", "s4")]
    for dev in devs:
        r.step("state:session-cap", dev, _hello(dev))
    again = r.dealer("s1", "s1-again")
    r.step("state:session-cap", again, _hello(again))  # a reconnect is not a new session
    for dev in devs[1:3]:  # finished sessions free their slots
        r.step("state:session-cap", dev, _msg("BYE", dev.name))
    obs = _ignore_errors(r)
    before = r.server.call("stats")
    for i in range(cycles):
        dev = r.dealer(f"churn{i}")
        r.step("state:hello-bye-churn", dev, _hello(dev))
        r.step("state:hello-bye-churn", dev, _msg("BYE", dev.name))
        dev.close()
    after = r.server.call("stats")
    obs.append(Observation(f"sessions held after {cycles} HELLO/BYE cycles with fresh ids stay within 4 x max_sessions",
                           after["sessions"] <= 4 * r.cfg.max_sessions,
                           f"{after['sessions']} sessions held (max_sessions {r.cfg.max_sessions}, {after['live_sessions']} "
                           f"live); RSS {before['rss_now'] / 1e6:.1f} -> {after['rss_now'] / 1e6:.1f} MB"))
    junk = max(1, cycles // 5)
    for i in range(junk):
        dev = r.dealer(f"junk{i}")
        for _ in range(r.cfg.max_strikes):
            r.step("state:disconnect-churn", dev, [b"\xc1"], more_s=0.0)
        dev.replies(0.2, 0.05)  # the disconnecting BYE
        dev.close()
    held = r.server.call("stats")
    obs.append(Observation("disconnected connections held stay bounded (the strike table's bound: 4 x max_sessions)",
                           held["banned"] <= 4 * r.cfg.max_sessions,
                           f"{held['banned']} disconnected connections remembered after {junk} (strike table {held['strikes']})"))
    return obs


def _ignore_errors(r: Runner) -> list[Observation]:
    """A device that keeps sending invalid batches after its ERRORs."""
    stubborn = r.dealer("stubborn")
    r.step("state:ignore-errors", stubborn, _hello(stubborn))
    replies = []
    for seq in range(r.cfg.max_strikes):
        frames = _batch(r, stubborn, seq, b=2)
        draft = Draft(msgpack.unpackb(frames[0]), frames[1:])
        ids = draft.array("sample_ids")
        ids[1] = ids[0]
        draft.set_array("sample_ids", ids)
        out = r.step("state:ignore-errors", stubborn, draft.frames(), more_s=0.5 if seq == r.cfg.max_strikes - 1 else 0.0)
        replies += out.replies
    bye = [x for x in replies if _disconnects(x)]
    if not bye:  # it follows the last ERROR, maybe later than the wait for more
        bye = [x for x in map(parse_reply, stubborn.replies(r.cfg.reply_timeout_s)) if _disconnects(x)]
        if bye:
            r._banned(stubborn)
    disconnected = bool(bye)
    after = [r.step("state:ignore-errors", stubborn, frames) for frames in (_batch(r, stubborn, 99), _hello(stubborn))]
    other = r.dealer("stubborn", "stubborn-2")
    refused = r.step("state:ignore-errors", other, _hello(other))
    resetter = r.dealer("resetter")
    r.step("state:ignore-errors", resetter, _hello(resetter))
    invalid = [b"\xc1"]
    for frames in [invalid] * (r.cfg.max_strikes - 1) + [_batch(r, resetter, 0)] + [invalid] * (r.cfg.max_strikes - 1):
        r.step("state:ignore-errors", resetter, frames)
    kept = r.step("state:ignore-errors", resetter, _batch(r, resetter, 1))
    r.step("state:ignore-errors", resetter, _msg("BYE", "resetter"))
    return [
        Observation(f"disconnected after {r.cfg.max_strikes} invalid messages (BYE 'disconnected: ...')", disconnected,
                    f"BYE reason {bye[0].fields.get('reason')!r}" if bye else "no BYE"),
        Observation("then ignored; a HELLO from a new connection for that device is REFUSED",
                    all(o.first is None for o in after) and refused.ok,
                    f"after: {[first_kind(o) for o in after]}; new connection: {first_kind(refused)}"),
        Observation(f"{2 * (r.cfg.max_strikes - 1)} invalid messages with a valid batch among them count as "
                    f"{2 * (r.cfg.max_strikes - 1)} (docs/protocol.md section 7: '16 invalid messages')",
                    kept.first is None, f"its next batch got {first_kind(kept)}"
                    + (" (disconnected)" if kept.first is None else " (still connected: an accepted batch reset its strikes)")),
    ]


# -- the campaign ---------------------------------------------------------------------------------

def _mutate(r: Runner, fleet: list[Fleet], rng: random.Random, cls: str | None = None) -> tuple[str, Fleet, list[bytes]]:
    """One seeded random mutation of a valid message of a random device."""
    cls = cls or rng.choice(list(MUTATORS))
    mutator, kinds = MUTATORS[cls]
    kind = rng.choices(kinds, [KIND_WEIGHTS[k] for k in kinds])[0]
    dev = rng.choice(fleet)
    draft = base_draft(rng, dev, kind, r.cfg)
    ctx = Ctx(rng, r.cfg, dev, [f.name for f in fleet if f is not dev])
    return cls, dev, mutator(draft, ctx)


def send_mutation(r: Runner, fleet: list[Fleet], cls: str, dev: Fleet, frames: list[bytes]) -> Outcome:
    """Send one mutated message; afterwards make every fleet session whole again if it changed one."""
    outcome = r.step(cls, dev.dealer, frames)
    info = outcome.expect.info
    first = outcome.first
    if first is not None and first.type == "ACK" and info.get("type") == "BATCH" and info.get("device") == dev.name:
        dev.accepted.append(first.fields.get("seq"))
    if first is not None and first.type == "WELCOME":
        _repair(r, fleet, {info.get("device"), dev.name})
    return outcome


def _repair(r: Runner, fleet: list[Fleet], names: set) -> None:
    """A mutated HELLO was accepted: it may have moved a fleet device's session to another connection
    or changed its wire dtype; a clean HELLO from the device itself restores both."""
    for dev in fleet:
        if dev.name in names:
            r.step("control", dev.dealer, hello_draft(dev.name, dev.wire).frames())


def start_fleet(r: Runner, count: int) -> list[Fleet]:
    """``count`` welcomed devices, alternately fp16 and fp32."""
    fleet = [Fleet(r.dealer(f"fz{i}"), "fp16" if i % 2 == 0 else "fp32") for i in range(count)]
    for dev in fleet:
        out = r.step("control", dev.dealer, hello_draft(dev.name, dev.wire).frames())
        if not out.ok:
            raise RuntimeError(f"fleet device {dev.name} was not welcomed: {out.detail}")
    return fleet


def random_phase(r: Runner, fleet: list[Fleet], n: int, rng: random.Random, progress: Callable[[], bool]) -> None:
    """``n`` messages from the seeded random mutators, until ``progress`` says stop."""
    for _ in range(n):
        send_mutation(r, fleet, *_mutate(r, fleet, rng))
        if not progress():
            return


def hypothesis_phase(r: Runner, fleet: list[Fleet], n: int, seed: int, rng: random.Random,
                     progress: Callable[[], bool]) -> int:
    """``n`` messages mutated by hypothesis strategies (generation only: nothing to shrink), until
    ``progress`` says stop."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed
    from hypothesis import strategies as st

    sent = [0]
    stopped: list[bool] = []
    kinds = st.sampled_from([kind for kind, weight in KIND_WEIGHTS.items() for _ in range(weight)])

    @hyp_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(st.data())
    def one(data: Any) -> None:
        if stopped:
            return
        # Everything a strategy depends on is drawn from hypothesis too, so its choices replay.
        kind = data.draw(kinds)
        dev = fleet[data.draw(st.integers(0, len(fleet) - 1))]
        draft = base_draft(rng, dev, kind, r.cfg)
        cls, mutate = data.draw(hyp_mutation(kind))
        frames = mutate(draft, Ctx(rng, r.cfg, dev, [f.name for f in fleet if f is not dev]))
        send_mutation(r, fleet, cls, dev, frames)
        sent[0] += 1
        if not progress():
            stopped.append(True)

    one()
    return sent[0]


SCENARIOS: dict[str, tuple[dict, tuple[Callable[[Runner], list[Observation]], ...]]] = {
    "protocol state": ({}, (scenario_before_hello, scenario_seq_extremes, scenario_other_device, scenario_samples,
                            scenario_frames)),
    "window": ({"queue_size": 1, "window": 2}, (scenario_window,)),
    "limits": ({"max_sessions": 3, "max_strikes": 4}, (scenario_limits,)),
}


def run_scenarios(ctx: Any, log: Callable[[str], None], churn: int = 300,
                  main: Runner | None = None) -> tuple[list[Runner], list[Observation], list[dict]]:
    """Every scripted abuse case, each group on a server with its limits (the group with the default
    limits on ``main``'s, if given); ``churn``: HELLO/BYE cycles of the session-cap scenario (and a
    fifth as many disconnected connections)."""
    runners, observations, finals = [], [], []
    for group, (overrides, scenarios) in SCENARIOS.items():
        if main is not None and not overrides:
            observations += _run_group(main, scenarios, churn)
            log(f"scenarios '{group}' on the campaign's server")
            continue
        with FuzzServer(replace(FuzzConfig(), **overrides)) as server:
            r = Runner(server, ctx)
            observations += _run_group(r, scenarios, churn)
            finals.append({"group": group, **server.close()})
            r.close()
        runners.append(r)
        log(f"scenarios '{group}': {sum(row.sent for row in r.rows.values())} messages")
    return runners, observations, finals


def _run_group(r: Runner, scenarios: tuple, churn: int) -> list[Observation]:
    found: list[Observation] = []
    for scenario in scenarios:
        found += scenario(r, churn) if scenario is scenario_limits else scenario(r)
    r.settle()
    return found


def run_campaign(n_messages: int = 12000, seed: int = 0, log: Callable[[str], None] | None = None,
                 scenarios: bool = True, hypothesis_share: float = 1 / 3, churn: int = 300) -> dict:
    """Fuzz a real Receiver on loopback with ``n_messages`` mutated valid messages (a share of them
    from hypothesis strategies), then the scripted abuse scenarios. Returns the counts per mutator
    class, every mismatch with the spec, the queue checks, crashes and memory against the bound.

    Memory is the server process's RSS, sampled every 10 ms: its growth is taken from a baseline
    after the first 5% of the messages (at most 500), so what the interpreter and the allocator set
    up once, on first use of each code path, is not counted as held; the growth from the start is
    reported too."""
    import zmq

    log = log or (lambda message: None)
    ctx = zmq.Context()
    rng = random.Random(seed)
    started = time.monotonic()
    cfg = FuzzConfig()
    with FuzzServer(cfg) as server:
        r = Runner(server, ctx)
        fleet = start_fleet(r, cfg.devices)
        start = server.call("mark")
        marked = dict(start)
        warmup = min(500, n_messages // 20)
        done = [0]

        halted: list[str] = []

        def progress() -> bool:
            """Count a message; False once the receiver thread is found dead (every later message would
            wait out its reply timeout for nothing)."""
            done[0] += 1
            if done[0] == warmup:
                marked.update(server.call("mark"))
            if done[0] % 200 == 0:
                r.collect_reports()
                if not server.call("stats")["alive"]:
                    halted.append(f"receiver thread dead after {done[0]} messages")
                    log(halted[-1])
                    return False
            if done[0] % max(1, n_messages // 10) == 0:
                stats = server.call("stats")
                log(f"{done[0]}/{n_messages} messages, {r.internal} INTERNAL, {len(r.queue_problems)} bad batches queued, "
                    f"{len(r.mismatches)} off-spec, RSS +{(stats['rss_peak'] - stats['rss_baseline']) / 1e6:.2f} MB, "
                    f"{time.monotonic() - started:.0f} s")
            return True

        n_hyp = int(n_messages * hypothesis_share)
        random_phase(r, fleet, n_messages - n_hyp, rng, progress)
        got = hypothesis_phase(r, fleet, n_hyp, seed, rng, progress) if n_hyp and not halted else 0
        if not halted:
            random_phase(r, fleet, n_hyp - got, rng, progress)  # hypothesis may stop short of max_examples
        fuzz_stats = r.settle()  # memory is what the server held while fuzzing, before the scenarios
        runners, observations, finals = (run_scenarios(ctx, log, churn, main=None if halted else r) if scenarios
                                         else ([], [], []))
        final = server.close()
        r.close()
    ctx.term()
    marked["rss_start"] = start["rss_baseline"]
    results = summarize(cfg, r, runners, observations, marked, fuzz_stats, final, finals, seed, time.monotonic() - started)
    results["halted"] = halted
    return results


def memory_bound(cfg: FuzzConfig, sessions: int, pending: int) -> int:
    """What the server may hold: queue_size + sessions x window batches of the largest valid message, plus pending."""
    return (cfg.queue_size + sessions * cfg.window + pending) * cfg.largest_message


def summarize(cfg: FuzzConfig, main: Runner, runners: list[Runner], observations: list[Observation], marked: dict,
              fuzzed_stats: dict, final: dict, finals: list[dict], seed: int, seconds: float) -> dict:
    """The campaign's results as plain data (what ``sftool bench fuzz`` prints and writes); memory
    from ``fuzzed_stats`` (the campaign's server after the fuzzing), crashes from every server's last stats."""
    from sftool.runtime.files import cpu_name

    all_runners = [main, *runners]
    rows: dict[str, dict] = {}
    for runner in all_runners:
        for cls, row in runner.rows.items():
            merged = rows.setdefault(cls, {"sent": 0, "errors": Counter(), "no_reply": 0, "accepted": 0, "wrong": 0,
                                           "named": 0})
            for key in ("sent", "no_reply", "accepted", "wrong", "named"):
                merged[key] += getattr(row, key)
            merged["errors"].update(row.errors)
    for row in rows.values():
        row["errors"] = dict(row["errors"].most_common())
    fuzzed = sum(row["sent"] for cls, row in rows.items() if not cls.startswith(("state:", "control")))
    mem = fuzzed_stats
    bound = memory_bound(cfg, mem["sessions"], mem["pending_max"])
    growth = mem["rss_peak"] - marked["rss_baseline"]
    finals_all = [{"group": "campaign", **final}, *finals]
    crashes = {
        "internal_replies": sum(x.internal for x in all_runners),
        "receiver_dead": sum(not f.get("alive", False) for f in finals_all),
        # A cross-check, not counted again: the receiver logs each exception it answers with INTERNAL.
        "logged_errors": sum(f.get("logged", {}).get("ERROR", 0) + f.get("logged", {}).get("CRITICAL", 0) for f in finals_all),
    }
    mismatches = [m for x in all_runners for m in x.mismatches]
    verdicts = Counter(m["verdict"] for m in mismatches)
    return {
        "config": {**asdict(cfg), "seed": seed, "largest_message": cfg.largest_message},
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg": list(os.getloadavg())},
        "messages": {"fuzzed": fuzzed, "scenarios": sum(r["sent"] for c, r in rows.items() if c.startswith("state:")),
                     "control": rows.get("control", {}).get("sent", 0)},
        "classes": rows,
        "totals": {
            "crashes": crashes, "crash_count": crashes["internal_replies"] + crashes["receiver_dead"],
            "invalid_trained": sum(len(x.queue_problems) for x in all_runners),
            "queued_checked": sum(x.queued_ok for x in all_runners) + sum(len(x.queue_problems) for x in all_runners),
            "queued_malformed": sum(x.queued_despite for x in all_runners),
            "acked_never_queued": sum(len(x.queued) for x in all_runners),
            "no_reply": verdicts.get("no-reply", 0),
            "off_spec": dict(verdicts),
            "off_spec_kinds": _kinds(mismatches),
            "bad_replies": sum(len(x.bad_replies) for x in all_runners),
            "stray_replies": sum(x.stray for x in all_runners),
        },
        "memory": {"rss_start": marked["rss_start"], "rss_baseline": marked["rss_baseline"], "rss_peak": mem["rss_peak"],
                   "growth": growth, "growth_from_start": mem["rss_peak"] - marked["rss_start"], "bound": bound,
                   "within": growth <= bound, "sessions": mem["sessions"], "pending_max": mem["pending_max"],
                   "seen_seqs": mem["seen"], "queued": mem["queued"]},
        "observations": [asdict(o) for o in observations],
        "mismatches": mismatches[:200],
        "bad_replies": _grouped([b for x in all_runners for b in x.bad_replies]),
        "queue_problems": [p for x in all_runners for p in x.queue_problems][:50],
        "servers": finals_all,
        "seconds": seconds,
    }


def _kinds(mismatches: list[dict]) -> list[dict]:
    """Mismatches grouped by what came back and the rule it broke, values left out."""
    counts = Counter((m["verdict"], m["detail"].split(" for ")[0].split(":")[0],
                      re.split(r"[\[{'\"(\d]", m["why"])[0].strip()) for m in mismatches)
    return [{"verdict": v, "got": got, "rule": rule, "count": n} for (v, got, rule), n in counts.most_common()]


def _grouped(items: list[dict]) -> list[dict]:
    counts = Counter((i["class"], i["reply"], "; ".join(p.split(" (")[0] for p in i["problems"])) for i in items)
    return [{"class": c, "reply": t, "problem": p, "count": n} for (c, t, p), n in counts.most_common(30)]


def print_fuzz(results: dict, console: Any = None) -> None:
    """The table of mutator classes and the totals."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    cfg, machine = results["config"], results["machine"]
    table = Table(title=(f"sftool bench fuzz: {results['messages']['fuzzed']} mutated messages + "
                         f"{results['messages']['scenarios']} scenario messages, seed {cfg['seed']}; "
                         f"CPU: {machine['cpu']} ({machine['cpus']} cores)"))
    for col in ("class", "sent", "ERROR replies (by code)", "reason names it", "no reply", "accepted", "off-spec"):
        table.add_column(col, justify="left" if col in ("class", "ERROR replies (by code)") else "right")
    for cls, row in results["classes"].items():
        codes = ", ".join(f"{name} {n}" for name, n in row["errors"].items())
        errors = sum(row["errors"].values())
        table.add_row(cls, str(row["sent"]), codes or "-", f"{row['named']}/{errors}" if errors else "-",
                      str(row["no_reply"]), str(row["accepted"]), str(row["wrong"]))
    console.print(table)
    for line in summary_lines(results):
        console.print(line, highlight=False, markup=False)


def summary_lines(results: dict) -> list[str]:
    """The totals as text lines."""
    t, m = results["totals"], results["memory"]
    crashes = t["crashes"]
    lines = [
        f"crashes: {t['crash_count']} (INTERNAL replies {crashes['internal_replies']}, receiver threads dead "
        f"{crashes['receiver_dead']}; exceptions the receiver logged: {crashes['logged_errors']})",
        f"invalid or non-finite batches trained: {t['invalid_trained']} of {t['queued_checked']} taken from the queue "
        f"(accepted although malformed: {t['queued_malformed']}; acknowledged, never queued: {t['acked_never_queued']})",
        f"off-spec replies: {t['off_spec'] or 'none'}; replies breaking the spec themselves: {t['bad_replies']}; "
        f"no reply where one was due: {t['no_reply']}",
        f"memory: RSS peak {m['rss_peak'] / 1e6:.1f} MB, growth {m['growth'] / 1e6:.2f} MB after warm-up "
        f"({m['growth_from_start'] / 1e6:.2f} MB from the start) vs bound "
        f"{m['bound'] / 1e6:.2f} MB ((queue + {m['sessions']} sessions x window + {m['pending_max']} pending) x "
        f"{results['config']['largest_message']} B): {'within' if m['within'] else 'BEYOND'}; "
        f"{m['seen_seqs']} seqs held for dedupe",
        f"time: {results['seconds']:.0f} s",
        *(f"HALTED: {why}" for why in results.get("halted", [])),
    ]
    for obs in results["observations"]:
        mark = {True: "ok", False: "FAIL", None: "note"}[obs["ok"]]
        lines.append(f"[{mark}] {obs['name']}: {obs['detail']}")
    for kind in t["off_spec_kinds"][:10]:
        lines.append(f"off-spec x{kind['count']}: {kind['got']} ({kind['verdict']}) where the spec says: {kind['rule']}")
    for item in results["bad_replies"][:8]:
        lines.append(f"bad reply x{item['count']} ({item['class']}): {item['reply']} {item['problem']}")
    shown = Counter()
    for mis in results["mismatches"]:
        key = (mis["class"], mis["verdict"])
        shown[key] += 1
        if shown[key] <= 2:
            lines.append(f"off-spec ({mis['class']}, {mis['verdict']}): {mis['detail']} | expected {mis['expected']}")
    return lines




if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        _serve(FuzzConfig(**json.loads(sys.argv[2])))
    else:
        sys.exit("usage: python -m sftool.link_fuzz serve CONFIG_JSON")
