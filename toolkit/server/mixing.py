"""The cross-device mixing buffer: training batches are drawn from samples of every device.

With non-IID devices (in the extreme, one label per device) a batch taken from one device's
stream holds one label and the model chases it; drawing uniformly from a buffer filled by all
devices gives batches with the global label mix. Memory is bounded by ``capacity`` samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from sftool.training.ledger import SampleKey
from sftool.training.task import IGNORE_INDEX

POLICIES = ("mix", "fifo")


@dataclass
class Sample:
    hidden: torch.Tensor  # [T_i, H] float32, trimmed after the last real token
    mask: torch.Tensor  # [T_i] long
    #: A class id, or token labels [T_i] (trimmed like ``hidden``) for a causal-LM task.
    label: int | torch.Tensor
    device: str
    sample_id: int
    epoch: int
    seq: int  # the device batch it came in (acknowledged once all its samples are trained)


@dataclass
class TrainBatch:
    hidden: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B] class ids, or [B, T] token labels
    samples: list[Sample]

    @property
    def keys(self) -> list[SampleKey]:
        """What the ledger records for this batch."""
        return [SampleKey(s.device, s.epoch, s.sample_id, s.seq) for s in self.samples]


def collate(samples: list[Sample]) -> TrainBatch:
    """Right-pad samples to the longest one (padding is masked; causal blocks ignore it)."""
    longest = max(s.hidden.shape[0] for s in samples)
    first = samples[0].hidden
    hidden = torch.zeros(len(samples), longest, first.shape[1], dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(samples), longest, dtype=torch.long, device=first.device)
    for i, s in enumerate(samples):
        hidden[i, : s.hidden.shape[0]] = s.hidden
        mask[i, : s.mask.shape[0]] = s.mask
    if isinstance(samples[0].label, torch.Tensor):  # token labels: padding is never a target
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long, device=first.device)
        for i, s in enumerate(samples):
            labels[i, : s.label.shape[0]] = s.label
    else:
        labels = torch.tensor([s.label for s in samples], dtype=torch.long, device=first.device)
    return TrainBatch(hidden, mask, labels, samples)


class MixingBuffer:
    """Holds up to ``capacity`` samples; ``draw`` returns a training batch once it may.

    ``mix``: wait until the buffer is full (or the stream has ended), then draw uniformly at
    random without replacement. ``fifo``: oldest first, as soon as a batch is available — the
    plain split-learning order, kept for comparison.
    """

    def __init__(self, batch_size: int, capacity: int, policy: str = "mix", seed: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"mixing policy must be one of {POLICIES}")
        self.batch_size = batch_size
        self.capacity = max(capacity, batch_size)
        self.policy = policy
        self.rng = random.Random(seed)
        self._samples: list[Sample] = []

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def has_room(self) -> bool:
        return len(self._samples) < self.capacity

    def add(self, samples: list[Sample]) -> None:
        self._samples.extend(samples)

    def ready(self, stream_ended: bool) -> bool:
        if not self._samples:
            return False
        if stream_ended:
            return True
        if self.policy == "fifo":
            return len(self._samples) >= self.batch_size
        return len(self._samples) >= self.capacity

    def draw(self) -> TrainBatch:
        n = min(self.batch_size, len(self._samples))
        if self.policy == "fifo":
            chosen, self._samples = self._samples[:n], self._samples[n:]
        else:
            picks = set(self.rng.sample(range(len(self._samples)), n))
            chosen = [s for i, s in enumerate(self._samples) if i in picks]
            self._samples = [s for i, s in enumerate(self._samples) if i not in picks]
        return collate(chosen)

    def device_mix(self) -> dict[str, int]:
        """How many buffered samples each device has (for the progress line)."""
        counts: dict[str, int] = {}
        for s in self._samples:
            counts[s.device] = counts.get(s.device, 0) + 1
        return counts
