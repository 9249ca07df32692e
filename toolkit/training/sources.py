"""Batch sources: where the training loop's batches come from.

SplitFrozen trains on activations. They reach the trainer through an *inbox* — the streaming
receiver (:class:`ReceiverInbox`), or devices simulated in this process, each running the exported
ONNX over its shard (:class:`SimulatedInbox`) — and :class:`MixedActivations` turns them into
training batches: it skips what the ledger already holds, catches up devices with an earlier
split, fills the cross-device mixing buffer, keeps the activation cache and replays it. Both
inboxes deliver the same ``ReceivedBatch`` records, so what follows the inbox is one code path.

The other methods train on tokens: :class:`ShardBatches` yields each device's batches (the same
batch plan a device uses) interleaved across devices in a fixed order.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from sftool.runtime.activation_noise import NoiseDefense
from sftool.runtime.local_data import Example, TextEncoder, bucketed_batches
from sftool.runtime.protocol import Batch
from sftool.server.accelerator import host_to_device
from sftool.server.activation_cache import ActivationCache
from sftool.server.mixing import MixingBuffer, Sample, TrainBatch
from sftool.server.receiver import ReceivedBatch, Receiver
from sftool.training.ledger import Ledger, SampleKey

#: What ``next_batch`` returns when no batch will ever come again.
END = None


class Inbox(Protocol):
    """Received (or simulated) device batches, in the order the trainer should see them."""

    def get(self, timeout: float) -> ReceivedBatch | None: ...

    def finished(self) -> bool:
        """No batch will arrive any more (every expected device is done and nothing is queued)."""

    def alive(self) -> bool: ...

    def depth(self) -> int: ...

    @property
    def bytes_received(self) -> int:
        """Bytes the devices sent so far."""

    @property
    def device_compute_s(self) -> float | None:
        """Seconds the devices computed, where this process can see it (None: they report it themselves)."""


#: How long the fixed release order waits for one device while batches of others are held.
ORDER_MAX_WAIT_S = 30.0


def _label_of(labels: np.ndarray, row: int, length: int, device: torch.device) -> int | torch.Tensor:
    """Row ``row``'s label: a class id, or its token labels trimmed like its activations."""
    if labels.ndim == 1:
        return int(labels[row])
    return torch.from_numpy(labels[row, :length].copy()).to(device)


class ReceiverInbox:
    """The streaming receiver's bounded queue; finished once every expected device said BYE.

    ``ordered``: batches are released in the fixed order of :func:`interleave` (by each device's
    announced data size) instead of their arrival order, so the mixing buffer sees the same
    samples in the same order in every run at a seed, and an in-process run gives the same losses.
    The queue is drained into a per-device hold; a batch's ACK goes out only when it is released
    (the receiver's ``ack="taken"``), so the devices' windows bound the hold, and the batch this
    order waits for can always be sent (it is its device's oldest unacknowledged one).
    """

    def __init__(self, receiver: Receiver, batches: queue.Queue, expected_devices: Callable[[], int],
                 ordered: bool = False, max_wait_s: float = ORDER_MAX_WAIT_S):
        self.receiver = receiver
        self.queue = batches
        self.expected_devices = expected_devices
        self.ordered = ordered
        #: How long the order waits for one device (to join, or for its next batch) while others' batches
        #: are held; past it, the order goes on without that device for now. A lagging or lying device
        #: thus slows a run instead of stopping it; within it, the order is exact.
        self.max_wait_s = max_wait_s
        self._waiting_since: float | None = None
        self._held: dict[str, dict[int, ReceivedBatch]] = {}
        self._released: dict[str, int] = {}
        self._next_seq: dict[str, int] = {}

    def get(self, timeout: float) -> ReceivedBatch | None:
        if not self.ordered:
            return self._take(timeout)
        while (item := self._take(0)) is not None:
            self._hold(item)
        released = self._release()
        if released is None and timeout > 0:
            item = self._take(timeout)
            if item is not None:
                self._hold(item)
                released = self._release()
        return released

    def _take(self, timeout: float) -> ReceivedBatch | None:
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _hold(self, item: ReceivedBatch) -> None:
        self._held.setdefault(item.batch.device, {})[item.batch.seq] = item

    def _release(self) -> ReceivedBatch | None:
        item = self._release_in_order()
        if item is not None or not any(self._held.values()):
            self._waiting_since = None
            return item
        now = time.monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < self.max_wait_s:
            return None
        # Waited too long for one device: go on with a device whose next batch is here.
        self._waiting_since = None
        ready = sorted((self._released.get(d, 0), d) for d, held in self._held.items() if self._next_seq.get(d, 0) in held)
        if ready:
            return self._pop(ready[0][1], self._next_seq.get(ready[0][1], 0))
        leftovers = sorted((d, q) for d, held in self._held.items() for q in held)
        return self._pop(*leftovers[0])

    def _release_in_order(self) -> ReceivedBatch | None:
        sessions = self.receiver.snapshot()
        if len(sessions) < self.expected_devices():
            return None  # the order needs every device's announced size
        candidates = []
        for name, s in sessions.items():
            released = self._released.get(name, 0)
            gone = s.finished and not self._held.get(name)
            if s.planned_samples > 0 and released < s.planned_samples and not gone:
                candidates.append((released / s.planned_samples, name))
        if not candidates:  # nothing more is planned: hand over whatever is left, in a fixed order
            leftovers = sorted((d, q) for d, held in self._held.items() for q in held)
            return self._pop(*leftovers[0]) if leftovers else None
        _, device = min(candidates)
        return self._pop(device, self._next_seq.get(device, 0))

    def _pop(self, device: str, seq: int) -> ReceivedBatch | None:
        item = self._held.get(device, {}).pop(seq, None)
        if item is not None:
            self._released[device] = self._released.get(device, 0) + item.batch.size
            self._next_seq[device] = seq + 1
            self.receiver.acknowledge(device, seq)
        return item

    def finished(self) -> bool:
        held = any(self._held.values())
        return not held and self.receiver.all_finished(self.expected_devices()) and self.queue.empty()

    def alive(self) -> bool:
        return self.receiver.is_alive()

    def depth(self) -> int:
        return self.queue.qsize() + self.receiver.pending + sum(len(h) for h in self._held.values())

    @property
    def bytes_received(self) -> int:
        return self.receiver.bytes_received

    @property
    def device_compute_s(self) -> float | None:
        return None


@dataclass
class SimulatedDevice:
    """A device of an in-process run: its shard and the batch plan ``sftool device`` would use.

    Seq ``k`` is batch ``k % len(batches)`` of epoch ``k // len(batches)``, as on a real device;
    seqs past the last epoch keep cycling (federated clients draw as many local steps as needed).
    """

    name: str
    examples: Sequence[Example]
    batch_size: int
    epochs: int = 1
    skip_epochs: Sequence[int] = ()
    batches: list[list[int]] = field(default_factory=list)

    def make_plan(self, encoder: TextEncoder, bucket_window: int = 8) -> SimulatedDevice:
        self.batches = bucketed_batches(encoder.lengths([e.text for e in self.examples]), self.batch_size, bucket_window)
        return self

    def rows(self, seq: int) -> tuple[int, list[Example]]:
        """(epoch, examples) of batch ``seq``."""
        epoch, i = divmod(seq, len(self.batches))
        return epoch, [self.examples[j] for j in self.batches[i]]

    def seqs(self) -> list[int]:
        """Every seq this device sends in its epochs (without the skipped ones)."""
        return [seq for seq in range(self.epochs * len(self.batches)) if seq // len(self.batches) not in self.skip_epochs]


def interleave(batches: dict[str, list[tuple[int, int]]]) -> list[tuple[str, int]]:
    """One fixed order over every device's batches, given as (seq, samples) in each device's order:
    the device furthest behind (by the fraction of its own samples released, then by name) goes
    next, so shards of any size finish together, as pacing makes them do on a live server. The
    streaming server releases received batches by the same rule (``ReceiverInbox(ordered=True)``),
    which is what makes a run's result independent of the arrival order of batches."""
    totals = {d: sum(n for _, n in v) for d, v in batches.items() if v}
    done = {d: 0 for d in totals}
    position = {d: 0 for d in totals}
    order = []
    while True:
        open_ = [d for d in totals if position[d] < len(batches[d])]
        if not open_:
            return order
        device = min(open_, key=lambda d: (done[d] / totals[d], d))
        seq, n = batches[device][position[device]]
        order.append((device, seq))
        done[device] += n
        position[device] += 1


def plan_of(devices: Sequence[SimulatedDevice]) -> dict[str, list[tuple[int, int]]]:
    """(seq, samples) of every batch each device sends: the input of :func:`interleave`."""
    return {d.name: [(seq, len(d.rows(seq)[1])) for seq in d.seqs()] for d in devices}


class SimulatedInbox:
    """Devices simulated in this process: each batch runs the exported device model (onnxruntime)
    and is noised (``defense``) and cast for the wire exactly as ``sftool device`` does, then handed
    over like a received one. Each simulated device draws its noise from its own generator."""

    def __init__(self, devices: Sequence[SimulatedDevice], device_model, encoder: TextEncoder, split: int,
                 wire_dtype: str = "fp16", defense: NoiseDefense | None = None):
        self.devices = {d.name: d for d in devices}
        self.defense = defense or NoiseDefense()
        seeds = np.random.SeedSequence(self.defense.seed).spawn(len(devices))
        self._rngs = {d.name: np.random.default_rng(s) for d, s in zip(devices, seeds)}
        self.model = device_model
        self.encoder = encoder
        self.split = split
        self.wire_dtype = wire_dtype
        self.device_compute_s = 0.0
        self.bytes_received = 0
        self._order: Iterator[tuple[str, int]] = iter(interleave(plan_of(devices)))
        self._left = sum(len(d.seqs()) for d in devices)

    def get(self, timeout: float) -> ReceivedBatch | None:
        from sftool.runtime.device_app import device_activations

        try:
            name, seq = next(self._order)
        except StopIteration:
            return None
        epoch, rows = self.devices[name].rows(seq)
        started = time.perf_counter()
        ids, mask = self.encoder.encode([r.text for r in rows])
        hidden = device_activations(self.model.forward(ids, mask), mask, self.wire_dtype, self.defense, self._rngs[name])
        self.device_compute_s += time.perf_counter() - started
        self.bytes_received += hidden.nbytes + mask.size
        self._left -= 1
        batch = Batch(name, seq, epoch, hidden, mask.astype(np.uint8),
                      np.array([r.label for r in rows], dtype=np.int64), np.array([r.sample_id for r in rows], dtype=np.int64))
        return ReceivedBatch(batch, self.split, time.monotonic())

    def finished(self) -> bool:
        return self._left == 0

    def alive(self) -> bool:
        return True

    def depth(self) -> int:
        return 0


class MixedActivations:
    """Training batches of activations drawn from the mixing buffer, filled from an inbox and, once
    every device is done, from the activation cache's replay of later epochs."""

    def __init__(self, inbox: Inbox, model, buffer: MixingBuffer, ledger: Ledger,
                 cache: ActivationCache | None = None, sequential: bool = False):
        self.inbox = inbox
        self.model = model
        self.buffer = buffer
        self.ledger = ledger
        self.cache = cache
        self.sequential = sequential
        self.idle_s = 0.0
        self.samples_replayed = 0
        self._replay_epochs: dict[str, list[int]] = {}  # device -> epochs to replay from the cache
        self._replay_lock = threading.Lock()  # the receiver thread adds devices at HELLO
        self._replay: Iterator[tuple[str, int]] | None = None
        self._replay_epoch = -1

    # -- activation cache -----------------------------------------------------------------------
    def plan_skip_epochs(self, device: str, epochs: int, samples_per_epoch: int, max_len: int) -> list[int]:
        """At a device's first HELLO (receiver thread): which epochs it need not send."""
        if self.cache is None or epochs < 2 or samples_per_epoch <= 0:
            return []
        if not self.cache.reserve(samples_per_epoch, max_len):
            return []  # over the cache budget: this device sends every epoch
        skip = list(range(1, epochs))
        with self._replay_lock:
            self._replay_epochs[device] = skip
        return skip

    def _replay_plan(self) -> dict[str, list[int]]:
        with self._replay_lock:
            return dict(self._replay_epochs)

    def _next_replay_sample(self) -> Sample | None:
        """The next cached sample to train (epochs replayed in order, shuffled across devices)."""
        while True:
            if self._replay is not None:
                for device, sample_id in self._replay:
                    if self.ledger.is_trained(device, self._replay_epoch, sample_id):
                        continue  # trained before a restart
                    hidden, label = self.cache.get(device, sample_id)
                    self.samples_replayed += 1
                    n = hidden.shape[0]
                    at = self.model.device
                    if isinstance(label, tuple):  # token labels
                        label = torch.tensor(label, dtype=torch.long, device=at)
                    return Sample(torch.from_numpy(hidden.astype("float32")).to(at), torch.ones(n, dtype=torch.long, device=at),
                                  label, device, sample_id, self._replay_epoch, -1)
                self._replay = None
            plan = self._replay_plan()
            later = sorted({e for epochs in plan.values() for e in epochs if e > self._replay_epoch})
            if not later:
                return None
            self._replay_epoch = later[0]
            devices = [d for d, epochs in plan.items() if self._replay_epoch in epochs]
            self._replay = self.cache.replay_order(devices, self.buffer.rng)

    def _replay_pending(self) -> bool:
        if self.cache is None:
            return False
        later = any(e > self._replay_epoch for epochs in self._replay_plan().values() for e in epochs)
        return later or self._replay is not None

    # -- the stream -----------------------------------------------------------------------------
    def ingest(self, item: ReceivedBatch) -> None:
        b = item.batch
        keep = self.ledger.untrained(b.device, b.epoch, b.sample_ids.tolist())
        self.ledger.expect(b.device, b.seq, len(keep))
        if not keep:
            return
        # fp16 on the wire, fp32 to train (bf16 autocast, where asked for, casts inside the blocks).
        hidden = host_to_device(b.hidden[keep], torch.float32, self.model.device)
        mask = host_to_device(b.attention_mask[keep], torch.int64, self.model.device)
        hidden = self.model.catch_up(hidden, mask, item.split)
        lengths = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(-1).tolist()  # to the last real token
        if self.cache is not None and b.device in self._replay_plan():
            for j, (i, n) in enumerate(zip(keep, lengths)):
                label = int(b.labels[i]) if b.labels.ndim == 1 else b.labels[i, :n].tolist()
                self.cache.put(b.device, int(b.sample_ids[i]), label, hidden[j, :n].cpu().numpy())
        self.buffer.add([
            Sample(hidden[j, :n].clone(), mask[j, :n].clone(), _label_of(b.labels, i, n, hidden.device), b.device,
                   int(b.sample_ids[i]), b.epoch, b.seq)
            for j, (i, n) in enumerate(zip(keep, lengths))
        ])

    def _fill(self) -> None:
        """Move received batches into the mixing buffer; once every device is done, cached replays."""
        while self.buffer.has_room:
            item = self.inbox.get(0)
            if item is not None:
                self.ingest(item)
                continue
            if self.cache is None or not self.inbox.finished():
                return
            sample = self._next_replay_sample()
            if sample is None:
                return
            self.buffer.add([sample])

    def next_batch(self, timeout: float = 0.05) -> TrainBatch | None | str:
        """A training batch; ``"wait"`` if none is ready within ``timeout``; ``END`` when the stream is over."""
        self._fill()
        ended = self.inbox.finished() and not self._replay_pending()
        if self.buffer.ready(ended or self.sequential):
            return self.buffer.draw()
        if ended and not len(self.buffer):
            return END
        started = time.perf_counter()
        item = self.inbox.get(timeout)
        if item is not None:
            self.ingest(item)
        self.idle_s += time.perf_counter() - started
        return "wait"

    def alive(self) -> bool:
        return self.inbox.alive()

    def depth(self) -> int:
        return self.inbox.depth()


@dataclass
class TokenBatch:
    """A device's batch of tokens (for the methods that train on the device side)."""

    device: str
    epoch: int
    input_ids: torch.Tensor  # [B, T] int64, right padded
    attention_mask: torch.Tensor  # [B, T] int64
    labels: torch.Tensor  # [B] (the task's label tensor)
    sample_ids: list[int]

    @property
    def keys(self) -> list[SampleKey]:
        return [SampleKey(self.device, self.epoch, s) for s in self.sample_ids]

    def to(self, device: torch.device) -> TokenBatch:
        """The same batch with its tensors on ``device`` (the model's)."""
        return TokenBatch(self.device, self.epoch, self.input_ids.to(device), self.attention_mask.to(device),
                          self.labels.to(device), self.sample_ids)


def rounds(devices: Sequence[SimulatedDevice], num_rounds: int | None, local_steps: int) -> Iterator[tuple[str, int]]:
    """FedAvg's order: in every round each device takes its next ``local_steps`` batches; endless
    when ``num_rounds`` is None (the sample budget stops the loop: small shards have short batches,
    so a count of rounds fixed in advance would not give every method the same samples)."""
    next_seq = {d.name: 0 for d in devices}
    for _ in range(num_rounds) if num_rounds is not None else itertools.count():
        for d in devices:
            yield from ((d.name, next_seq[d.name] + i) for i in range(local_steps))
            next_seq[d.name] += local_steps


class ShardBatches:
    """Token batches of the devices' shards, in the devices' own batch plans, in a given order of
    (device, seq) (:func:`interleave` for split learning, :func:`rounds` for federated rounds)."""

    def __init__(self, devices: Sequence[SimulatedDevice], encoder: TextEncoder, task, order: Iterable[tuple[str, int]]):
        self.devices = {d.name: d for d in devices}
        self.encoder = encoder
        self.task = task
        self._order = iter(order)

    def batch(self, name: str, seq: int) -> TokenBatch:
        epoch, rows = self.devices[name].rows(seq)
        ids, mask = self.encoder.encode([r.text for r in rows])
        return TokenBatch(name, epoch, torch.from_numpy(ids), torch.from_numpy(mask),
                          self.task.labels_tensor([r.label for r in rows]), [r.sample_id for r in rows])

    def next_batch(self, timeout: float = 0.0) -> TokenBatch | None:
        try:
            return self.batch(*next(self._order))
        except StopIteration:
            return END

    def alive(self) -> bool:
        return True

    def depth(self) -> int:
        return 0
