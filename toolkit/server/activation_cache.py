"""Disk-backed, bounded store of received activations, so later epochs need no device compute.

The device layers are frozen, so a sample's activation is the same in every epoch. With
``sftool serve --cache-activations`` the server keeps each sample's activation (at the block the
server trains from, fp16, trimmed to its real tokens) in one append-only file per device, and
a sample whose values exceed fp16's range in fp32 in a second one (the device sent it as fp32 for
that reason; storing it as fp16 would replay it as Inf), and
tells devices in WELCOME to skip the epochs it can replay. The index is small and lives in
memory; it is saved with each checkpoint so a resumed run still has it.
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from sftool.runtime.files import atomic_write_text
from sftool.runtime.protocol import FP16_MAX

INDEX = "index.json"


#: Stored dtypes by item size, and the file suffix of each.
STORED = {2: (np.float16, ".f16"), 4: (np.float32, ".f32")}


@dataclass(frozen=True)
class Entry:
    offset: int  # in elements of the stored dtype
    length: int  # tokens
    label: int | tuple[int, ...]  # a class id, or the sample's token labels
    itemsize: int = 2  # 2: fp16, 4: fp32 (values beyond fp16's range)


class ActivationCache:
    """fp16 activations by (device, sample id), bounded by ``max_bytes`` on disk."""

    def __init__(self, folder: Path, hidden_size: int, max_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hidden_size = hidden_size
        self.max_bytes = max_bytes
        self.reserved = 0
        self.used = 0
        self.hits = 0
        self._index: dict[str, dict[int, Entry]] = {}
        self._files: dict[tuple[str, int], object] = {}
        self._lock = threading.Lock()

    # -- admission (receiver thread, at HELLO) --------------------------------------------------
    def reserve(self, samples: int, max_len: int) -> bool:
        """Reserve room for ``samples`` activations of at most ``max_len`` tokens; False if full."""
        need = samples * max_len * self.hidden_size * 2
        with self._lock:
            if self.reserved + need > self.max_bytes:
                return False
            self.reserved += need
            return True

    # -- writing and reading (trainer thread) --------------------------------------------------
    def _path(self, device: str, itemsize: int) -> Path:
        return self.folder / f"{_safe(device)}{STORED[itemsize][1]}"

    def _file(self, device: str, itemsize: int):
        fh = self._files.get((device, itemsize))
        if fh is None:
            fh = open(self._path(device, itemsize), "ab")
            self._files[(device, itemsize)] = fh
        return fh

    def put(self, device: str, sample_id: int, label: int | Sequence[int], hidden: np.ndarray) -> None:
        """Store one sample's activation [T, H]: fp16, or fp32 if a value is beyond fp16's range."""
        if sample_id in self._index.get(device, {}):
            return
        fits = hidden.dtype == np.float16 or float(np.abs(hidden).max(initial=0.0)) < FP16_MAX
        itemsize = 2 if fits else 4
        data = np.ascontiguousarray(hidden, dtype=STORED[itemsize][0])
        fh = self._file(device, itemsize)
        offset = fh.tell() // itemsize
        fh.write(data.tobytes())
        self.used += data.nbytes
        self._index.setdefault(device, {})[sample_id] = Entry(offset, int(data.shape[0]), _label(label), itemsize)

    def get(self, device: str, sample_id: int) -> tuple[np.ndarray, int | tuple[int, ...]]:
        """(activation [T, H] as stored, fp16 or fp32; label: a class id or token labels) of a cached sample."""
        entry = self._index[device][sample_id]
        fh = self._files.get((device, entry.itemsize))
        if fh is not None:
            fh.flush()
        count = entry.length * self.hidden_size
        dtype = STORED[entry.itemsize][0]
        data = np.fromfile(self._path(device, entry.itemsize), dtype=dtype, count=count, offset=entry.offset * entry.itemsize)
        self.hits += 1
        return data.reshape(entry.length, self.hidden_size), entry.label

    def __contains__(self, key: tuple[str, int]) -> bool:
        device, sample_id = key
        return sample_id in self._index.get(device, {})

    def replay_order(self, devices: list[str], rng: random.Random) -> Iterator[tuple[str, int]]:
        """Every cached sample of ``devices`` once, shuffled across devices (so replays stay mixed)."""
        keys = [(d, sid) for d in sorted(devices) for sid in sorted(self._index.get(d, {}))]
        rng.shuffle(keys)
        return iter(keys)

    # -- persistence -------------------------------------------------------------------------
    def save_index(self) -> None:
        for fh in self._files.values():
            fh.flush()
            os.fsync(fh.fileno())
        data = {d: {str(k): [e.offset, e.length, e.label, e.itemsize] for k, e in entries.items()}
                for d, entries in self._index.items()}
        atomic_write_text(self.folder / INDEX, json.dumps(data))

    def load_index(self) -> None:
        path = self.folder / INDEX
        if not path.is_file():
            return
        data = json.loads(path.read_text())
        self._index = {d: {int(k): Entry(v[0], v[1], _label(v[2]), v[3]) for k, v in entries.items()}
                       for d, entries in data.items()}
        self.used = sum(e.length * e.itemsize for entries in self._index.values() for e in entries.values()) * self.hidden_size
        self.reserved = max(self.reserved, self.used)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def _label(value) -> int | tuple[int, ...]:
    """A class id as an int, token labels as a tuple (JSON hands them back as a list)."""
    return int(value) if np.ndim(value) == 0 else tuple(int(v) for v in value)


def _safe(device: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
