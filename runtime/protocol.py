"""Wire protocol v1 between a device (ZeroMQ DEALER) and the training server (ROUTER).

This module is the single source of truth for the protocol; both sides import it.

A message is a list of frames: frame 0 is a msgpack header, the following frames are raw
little-endian array buffers (sent zero-copy), described in order by ``header["arrays"]``.
Nothing is ever pickled: a header is plain msgpack of str/int/float/bool/list/dict, and an
array is rebuilt with ``numpy.frombuffer`` only after its dtype, shape and byte count have
been checked.

Message types and their header fields (besides ``v``, ``type``, ``device``):

- ``HELLO``     device -> server: ``manifest_sha256``, ``split``, ``precision``, ``wire_dtype``,
                ``num_samples`` (planned, -1 if unknown), ``epochs``.
- ``WELCOME``   server -> device: ``window`` (max unacknowledged batches), ``session``,
                ``skip_epochs`` (epochs the server no longer needs, e.g. served from its cache).
- ``BATCH``     device -> server: ``seq``, ``epoch``, arrays ``hidden`` [B,T,H] fp16|fp32,
                ``attention_mask`` [B,T] uint8, ``labels`` [B] int64, ``sample_ids`` [B] int64.
- ``ACK``       server -> device: ``seq``. Frees one slot of the device's window. The server
                withholds it while its queue is full (backpressure) or, in the sequential
                schedule, until the batch is trained.
- ``HEARTBEAT`` either way, no payload; the server answers a device's heartbeat.
- ``BYE``       device -> server when done (``batches``, ``samples``); server -> device when
                training is over (``reason``) or to confirm a device's BYE. A device confirms the
                server's BYE with its own, and the server closes only after that (or a grace period).
- ``ERROR``     server -> device: ``code``, ``reason``, optional ``seq``. The message that caused
                it is dropped; the server keeps serving.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

#: Longest device id accepted; ids name log lines and files, so keep them short and printable.
MAX_DEVICE_ID_LEN = 64
#: A header is small; anything bigger is an attack or a bug.
MAX_HEADER_BYTES = 16 * 1024


class MsgType(str, enum.Enum):
    HELLO = "HELLO"
    WELCOME = "WELCOME"
    BATCH = "BATCH"
    ACK = "ACK"
    HEARTBEAT = "HEARTBEAT"
    BYE = "BYE"
    ERROR = "ERROR"


class ErrorCode(enum.IntEnum):
    BAD_HEADER = 1
    BAD_ARRAY = 2
    UNKNOWN_TYPE = 3
    VERSION_MISMATCH = 4
    MANIFEST_MISMATCH = 5
    NOT_WELCOMED = 6
    REFUSED = 7
    INTERNAL = 8
    NOT_AUTHORIZED = 9


class ProtocolError(ValueError):
    """A message that does not follow the protocol. ``code`` says which rule it broke."""

    def __init__(self, code: ErrorCode, reason: str, seq: int | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.seq = seq


#: Wire dtypes by name. Only these ever cross the wire; all little-endian.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
}

#: The largest finite float16; activations beyond it must travel as float32.
FP16_MAX = 65504.0


def encode(msg_type: MsgType, device: str, arrays: Sequence[tuple[str, np.ndarray]] = (), **fields: Any) -> list[Any]:
    """Build the frames of one message: a msgpack header, then one buffer per array.

    Arrays are made contiguous little-endian and passed as memoryviews so pyzmq can send them
    without copying (``send_multipart(frames, copy=False)``).
    """
    specs = []
    buffers: list[Any] = []
    for name, arr in arrays:
        wire_name = _wire_dtype_name(arr.dtype)
        arr = np.ascontiguousarray(arr, dtype=WIRE_DTYPES[wire_name])
        specs.append({"name": name, "dtype": wire_name, "shape": list(arr.shape)})
        buffers.append(memoryview(arr).cast("B"))
    header = {"v": PROTOCOL_VERSION, "type": msg_type.value, "device": device, **fields}
    if specs:
        header["arrays"] = specs
    return [msgpack.packb(header, use_bin_type=True), *buffers]


def _wire_dtype_name(dtype: np.dtype) -> str:
    dt = np.dtype(dtype)
    for name, wire in WIRE_DTYPES.items():
        if dt.kind == wire.kind and dt.itemsize == wire.itemsize:
            return name
    raise ValueError(f"dtype {dtype} cannot travel on the wire (allowed: {', '.join(WIRE_DTYPES)})")


@dataclass(frozen=True)
class Header:
    """A validated header: the fields every message has, plus the rest as a dict."""

    type: MsgType
    device: str
    fields: dict[str, Any]

    def int_field(self, name: str, minimum: int = 0, default: int | None = None) -> int:
        """An integer field >= minimum; raises ProtocolError if missing or wrong."""
        value = self.fields.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{self.type.value}: field {name!r} must be an int >= {minimum}")
        return value

    def str_field(self, name: str, max_len: int = 256, default: str | None = None) -> str:
        value = self.fields.get(name, default)
        if not isinstance(value, str) or len(value) > max_len:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{self.type.value}: field {name!r} must be a string")
        return value


def decode_header(frame: bytes | memoryview) -> Header:
    """Parse and check frame 0. Raises ProtocolError on anything unexpected."""
    raw = bytes(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        # strict_map_key and raw=False: only str keys, no extension types, nothing executable.
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types; all mean "not a header"
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, "header must be a map")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH, f"protocol version {header.get('v')!r} != {PROTOCOL_VERSION}"
        )
    try:
        msg_type = MsgType(header.get("type"))
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {header.get('type')!r}") from None
    device = header.get("device")
    if not isinstance(device, str) or not device or len(device) > MAX_DEVICE_ID_LEN or not device.isprintable():
        raise ProtocolError(ErrorCode.BAD_HEADER, "device id must be a printable string of 1-64 characters")
    fields = {k: v for k, v in header.items() if k not in ("v", "type", "device")}
    return Header(msg_type, device, fields)


@dataclass(frozen=True)
class BatchSchema:
    """What a BATCH must look like for one accepted split, derived from its manifest."""

    hidden_size: int
    max_seq_len: int
    max_batch: int
    num_labels: int
    hidden_dtypes: tuple[str, ...] = ("float16", "float32")

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame a valid batch can carry (for ZMQ_MAXMSGSIZE)."""
        return self.max_batch * self.max_seq_len * self.hidden_size * 4


@dataclass
class Batch:
    """One validated batch of activations from a device."""

    device: str
    seq: int
    epoch: int
    hidden: np.ndarray  # [B, T, H] float16 or float32
    attention_mask: np.ndarray  # [B, T] uint8, 1 = real token
    labels: np.ndarray  # [B] int64
    sample_ids: np.ndarray  # [B] int64

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def batch_arrays(hidden: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray):
    """The (name, array) list of a BATCH message in wire order; used by the device to encode."""
    return [
        ("hidden", hidden),
        ("attention_mask", attention_mask.astype(np.uint8, copy=False)),
        ("labels", labels.astype(np.int64, copy=False)),
        ("sample_ids", sample_ids.astype(np.int64, copy=False)),
    ]


def decode_batch(header: Header, frames: Sequence[Any], schema: BatchSchema) -> Batch:
    """Validate a BATCH header and its array frames against ``schema``; only then build arrays.

    Checks, in order: the array list names exactly the four arrays, dtypes are allowed,
    shapes are consistent with each other and within the manifest's limits, every frame's
    byte count matches its declared shape, masks are 0/1, labels are in range.
    """
    seq = header.int_field("seq")
    epoch = header.int_field("epoch", default=0)

    def bad(reason: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_ARRAY, f"BATCH seq {seq}: {reason}", seq=seq)

    specs = header.fields.get("arrays")
    expected = ["hidden", "attention_mask", "labels", "sample_ids"]
    if not isinstance(specs, list) or [s.get("name") if isinstance(s, dict) else None for s in specs] != expected:
        raise bad(f"arrays must be {expected}")
    if len(frames) != len(specs):
        raise bad(f"{len(specs)} arrays declared, {len(frames)} frames received")
    allowed = {
        "hidden": schema.hidden_dtypes,
        "attention_mask": ("uint8",),
        "labels": ("int64",),
        "sample_ids": ("int64",),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, dtype, shape = spec["name"], spec.get("dtype"), spec.get("shape")
        if dtype not in allowed[name]:
            raise bad(f"{name} dtype {dtype!r} not in {allowed[name]}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"{name} shape {shape!r} is not a list of non-negative ints")
        shapes[name] = tuple(shape)
    if len(shapes["hidden"]) != 3:
        raise bad(f"hidden must be [B,T,H], got {list(shapes['hidden'])}")
    b, t, h = shapes["hidden"]
    if h != schema.hidden_size:
        raise bad(f"hidden size {h} != manifest hidden size {schema.hidden_size}")
    if not 1 <= b <= schema.max_batch:
        raise bad(f"batch size {b} outside 1..{schema.max_batch}")
    if not 1 <= t <= schema.max_seq_len:
        raise bad(f"sequence length {t} outside 1..{schema.max_seq_len}")
    if shapes["attention_mask"] != (b, t):
        raise bad(f"attention_mask shape {list(shapes['attention_mask'])} != [{b}, {t}]")
    for name in ("labels", "sample_ids"):
        if shapes[name] != (b,):
            raise bad(f"{name} shape {list(shapes[name])} != [{b}]")

    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames):
        dtype = WIRE_DTYPES[spec["dtype"]]
        buf = memoryview(frame).cast("B") if not isinstance(frame, (bytes, bytearray)) else frame
        want = int(np.prod(spec["shape"], dtype=np.int64)) * dtype.itemsize
        if len(buf) != want:
            raise bad(f"{spec['name']} frame has {len(buf)} bytes, shape needs {want}")
        arrays[spec["name"]] = np.frombuffer(buf, dtype=dtype).reshape(spec["shape"])

    mask = arrays["attention_mask"]
    if mask.max(initial=0) > 1:
        raise bad("attention_mask values must be 0 or 1")
    if not mask.any(axis=1).all():
        raise bad("every sample needs at least one real token")
    labels = arrays["labels"]
    if labels.size and (labels.min() < 0 or labels.max() >= schema.num_labels):
        raise bad(f"labels outside 0..{schema.num_labels - 1}")
    if not np.isfinite(arrays["hidden"]).all():
        raise bad("hidden contains NaN or Inf")
    return Batch(header.device, seq, epoch, arrays["hidden"], mask, labels, arrays["sample_ids"])
