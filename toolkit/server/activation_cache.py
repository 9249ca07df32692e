"""Disk-backed, bounded store of received activations, so later epochs need no device compute.

The device layers are frozen, so a sample's activation is the same in every epoch. With
``sftool serve --cache-activations`` the server keeps each sample's activation (at the block the
server trains from, fp16, trimmed to its real tokens) in one append-only file per device, and
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
from typing import Iterator

import numpy as np
from sftool.runtime.files import atomic_write_text

INDEX = "index.json"


@dataclass(frozen=True)
class Entry:
    offset: int  # in elements of fp16
    length: int  # tokens
    label: int


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
        self._files: dict[str, object] = {}
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
    def _file(self, device: str):
        fh = self._files.get(device)
        if fh is None:
            fh = open(self.folder / f"{_safe(device)}.f16", "ab")
            self._files[device] = fh
        return fh

    def put(self, device: str, sample_id: int, label: int, hidden: np.ndarray) -> None:
        """Store one sample's activation [T, H] (stored as fp16)."""
        if sample_id in self._index.get(device, {}):
            return
        data = np.ascontiguousarray(hidden, dtype=np.float16)
        fh = self._file(device)
        offset = fh.tell() // 2
        fh.write(data.tobytes())
        self.used += data.nbytes
        self._index.setdefault(device, {})[sample_id] = Entry(offset, int(data.shape[0]), int(label))

    def get(self, device: str, sample_id: int) -> tuple[np.ndarray, int]:
        """(activation [T, H] fp16, label) of a cached sample."""
        entry = self._index[device][sample_id]
        fh = self._files.get(device)
        if fh is not None:
            fh.flush()
        count = entry.length * self.hidden_size
        data = np.fromfile(self.folder / f"{_safe(device)}.f16", dtype=np.float16, count=count, offset=entry.offset * 2)
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
        data = {d: {str(k): [e.offset, e.length, e.label] for k, e in entries.items()} for d, entries in self._index.items()}
        atomic_write_text(self.folder / INDEX, json.dumps(data))

    def load_index(self) -> None:
        path = self.folder / INDEX
        if not path.is_file():
            return
        data = json.loads(path.read_text())
        self._index = {d: {int(k): Entry(*v) for k, v in entries.items()} for d, entries in data.items()}
        self.used = sum(e.length for entries in self._index.values() for e in entries.values()) * self.hidden_size * 2
        self.reserved = max(self.reserved, self.used)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


def _safe(device: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
