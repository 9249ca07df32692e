"""The exactly-once record of a run: which samples are trained, which device batches are settled.

A sample is named by (device, epoch, sample id); a device batch by (device, seq). After a
restart, devices resend whatever is not in ``done_seqs`` and the loop skips every sample the
ledger already holds, so each sample of each epoch is trained exactly once. The ledger is saved
with every checkpoint (``TrainingProgress.trained`` / ``done_seqs``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from sftool.runtime.device_client import ranges_to_set, set_to_ranges


@dataclass(frozen=True)
class SampleKey:
    """A trained sample, and the device batch it came in (seq -1: not from a device batch)."""

    device: str
    epoch: int
    sample_id: int
    seq: int = -1


class Ledger:
    """Trained samples per device and epoch, and the seqs whose every sample is trained.

    The receiver thread reads ``done_seqs`` (for WELCOME) while the training thread writes; one
    lock guards both. ``on_settled(device, seq)`` fires once a device batch is fully trained.
    """

    def __init__(self, on_settled: Callable[[str, int], None] | None = None):
        self._trained: dict[str, dict[int, set[int]]] = {}
        self._done: dict[str, set[int]] = {}
        self._remaining: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self.on_settled = on_settled

    # -- what is trained ------------------------------------------------------------------------
    def is_trained(self, device: str, epoch: int, sample_id: int) -> bool:
        return sample_id in self._trained.get(device, {}).get(epoch, ())

    def untrained(self, device: str, epoch: int, sample_ids: Iterable[int]) -> list[int]:
        """Positions in ``sample_ids`` not trained yet (what a resent batch still contributes)."""
        done = self._trained.get(device, {}).get(epoch, set())
        return [i for i, s in enumerate(sample_ids) if int(s) not in done]

    def settled_samples(self, device: str) -> int:
        """Samples of ``device`` settled so far, over all epochs (refused ones included)."""
        with self._lock:
            return sum(len(ids) for ids in self._trained.get(device, {}).values())

    def done_seqs(self, device: str) -> list[list[int]]:
        """Seqs of ``device`` already trained, as [start, end) ranges: what it need not send again."""
        with self._lock:
            return set_to_ranges(self._done.get(device, set()))

    def pending_from(self, device: str) -> bool:
        """Does a batch of ``device`` still wait for some of its samples to be trained?"""
        return any(d == device for d, _ in self._remaining)

    # -- recording -------------------------------------------------------------------------------
    def expect(self, device: str, seq: int, samples: int) -> None:
        """A device batch entered training with ``samples`` samples still to train."""
        self._remaining[(device, seq)] = samples
        if samples == 0:  # everything in it was trained before a restart
            self._settle_seq(device, seq)

    def settle(self, keys: Iterable[SampleKey]) -> None:
        """Record trained samples; a device batch is settled once all its samples are trained."""
        keys = list(keys)
        with self._lock:
            for k in keys:
                self._trained.setdefault(k.device, {}).setdefault(k.epoch, set()).add(k.sample_id)
        for k in keys:
            if k.seq < 0 or (k.device, k.seq) not in self._remaining:
                continue  # not from a tracked device batch (a cache replay, an in-process shard)
            self._remaining[(k.device, k.seq)] -= 1
            if self._remaining[(k.device, k.seq)] == 0:
                self._settle_seq(k.device, k.seq)

    def _settle_seq(self, device: str, seq: int) -> None:
        del self._remaining[(device, seq)]
        with self._lock:
            self._done.setdefault(device, set()).add(seq)
        if self.on_settled is not None:
            self.on_settled(device, seq)

    # -- checkpoint state ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, dict[str, list[int]]], dict[str, list[list[int]]]]:
        """(trained: device -> epoch -> sorted ids, done_seqs: device -> ranges), JSON-ready."""
        with self._lock:
            trained = {d: {str(e): sorted(ids) for e, ids in epochs.items()} for d, epochs in self._trained.items()}
            done = {d: set_to_ranges(seqs) for d, seqs in self._done.items()}
        return trained, done

    def load(self, trained: dict[str, dict[str, list[int]]], done_seqs: dict[str, list[list[int]]]) -> None:
        with self._lock:
            self._trained = {d: {int(e): set(ids) for e, ids in epochs.items()} for d, epochs in trained.items()}
            self._done = {d: ranges_to_set(r) for d, r in done_seqs.items()}
