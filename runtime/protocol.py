"""Wire protocol v1 between a device (ZeroMQ DEALER) and the training server (ROUTER).

This module is the one implementation of the protocol; both sides import it, and
``docs/protocol.md`` is its normative description (a test checks that both list the same
messages and fields).

A message is a list of frames: frame 0 is a msgpack header, the following frames are raw
little-endian array buffers (sent zero-copy), described by ``header["arrays"]``. Nothing is
ever pickled: a header is plain msgpack of str/int/float/bool/list/dict, and an array is rebuilt
over its frame's buffer (no copy) only after its dtype, shape and byte count have been checked.

Every message type has a typed class (``Hello``, ``Welcome``, ``BatchHeader``, ``Ack``,
``Heartbeat``, ``Bye``, ``Error``) whose fields carry their wire type and constraints;
``parse_message`` validates a header against them before anything reads it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import msgpack
import numpy as np
from sftool.runtime.activation_noise import DEFENSE_PATTERN

PROTOCOL_VERSION = 1

#: Longest device id accepted; ids name log lines and files, so keep them short and printable.
MAX_DEVICE_ID_LEN = 64
#: A header is small; anything bigger is an attack or a bug.
MAX_HEADER_BYTES = 16 * 1024
#: A server's WELCOME lists trained seqs after a restart and may be larger; devices accept up to this.
MAX_SERVER_HEADER_BYTES = 1 << 20
#: Sequence numbers, epochs and announced counts fit a signed 32-bit int: every language has one,
#: and nothing a device does legitimately comes near it.
MAX_INT = 2**31 - 1
#: Most epochs a device may announce.
MAX_EPOCHS = 1000
#: Largest credit window a server may grant.
MAX_WINDOW = 1024
#: Wire names of the activation dtypes a device may announce in HELLO.
WIRE_NAMES = ("fp16", "fp32")


class MsgType(str, enum.Enum):
    HELLO = "HELLO"
    WELCOME = "WELCOME"
    BATCH = "BATCH"
    ACK = "ACK"
    HEARTBEAT = "HEARTBEAT"
    BYE = "BYE"
    ERROR = "ERROR"


class ErrorCode(enum.IntEnum):
    """Why the server refused a message. docs/protocol.md says what a client does on each."""

    BAD_HEADER = 1
    BAD_ARRAY = 2
    UNKNOWN_TYPE = 3
    VERSION_MISMATCH = 4
    MANIFEST_MISMATCH = 5
    NOT_WELCOMED = 6
    REFUSED = 7
    INTERNAL = 8
    NOT_AUTHORIZED = 9
    WINDOW_EXCEEDED = 10
    LIMIT_EXCEEDED = 11
    BAD_VALUES = 12


class ProtocolError(ValueError):
    """A message that does not follow the protocol. ``code`` says which rule it broke."""

    def __init__(self, code: ErrorCode, reason: str, seq: int | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.seq = seq


#: The token label that means "not a target" (prompt and padding positions of a causal-LM batch).
IGNORE_INDEX = -100
#: What a device's labels are (HELLO ``labels``): one class id per sample ([B]), or one token label
#: per position ([B, T], IGNORE_INDEX where a position is no target).
LABEL_KINDS = ("class", "token")

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
    """A header whose envelope (``v``, ``type``, ``device``) is checked; ``fields`` is the rest, unchecked
    until ``parse_message`` validates it against the message's class."""

    type: MsgType
    device: str
    fields: dict[str, Any]


def decode_header(frame: bytes | memoryview, max_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Parse and check frame 0's envelope. Raises ProtocolError on anything unexpected."""
    raw = bytes(frame)
    if len(raw) > max_bytes:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header of {len(raw)} bytes exceeds {max_bytes}")
    try:
        # strict_map_key and raw=False: only str keys, no extension types, nothing executable.
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types; all mean "not a header"
        raise ProtocolError(ErrorCode.BAD_HEADER, f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, "header must be a map")
    if _EMPTY_BIN_OR_EXT.search(raw) is not None and not _plain(header):
        raise ProtocolError(ErrorCode.BAD_HEADER, "header holds a bin or extension value")
    if type(header.get("v")) is not int or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH, f"protocol version {_short(header.get('v'))} != {PROTOCOL_VERSION}"
        )
    type_name = header.get("type")
    msg_type = _MSG_TYPES.get(type_name) if isinstance(type_name, str) else None
    if msg_type is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {_short(type_name)}")
    device = header.get("device")
    if not isinstance(device, str) or not device or len(device) > MAX_DEVICE_ID_LEN or not device.isprintable():
        raise ProtocolError(ErrorCode.BAD_HEADER, "device id must be a printable string of 1-64 characters")
    # The decoded map is ours alone: what is left once the envelope is taken out is the fields.
    del header["v"], header["type"], header["device"]
    return Header(msg_type, device, header)


#: The encodings of an empty bin (c4-c6) and an empty ext (c7-c9), the only ones that max_bin_len=0
#: and max_ext_len=0 let through. A header whose bytes hold none of these cannot hold such a value,
#: so the walk over every value (several times the cost of this search) is needed only when one is
#: found, which a length or an int can also produce.
_EMPTY_BIN_OR_EXT = re.compile(rb"\xc4\x00|\xc5\x00\x00|\xc6\x00{4}|\xc7\x00|\xc8\x00\x00|\xc9\x00{4}")


def _plain(value: Any) -> bool:
    """Only maps, lists, str, int, float, bool and nil: msgpack's max_bin_len=0 and max_ext_len=0
    still let an empty bin or ext through. Walked without recursion (nesting depth is msgpack's)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif not (item is None or isinstance(item, (str, int, float))):
            return False
    return True


def _short(value: Any, limit: int = 80) -> str:
    """A value for an error reason: its repr, cut to ``limit`` characters (reasons have a bounded length)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Wire name -> message type; a dict lookup instead of the enum's constructor (which raises on a miss).
_MSG_TYPES: dict[str, MsgType] = {t.value: t for t in MsgType}


# -- typed messages ---------------------------------------------------------------------------

_REQUIRED = object()


def wire(kind: str, default: Any = _REQUIRED, *, lo: int | None = None, hi: int | None = None,
         max_len: int | None = None, choices: Sequence[str] | None = None, doc: str = "") -> Any:
    """Declare a message field: its wire type (``int``, ``str``, ``list[int]``, ``list[range]``, ``list[array]``)
    and constraints. The metadata is what ``parse_message`` checks and what docs/protocol.md lists."""
    meta = {"kind": kind, "lo": lo, "hi": hi, "max_len": max_len, "choices": tuple(choices) if choices else None,
            "doc": doc, "required": default is _REQUIRED}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(msg: str, name: str, meta: dict, value: Any) -> Any:
    def bad(rule: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_HEADER, f"{msg}: field {name!r} {rule}")

    kind = meta["kind"]
    if kind == "int":
        if not _is_int(value):
            raise bad("must be an int")
        if (meta["lo"] is not None and value < meta["lo"]) or (meta["hi"] is not None and value > meta["hi"]):
            raise bad(f"must be in {meta['lo']}..{meta['hi']}")
    elif kind == "str":
        if not isinstance(value, str) or len(value) > (meta["max_len"] or 256) or not value.isprintable():
            raise bad(f"must be a printable string of at most {meta['max_len'] or 256} characters")
        if meta["choices"] and value not in meta["choices"]:
            raise bad(f"must be one of {list(meta['choices'])}")
    elif kind in ("list[int]", "list[range]"):
        if not isinstance(value, list) or len(value) > (meta["max_len"] or MAX_INT):
            raise bad(f"must be a list of at most {meta['max_len']} items")
        hi = meta["hi"] if meta["hi"] is not None else MAX_INT
        for item in value:
            pair = item if kind == "list[range]" else [item]
            if kind == "list[range]" and (not isinstance(item, list) or len(item) != 2):
                raise bad("items must be [start, end) pairs")
            if not all(_is_int(v) and 0 <= v <= hi + (kind == "list[range]") for v in pair):
                raise bad(f"items must be ints in 0..{hi}")
            if kind == "list[range]" and pair[0] >= pair[1]:
                raise bad("ranges must have start < end")
    elif kind == "list[array]":
        if not isinstance(value, list) or len(value) > (meta["max_len"] or 8):
            raise bad("must be a list of array specs")
    return value


class Message:
    """A typed message: subclasses are dataclasses whose fields are declared with ``wire``."""

    TYPE: ClassVar[MsgType]

    def header_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "device"}

    def frames(self, arrays: Sequence[tuple[str, np.ndarray]] = ()) -> list[Any]:
        """This message's frames, ready for ``send_multipart``."""
        return encode(self.TYPE, self.device, arrays, **self.header_fields())  # type: ignore[attr-defined]

    @classmethod
    def wire_fields(cls) -> list[dataclasses.Field]:
        """The fields that travel in the header (``device`` is the envelope's)."""
        return [f for f in dataclasses.fields(cls) if f.name != "device"]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Hello(Message):
    """device -> server: the first message of a session, and of every reconnect."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    device: str
    manifest_sha256: str = wire("str", max_len=64, doc="sha256 (lowercase hex) of the export's manifest.json")
    split: int = wire("int", lo=1, hi=4096, doc="the export's split layer k; must equal the manifest's")
    precision: str = wire("str", max_len=32, doc="the device model's variant label, e.g. `fp32/any`, `int8/arm64`")
    wire_dtype: str = wire("str", choices=WIRE_NAMES, doc="activation dtype the device sends; `fp16` devices may fall back to float32 per batch")
    num_samples: int = wire("int", -1, lo=-1, hi=MAX_INT, doc="samples the device will send over all epochs; -1 if unknown")
    epochs: int = wire("int", 1, lo=1, hi=MAX_EPOCHS, doc="passes over the local data")
    labels: str = wire("str", "class", choices=LABEL_KINDS, doc="`class`: one class id per sample; `token`: one token label per position (causal LM)")
    defense: str = wire("str", "none", max_len=64, doc="noise the device adds to its activations: `none`, `gauss:ratio=R` or `gauss:clip=C,sigma=S`")


@dataclass(frozen=True)
class Welcome(Message):
    """server -> device: the session is open."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    device: str
    window: int = wire("int", lo=1, hi=MAX_WINDOW, doc="most unacknowledged batches the device may have in flight")
    session: str = wire("str", max_len=64, doc="server process id; a new value means the server restarted")
    skip_epochs: list[int] = wire("list[int]", [], max_len=MAX_EPOCHS, hi=MAX_EPOCHS - 1, doc="epochs the server no longer needs")
    done_seqs: list[list[int]] = wire("list[range]", [], max_len=65536, doc="half-open [start, end) ranges of seqs the server has trained")


@dataclass(frozen=True)
class BatchHeader(Message):
    """device -> server: one batch of activations; the arrays follow the header as frames."""

    TYPE: ClassVar[MsgType] = MsgType.BATCH
    device: str
    seq: int = wire("int", lo=0, hi=MAX_INT, doc="the batch's number in the device's deterministic plan")
    arrays: list[dict] = wire("list[array]", max_len=8, doc="`{name, dtype, shape}` of each array frame, in frame order")
    epoch: int = wire("int", 0, lo=0, hi=MAX_EPOCHS - 1, doc="the epoch the batch belongs to")


@dataclass(frozen=True)
class Ack(Message):
    """server -> device: the batch ``seq`` is accepted; frees one slot of the window."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    device: str
    seq: int = wire("int", lo=0, hi=MAX_INT, doc="the acknowledged batch")


@dataclass(frozen=True)
class Heartbeat(Message):
    """either way: liveness; the server answers a device's heartbeat with its own."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    device: str


@dataclass(frozen=True)
class Bye(Message):
    """device -> server when done (totals); server -> device when training is over (reason)."""

    TYPE: ClassVar[MsgType] = MsgType.BYE
    device: str
    batches: int = wire("int", 0, lo=0, hi=MAX_INT, doc="device -> server: batches acknowledged")
    samples: int = wire("int", 0, lo=0, hi=MAX_INT, doc="device -> server: samples acknowledged")
    reason: str = wire("str", "", max_len=256, doc="server -> device: why the session ends")


@dataclass(frozen=True)
class Error(Message):
    """server -> device: a message was refused and changed nothing."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    device: str
    code: int = wire("int", lo=1, hi=255, doc="an error code (table below)")
    reason: str = wire("str", max_len=1024, doc="human-readable explanation")
    seq: int = wire("int", -1, lo=-1, hi=MAX_INT, doc="the refused batch's seq; -1 if the message was not a batch")


MESSAGE_CLASSES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, BatchHeader, Ack, Heartbeat, Bye, Error)
}

#: Each class's (name, metadata) of its header fields, listed once: ``dataclasses.fields`` on every
#: message would cost more than checking the fields themselves.
_WIRE_FIELDS: dict[type[Message], tuple[tuple[str, dict], ...]] = {
    cls: tuple((f.name, dict(f.metadata)) for f in cls.wire_fields()) for cls in MESSAGE_CLASSES.values()
}


def parse_message(header: Header) -> Message:
    """Validate ``header.fields`` against its message class and return the typed message.

    Unknown fields are ignored (a newer peer of the same version may add optional ones); a missing
    required field, a wrong type or a value out of range raises ProtocolError (BAD_HEADER).
    """
    cls = MESSAGE_CLASSES[header.type]
    values: dict[str, Any] = {"device": header.device}
    given, msg_name = header.fields, cls.TYPE.value
    for name, meta in _WIRE_FIELDS[cls]:
        if name in given:
            values[name] = _check(msg_name, name, meta, given[name])
        elif meta["required"]:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{msg_name}: field {name!r} is missing")
    if isinstance(values.get("manifest_sha256"), str) and not _is_hex64(values["manifest_sha256"]):
        raise ProtocolError(ErrorCode.BAD_HEADER, "HELLO: field 'manifest_sha256' must be 64 lowercase hex digits")
    if isinstance(values.get("defense"), str) and DEFENSE_PATTERN.fullmatch(values["defense"]) is None:
        raise ProtocolError(ErrorCode.BAD_HEADER, "HELLO: field 'defense' must be none, gauss:ratio=R or gauss:clip=C,sigma=S")
    return cls(**values)


def _is_hex64(text: str) -> bool:
    return len(text) == 64 and all(c in string.hexdigits.lower()[:16] for c in text)


# -- batches ----------------------------------------------------------------------------------

#: A batch's arrays, by name: allowed wire dtypes and rank. Frames follow ``arrays`` order, which a
#: receiver matches by name, never by position.
BATCH_ARRAYS: dict[str, tuple[tuple[str, ...], int | tuple[int, ...]]] = {
    "hidden": (("float16", "float32"), 3),
    "attention_mask": (("uint8",), 2),
    "labels": (("int64",), (1, 2)),
    "sample_ids": (("int64",), 1),
}

#: The bound on |activation| when an export records no calibration statistics.
DEFAULT_ACTIVATION_BOUND = 1.0e5
#: The server's bound on received activations is the export's calibrated |max| times this.
ACTIVATION_MARGIN = 8.0


@dataclass(frozen=True)
class BatchSchema:
    """What a BATCH must look like for one accepted split, derived from its manifest."""

    hidden_size: int
    max_seq_len: int
    max_batch: int
    #: Valid label values 0..num_labels-1: the classes, or the vocabulary for token labels.
    num_labels: int
    #: Labels are [B, T] token labels (IGNORE_INDEX allowed) instead of [B] class ids.
    token_labels: bool = False
    hidden_dtypes: tuple[str, ...] = ("float16", "float32")
    #: Largest |activation| accepted: beyond it a value is an attack or a broken device, and would make
    #: the loss, and every later step, non-finite.
    max_abs_activation: float = DEFAULT_ACTIVATION_BOUND

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame a valid batch can carry (for ZMQ_MAXMSGSIZE)."""
        return self.max_batch * self.max_seq_len * self.hidden_size * 4

    @property
    def max_message_bytes(self) -> int:
        """The most bytes a valid BATCH can carry over all its frames (header included)."""
        b, t = self.max_batch, self.max_seq_len
        label_bytes = 8 * b * (t if self.token_labels else 1)
        return self.max_frame_bytes + b * t + label_bytes + 8 * b + MAX_HEADER_BYTES

    def for_wire(self, wire_dtype: str) -> BatchSchema:
        """The schema for a device that announced ``wire_dtype``: an fp32 device never sends float16."""
        allowed = ("float32",) if wire_dtype == "fp32" else self.hidden_dtypes
        return dataclasses.replace(self, hidden_dtypes=allowed)


#: Frames of a valid BATCH: header + one per array.
MAX_BATCH_FRAMES = 1 + len(BATCH_ARRAYS)


@dataclass
class Batch:
    """One validated batch of activations from a device."""

    device: str
    seq: int
    epoch: int
    hidden: np.ndarray  # [B, T, H] float16 or float32
    attention_mask: np.ndarray  # [B, T] uint8, 1 = real token
    labels: np.ndarray  # [B] int64 class ids, or [B, T] token labels
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


def _array_specs(specs: Any, bad) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, frame index); every array present once, nothing else."""
    if not isinstance(specs, list) or len(specs) != len(BATCH_ARRAYS):
        raise bad(f"arrays must list exactly {sorted(BATCH_ARRAYS)}")
    out: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise bad("each array spec must be a map of name, dtype, shape")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or name not in BATCH_ARRAYS or name in out:
            raise bad(f"arrays must list exactly {sorted(BATCH_ARRAYS)}, each once (got {_short(name)})")
        dtypes, rank = BATCH_ARRAYS[name]
        if dtype not in dtypes:
            raise bad(f"{name} dtype {_short(dtype)} not in {dtypes}")
        ranks = rank if isinstance(rank, tuple) else (rank,)
        if not isinstance(shape, list) or len(shape) not in ranks or not all(_is_int(d) and 0 <= d <= MAX_INT for d in shape):
            raise bad(f"{name} shape {_short(shape)} must be {' or '.join(map(str, ranks))} non-negative ints")
        out[name] = (dtype, tuple(shape), index)
    return out


def decode_batch(header: Header, frames: Sequence[Any], schema: BatchSchema) -> Batch:
    """Validate a BATCH header and its array frames against ``schema``; only then build arrays.

    Checks, in order: the header's fields, the array list names each of the four arrays once,
    dtypes are allowed, shapes agree with each other and with the manifest's limits, every frame's
    byte count matches its declared shape, masks are 0/1 with a real token per row, labels are in
    range (token labels: or IGNORE_INDEX, which every padding position must be), sample ids are distinct, and every activation is finite and within the schema's bound.
    """
    msg = parse_message(header)
    assert isinstance(msg, BatchHeader)
    seq = msg.seq

    def bad(reason: str, code: ErrorCode = ErrorCode.BAD_ARRAY) -> ProtocolError:
        return ProtocolError(code, f"BATCH seq {seq}: {reason}", seq=seq)

    specs = _array_specs(msg.arrays, bad)
    if len(frames) != len(specs):
        raise bad(f"{len(specs)} arrays declared, {len(frames)} frames received")
    if specs["hidden"][0] not in schema.hidden_dtypes:
        raise bad(f"hidden dtype {specs['hidden'][0]!r} not allowed for this device (allowed: {list(schema.hidden_dtypes)})")
    b, t, h = specs["hidden"][1]
    if h != schema.hidden_size:
        raise bad(f"hidden size {h} != manifest hidden size {schema.hidden_size}")
    if not 1 <= b <= schema.max_batch:
        raise bad(f"batch size {b} outside 1..{schema.max_batch}")
    if not 1 <= t <= schema.max_seq_len:
        raise bad(f"sequence length {t} outside 1..{schema.max_seq_len}")
    if specs["attention_mask"][1] != (b, t):
        raise bad(f"attention_mask shape {list(specs['attention_mask'][1])} != [{b}, {t}]")
    if specs["sample_ids"][1] != (b,):
        raise bad(f"sample_ids shape {list(specs['sample_ids'][1])} != [{b}]")
    want_labels = (b, t) if schema.token_labels else (b,)
    if specs["labels"][1] != want_labels:
        kind = "token labels" if schema.token_labels else "class labels"
        raise bad(f"labels shape {list(specs['labels'][1])} != {list(want_labels)} (this session sends {kind})")

    arrays: dict[str, np.ndarray] = {}
    for name, (dtype_name, shape, index) in specs.items():
        dtype = WIRE_DTYPES[dtype_name]
        frame = frames[index]
        buf = frame if isinstance(frame, (bytes, bytearray)) else memoryview(frame).cast("B")
        # Python ints: exact for any shape (the dims are bounded above), and np.prod costs ~4 us a call.
        want = math.prod(shape) * dtype.itemsize
        if len(buf) != want:
            raise bad(f"{name} frame has {len(buf)} bytes, shape needs {want}")
        # One call for frombuffer(...).reshape(...): the same array over the same buffer, a third of the cost.
        arrays[name] = np.ndarray(shape, dtype=dtype, buffer=buf)

    mask = arrays["attention_mask"]
    _check_mask(mask, bad)
    labels = arrays["labels"]
    if schema.token_labels:
        if np.any(labels[mask == 0] != IGNORE_INDEX):
            raise bad(f"token labels at padding positions must be {IGNORE_INDEX}")
        labels = labels[labels != IGNORE_INDEX]
    # As unsigned, a negative label is above every valid one: one scan checks both ends.
    if labels.size and int(labels.view(np.uint64).max()) >= schema.num_labels:
        allowed = f" or {IGNORE_INDEX}" if schema.token_labels else ""
        raise bad(f"labels outside 0..{schema.num_labels - 1}{allowed}")
    if not _distinct(arrays["sample_ids"]):
        raise bad("sample_ids must be distinct within a batch")
    hidden = arrays["hidden"]
    if not within_bound(hidden, schema.max_abs_activation):
        if not np.isfinite(hidden).all():
            raise bad("hidden contains NaN or Inf", ErrorCode.BAD_VALUES)
        lo, hi = float(hidden.min()), float(hidden.max())
        raise bad(f"hidden values in [{lo:.4g}, {hi:.4g}] exceed the bound {schema.max_abs_activation:.4g}",
                  ErrorCode.BAD_VALUES)
    return Batch(header.device, seq, msg.epoch, hidden, mask, arrays["labels"], arrays["sample_ids"])


def _check_mask(mask: np.ndarray, bad) -> None:
    """Every value 0 or 1 and a real token in every row, i.e. every row's maximum is exactly 1: one
    reduction for both rules; the rule broken is told apart only when one is."""
    row_max = mask.max(axis=1)
    if row_max.tobytes() == b"\x01" * row_max.size:
        return
    if row_max.max() > 1:
        raise bad("attention_mask values must be 0 or 1")
    raise bad("every sample needs at least one real token")


#: Up to this many ids, a set of Python ints tells distinctness several times faster than np.unique.
_SMALL_BATCH = 1024


def _distinct(ids: np.ndarray) -> bool:
    """Are the values of a 1-D int array all different?"""
    if ids.size <= _SMALL_BATCH:
        return len(set(ids.tolist())) == ids.size
    return np.unique(ids).size == ids.size


#: Unsigned and signed integer views of each float dtype, and its sign bit.
_BITS = {np.dtype("<f2"): (np.uint16, np.int16, 0x8000), np.dtype("<f4"): (np.uint32, np.int32, 0x80000000)}


def within_bound(values: np.ndarray, bound: float) -> bool:
    """Is every value finite with |value| <= bound? Decided on the bit patterns, in two integer max
    scans without a temporary array: IEEE floats of one sign order like their patterns, NaN and
    Inf sort above every finite pattern, and numpy's float16 min/max are ~30x slower than this."""
    if not bound >= 0:  # NaN or negative: nothing is within it
        return False
    unsigned, signed, sign = _BITS[values.dtype]
    limit = _largest_pattern_within(values.dtype, float(bound))
    if values.size == 0:
        return True
    # Positive values are the non-negative signed patterns; negative ones have the sign bit set,
    # so the unsigned maximum bounds their magnitude.
    as_signed, as_unsigned = values.view(signed), values.view(unsigned)
    if values.nbytes <= _SCAN_CHUNK_BYTES or not values.flags.c_contiguous:
        return int(as_signed.max()) <= limit and int(as_unsigned.max()) <= (sign | limit)
    # Chunk by chunk, so the second scan reads from cache what the first just read from memory.
    as_signed, as_unsigned = as_signed.reshape(-1), as_unsigned.reshape(-1)
    step = _SCAN_CHUNK_BYTES // values.itemsize
    for start in range(0, values.size, step):
        end = start + step
        if int(as_signed[start:end].max()) > limit or int(as_unsigned[start:end].max()) > (sign | limit):
            return False
    return True


#: Arrays larger than this are bound-checked in chunks of this size (it fits a core's L2 cache).
_SCAN_CHUNK_BYTES = 512 * 1024


@functools.lru_cache(maxsize=64)
def _largest_pattern_within(dtype: np.dtype, bound: float) -> int:
    """The bit pattern of the largest finite value of ``dtype`` that is <= bound."""
    unsigned = _BITS[dtype][0]
    finfo = np.finfo(dtype)
    value = np.array(min(bound, float(finfo.max)), dtype=dtype)
    pattern = int(value.view(unsigned))
    if float(value) > bound:  # rounding went up: take the next pattern down
        pattern -= 1
    return max(pattern, 0)
