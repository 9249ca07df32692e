"""A discrete-event model of a training run's wall time over a fleet, one schedule per method.

Measured per-step costs (device seconds per sample, server seconds per batch, bytes on the wire)
go in; a `Timeline` comes out: when the run ends, how busy the server and each device were, and
where the devices' time went. The four schedules are the ones the methods are compared by:

- `pipelined_splitfrozen`: SplitFrozen as `sftool serve` runs it. Devices compute back to back
  under a credit window, the receiver ACKs a batch when it enters the bounded queue, the trainer
  takes batches in arrival order; with the activation cache, epochs >= 1 are server-only replays.
- `sequential_split`: classic split learning (`--schedule sequential`): window 1, ACK after
  training, so every device waits for the server on every batch.
- `splitlora`: the device part trains too, so each step is device forward -> activations up ->
  server forward+backward -> cut gradient down -> device backward; device adapters are averaged
  every S server steps, with every device stopped.
- `fedlora`: synchronous FedAvg of LoRA adapters: E local steps per round, the slowest device's
  upload ends the round.

The three split schedules are simulated event by event (one heap of timed callbacks, a FIFO server,
one uplink and one downlink per device) rather than written as formulas, so that each of their
events can be set against the same event in a real run's log. FedLoRA's rounds are closed form:
with every device doing the same work every round there is nothing for a simulation to find.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

#: Method keys of `compare`'s costs mapping. Sequential split learning sends what SplitFrozen
#: sends and trains what it trains, so it reads the SplitFrozen costs unless given its own.
SPLITFROZEN = "splitfrozen"
SEQUENTIAL = "sequential"
SPLITLORA = "splitlora"
FEDLORA = "fedlora"

#: Timeline names, as `compare` keys its result.
PIPELINED_SPLITFROZEN = "pipelined_splitfrozen"
SEQUENTIAL_SPLIT = "sequential_split"

#: Keys of `Timeline.breakdown`.
BREAKDOWN_KEYS = ("device_compute", "uplink", "server_compute", "downlink", "waiting")


@dataclass(frozen=True)
class DeviceTier:
    """``count`` identical edge devices: their measured compute and their link.

    The ``*_s`` fields are device seconds per sample of each method's device step, as measured on
    the device (SplitFrozen: forward of blocks 0..k-1; SplitLoRA: forward, backward and update of
    those blocks with LoRA; FedLoRA: forward, backward and update of the whole model). Bandwidths
    are bytes per second (``math.inf`` for a link too fast to matter); latency is one way.
    """

    name: str
    count: int
    splitfrozen_s: float
    splitlora_s: float
    fedlora_s: float
    uplink_bytes_s: float = math.inf
    downlink_bytes_s: float = math.inf
    latency_s: float = 0.0
    #: Samples of each of these devices, when their shard differs from `Plan.samples_per_device`.
    samples: int | None = None


@dataclass(frozen=True)
class Costs:
    """One method's measured wire and server costs.

    ``server_s_per_batch`` is the server part's forward+backward(+update) time measured at
    ``batch_size`` samples; batches of other sizes are scaled linearly per sample, which a GPU
    under-fills at small batches, so measure at the plan's batch size where it matters.
    """

    server_s_per_batch: float
    batch_size: int
    #: Per sample, device -> server: the activations (fp16 [T, H]: see `activation_bytes`).
    bytes_up_per_sample: float = 0.0
    #: Per sample, server -> device: SplitLoRA's cut gradient; zero for SplitFrozen and FedLoRA.
    bytes_down_per_sample: float = 0.0
    #: One adapter (the device part's for SplitLoRA, the whole model's for FedLoRA), each way.
    adapter_bytes: float = 0.0
    #: Server seconds to average the uploaded adapters once.
    aggregate_s: float = 0.0

    @property
    def server_s_per_sample(self) -> float:
        """Server seconds per sample, the unit batches of any size are charged in."""
        return self.server_s_per_batch / self.batch_size


@dataclass(frozen=True)
class Plan:
    """What the run does: data, epochs and each method's schedule parameters."""

    samples_per_device: int
    epochs: int = 1
    batch_size: int = 8
    #: Credits: unacknowledged batches a device may have in flight (pipelined SplitFrozen).
    window: int = 4
    #: Batches the server's queue holds while the trainer is busy (`sftool serve --queue-size`).
    queue: int = 16
    #: FedLoRA: local steps per round (E).
    local_steps: int = 1
    #: FedLoRA: rounds (R); None runs as many as the largest shard needs for ``epochs``.
    rounds: int | None = None
    #: SplitLoRA: server steps between averagings of the device adapters (S).
    agg_period: int = 50
    #: Pipelined SplitFrozen: devices send epoch 0 only and the server replays the later epochs.
    cache: bool = False


@dataclass
class Timeline:
    """One simulated run.

    ``breakdown`` says where the devices' time went, in mean seconds per device, each second
    counted once in the first of device_compute, uplink, downlink that was going on (a device that
    computes while its last batch is on the wire is computing), and waiting for the rest of its time
    until its last reply; server_compute is the server's busy seconds. So device_compute + uplink +
    downlink + waiting is the mean time a device takes part in the run.
    """

    method: str
    total_s: float
    server_busy_s: float
    #: Device name (``tier#index``) -> seconds it computed.
    device_busy_s: dict[str, float]
    breakdown: dict[str, float]
    #: Device name -> when it was done (its last ACK, gradient or adapter transfer).
    device_done_s: dict[str, float] = field(default_factory=dict)

    @property
    def server_utilization(self) -> float:
        """Fraction of the run the server was busy."""
        return self.server_busy_s / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class Comparison:
    """`compare`'s result: each method's timeline and what pipelining buys over SplitLoRA."""

    timelines: dict[str, Timeline]
    #: 100 * (1 - pipelined SplitFrozen total / SplitLoRA total).
    reduction_vs_splitlora_pct: float

    def __getitem__(self, method: str) -> Timeline:
        return self.timelines[method]


def activation_bytes(tokens: int, hidden: int, bytes_per_value: int = 2) -> int:
    """Bytes of one sample's activations at the cut: [tokens, hidden] values (fp16 by default)."""
    return tokens * hidden * bytes_per_value


# -- simulation machinery ---------------------------------------------------------------------


class _Sim:
    """A clock and a heap of timed callbacks; equal times run in the order they were scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        # The sequence number breaks ties so that simultaneous events keep causal order.
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[..., None], *args) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def run(self) -> None:
        while self._heap:
            t, _, fn, args = heapq.heappop(self._heap)
            self.now = t
            fn(*args)


@dataclass
class _Job:
    seconds: float
    on_admit: Callable[[], None] | None = None
    on_done: Callable[[], None] | None = None
    live: bool = True


class _Server:
    """The trainer: one job at a time, in arrival order, behind a queue of ``capacity`` batches.

    A batch that finds the queue full is kept aside, unadmitted, exactly as the receiver keeps it
    and withholds its ACK; it enters the queue when the trainer takes the head. Background jobs
    (cache replays) run only once every live batch has arrived and the queue is empty, because the
    real trainer starts replaying when all devices are done.
    """

    def __init__(self, sim: _Sim, capacity: int | None, live_batches: int = 0) -> None:
        self.sim = sim
        self.capacity = capacity
        self.queue: deque[_Job] = deque()
        self.held: deque[_Job] = deque()
        self.background: deque[_Job] = deque()
        self.live_left = live_batches
        self.running = False
        self.busy_s = 0.0
        self.last_end = 0.0

    def receive(self, job: _Job) -> None:
        if job.live:
            self.live_left -= 1
        if self.capacity is None or len(self.queue) < self.capacity:
            self._admit(job)
        else:
            self.held.append(job)
        self._next()

    def _admit(self, job: _Job) -> None:
        self.queue.append(job)
        if job.on_admit:
            job.on_admit()

    def _next(self) -> None:
        if self.running:
            return
        if self.queue:
            job = self.queue.popleft()
            if self.held:
                self._admit(self.held.popleft())
        elif not self.held and self.live_left <= 0 and self.background:
            job = self.background.popleft()
        else:
            return
        self.running = True
        self.busy_s += job.seconds
        self.sim.at(self.sim.now + job.seconds, self._finish, job)

    def _finish(self, job: _Job) -> None:
        self.running = False
        self.last_end = self.sim.now
        if job.on_done:
            job.on_done()
        self._next()


@dataclass
class _Device:
    """One device's state, its two links and the spans it spent on each activity."""

    name: str
    tier: DeviceTier
    batches: list[int]
    next: int = 0
    inflight: int = 0
    replies: int = 0
    computing: bool = False
    state: str = "running"
    dirty: bool = False
    busy_s: float = 0.0
    done_s: float = 0.0
    uplink_free: float = 0.0
    downlink_free: float = 0.0
    compute: list[tuple[float, float]] = field(default_factory=list)
    up: list[tuple[float, float]] = field(default_factory=list)
    down: list[tuple[float, float]] = field(default_factory=list)

    def run(self, now: float, seconds: float) -> float:
        self.compute.append((now, now + seconds))
        self.busy_s += seconds
        return now + seconds

    def send_up(self, now: float, nbytes: float) -> float:
        # Messages serialize on the link, but propagation does not hold it: the next message may
        # start while the previous one is still in flight.
        start = max(now, self.uplink_free)
        self.uplink_free = start + nbytes / self.tier.uplink_bytes_s
        arrival = self.uplink_free + self.tier.latency_s
        self.up.append((start, arrival))
        return arrival

    def send_down(self, now: float, nbytes: float) -> float:
        start = max(now, self.downlink_free)
        self.downlink_free = start + nbytes / self.tier.downlink_bytes_s
        arrival = self.downlink_free + self.tier.latency_s
        self.down.append((start, arrival))
        return arrival


def _measure(*span_lists: list[tuple[float, float]]) -> float:
    """Length of the union of the spans."""
    total, end = 0.0, -math.inf
    for s, e in sorted(itertools.chain(*span_lists)):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _batches(samples: int, batch_size: int) -> list[int]:
    full, rest = divmod(samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _check(tiers: Sequence[DeviceTier], plan: Plan) -> None:
    if not any(t.count > 0 for t in tiers):
        raise ValueError("the fleet has no devices")
    for t in tiers:
        if t.count < 0 or min(t.uplink_bytes_s, t.downlink_bytes_s) <= 0 or t.latency_s < 0:
            raise ValueError(f"tier {t.name!r}: count and latency must be >= 0 and bandwidths > 0")
        if t.samples is not None and t.samples < 1:
            raise ValueError(f"tier {t.name!r}: samples must be >= 1")
    if min(plan.samples_per_device, plan.epochs, plan.batch_size, plan.window, plan.queue) < 1:
        raise ValueError("samples_per_device, epochs, batch_size, window and queue must be >= 1")
    if plan.local_steps < 1 or plan.agg_period < 1 or (plan.rounds is not None and plan.rounds < 1):
        raise ValueError("local_steps, agg_period and rounds must be >= 1")


def _fleet(tiers: Sequence[DeviceTier], plan: Plan, epochs: int) -> list[_Device]:
    devices = []
    for tier in tiers:
        per_epoch = _batches(tier.samples or plan.samples_per_device, plan.batch_size)
        for i in range(tier.count):
            devices.append(_Device(f"{tier.name}#{i}", tier, per_epoch * epochs))
    return devices


def _timeline(method: str, total_s: float, server_busy_s: float, devices: list[_Device]) -> Timeline:
    compute = up = down = waiting = 0.0
    for d in devices:
        c = _measure(d.compute)
        cu = _measure(d.compute, d.up)
        cud = _measure(d.compute, d.up, d.down)
        compute += c
        up += cu - c
        down += cud - cu
        waiting += max(0.0, d.done_s - cud)
    n = len(devices)
    breakdown = {
        "device_compute": compute / n,
        "uplink": up / n,
        "server_compute": server_busy_s,
        "downlink": down / n,
        "waiting": waiting / n,
    }
    return Timeline(
        method=method,
        total_s=total_s,
        server_busy_s=server_busy_s,
        device_busy_s={d.name: d.busy_s for d in devices},
        breakdown=breakdown,
        device_done_s={d.name: d.done_s for d in devices},
    )


def _stream(tiers: Sequence[DeviceTier], costs: Costs, plan: Plan, *, sequential: bool) -> Timeline:
    """SplitFrozen streaming: pipelined (ACK on admission) or sequential (window 1, ACK after training)."""
    _check(tiers, plan)
    cache = plan.cache and not sequential
    devices = _fleet(tiers, plan, 1 if cache else plan.epochs)
    window = 1 if sequential else plan.window
    sim = _Sim()
    # Sequential ACKs after training, so its queue never holds more than one batch per device.
    server = _Server(sim, None if sequential else plan.queue, sum(len(d.batches) for d in devices))
    per_sample = costs.server_s_per_sample

    if cache:
        # The replays mix all devices' samples, so they are batched over the fleet's total.
        total = sum(sum(d.batches) for d in devices)
        for _ in range(plan.epochs - 1):
            for n in _batches(total, plan.batch_size):
                server.background.append(_Job(n * per_sample, live=False))

    def try_compute(d: _Device) -> None:
        # The client computes a batch only while its window has room (runtime/device_client.py).
        if d.computing or d.next >= len(d.batches) or d.inflight >= window:
            return
        n = d.batches[d.next]
        d.next += 1
        d.computing = True
        sim.at(d.run(sim.now, n * d.tier.splitfrozen_s), computed, d, n)

    def computed(d: _Device, n: int) -> None:
        d.computing = False
        d.inflight += 1
        reply = lambda: sim.at(sim.now + d.tier.latency_s, acked, d, sim.now)  # noqa: E731
        job = _Job(n * per_sample, on_done=reply) if sequential else _Job(n * per_sample, on_admit=reply)
        sim.at(d.send_up(sim.now, n * costs.bytes_up_per_sample), server.receive, job)
        try_compute(d)

    def acked(d: _Device, sent_at: float) -> None:
        # An ACK carries no payload: latency only, and it does not occupy the downlink.
        d.down.append((sent_at, sim.now))
        d.inflight -= 1
        d.replies += 1
        if d.replies == len(d.batches):
            d.done_s = sim.now
        try_compute(d)

    for d in devices:
        sim.at(0.0, try_compute, d)
    sim.run()
    method = SEQUENTIAL_SPLIT if sequential else PIPELINED_SPLITFROZEN
    return _timeline(method, server.last_end, server.busy_s, devices)


# -- the four schedules -------------------------------------------------------------------------


def pipelined_splitfrozen(tiers: Sequence[DeviceTier], costs: Costs, plan: Plan) -> Timeline:
    """SplitFrozen with credit-window pipelining, the bounded queue and, if planned, the activation cache.

    Each device computes its next batch whenever fewer than ``plan.window`` of its batches are
    unacknowledged; its uplink sends while it computes. The server ACKs a batch when it enters the
    queue of ``plan.queue`` batches (later, if the queue is full) and trains in arrival order. The
    run ends when the server finishes its last batch, replays included.
    """
    return _stream(tiers, costs, plan, sequential=False)


def sequential_split(tiers: Sequence[DeviceTier], costs: Costs, plan: Plan) -> Timeline:
    """Classic split learning: window 1, ACK after training, no activation cache.

    Devices still run in parallel with each other, but each waits for its batch to be trained
    before computing the next; the server is one FIFO resource shared by all of them.
    """
    return _stream(tiers, costs, plan, sequential=True)


def splitlora(tiers: Sequence[DeviceTier], costs: Costs, plan: Plan, *, fwd_fraction: float = 1 / 3) -> Timeline:
    """SplitLoRA: the device part trains, so every step waits for the cut gradient.

    A device step is forward (``fwd_fraction`` of the measured device step) -> activations up ->
    server forward+backward (FIFO over devices) -> gradient down -> device backward and update.
    When the server has done ``plan.agg_period`` steps since the last averaging, devices start no
    new step: each finishes the one in flight and uploads its adapter; once every device has, the
    server averages and sends the adapter back, and each device resumes when it arrives. A device
    out of data uploads its last adapter and leaves; the run ends with a last averaging of every
    adapter not yet averaged (no download: the server holds the final model).
    """
    _check(tiers, plan)
    if not 0.0 <= fwd_fraction <= 1.0:
        raise ValueError("fwd_fraction must be in [0, 1]")
    devices = _fleet(tiers, plan, plan.epochs)
    sim = _Sim()
    server = _Server(sim, None)
    agg = {"pending": False, "steps": 0, "outstanding": 0, "unaveraged": 0, "averaging": False}

    def start_step(d: _Device) -> None:
        if d.next >= len(d.batches):
            d.state = "finished"
        elif agg["pending"]:
            d.state = "barrier"
        else:
            n = d.batches[d.next]
            d.next += 1
            sim.at(d.run(sim.now, n * d.tier.splitlora_s * fwd_fraction), forward_done, d, n)
            return
        # A clean adapter (no step since the last averaging) has nothing new to send.
        if d.dirty:
            upload(d)
        else:
            maybe_average()

    def forward_done(d: _Device, n: int) -> None:
        job = _Job(n * costs.server_s_per_sample, on_done=lambda: gradient(d, n))
        sim.at(d.send_up(sim.now, n * costs.bytes_up_per_sample), server.receive, job)

    def gradient(d: _Device, n: int) -> None:
        agg["steps"] += 1
        if agg["steps"] >= plan.agg_period:
            agg["pending"] = True
        sim.at(d.send_down(sim.now, n * costs.bytes_down_per_sample), backward, d, n)

    def backward(d: _Device, n: int) -> None:
        sim.at(d.run(sim.now, n * d.tier.splitlora_s * (1.0 - fwd_fraction)), step_done, d)

    def step_done(d: _Device) -> None:
        d.dirty = True
        start_step(d)

    def upload(d: _Device) -> None:
        d.dirty = False
        agg["outstanding"] += 1
        sim.at(d.send_up(sim.now, costs.adapter_bytes), uploaded, d)

    def uploaded(d: _Device) -> None:
        agg["outstanding"] -= 1
        agg["unaveraged"] += 1
        if d.state == "finished":
            d.done_s = sim.now
        maybe_average()

    def maybe_average() -> None:
        if agg["outstanding"] or agg["averaging"] or any(d.state in ("running", "resuming") for d in devices):
            return
        if not agg["unaveraged"] and not any(d.state == "barrier" for d in devices):
            return
        agg["averaging"] = True
        server.receive(_Job(costs.aggregate_s, on_done=averaged, live=False))

    def averaged() -> None:
        agg.update(pending=False, steps=0, unaveraged=0, averaging=False)
        for d in devices:
            if d.state == "barrier":
                d.state = "resuming"
                sim.at(d.send_down(sim.now, costs.adapter_bytes), resume, d)

    def resume(d: _Device) -> None:
        d.state = "running"
        start_step(d)

    for d in devices:
        sim.at(0.0, start_step, d)
    sim.run()
    return _timeline(SPLITLORA, server.last_end, server.busy_s, devices)


def fedlora_rounds(tiers: Sequence[DeviceTier], plan: Plan) -> int:
    """FedLoRA's rounds: ``plan.rounds``, or enough E-step rounds for the largest shard's epochs."""
    if plan.rounds is not None:
        return plan.rounds
    shards = [t.samples or plan.samples_per_device for t in tiers if t.count > 0]
    steps = plan.epochs * math.ceil(max(shards) / plan.batch_size)
    return math.ceil(steps / plan.local_steps)


def fedlora(tiers: Sequence[DeviceTier], costs: Costs, plan: Plan) -> Timeline:
    """Synchronous FedAvg of LoRA adapters, in closed form round by round.

    Every round each device runs ``plan.local_steps`` steps of ``plan.batch_size`` samples and
    uploads its adapter; the round ends when the last upload lands, the server averages
    (``costs.aggregate_s``) and sends the adapter back, and each device starts the next round when
    it arrives. All devices start round 1 from the same initial adapter, and the last averaged
    adapter stays on the server, so there are R uploads and R - 1 downloads per device.
    """
    _check(tiers, plan)
    rounds = fedlora_rounds(tiers, plan)
    devices = _fleet(tiers, plan, 0)
    starts = [0.0] * len(devices)
    end = 0.0
    for r in range(rounds):
        landed = []
        for i, d in enumerate(devices):
            computed = d.run(starts[i], plan.local_steps * plan.batch_size * d.tier.fedlora_s)
            d.done_s = d.send_up(computed, costs.adapter_bytes)
            landed.append(d.done_s)
        end = max(landed) + costs.aggregate_s
        if r < rounds - 1:
            for i, d in enumerate(devices):
                starts[i] = d.send_down(end, costs.adapter_bytes)
    return _timeline(FEDLORA, end, rounds * costs.aggregate_s, devices)


def compare(
    tiers: Sequence[DeviceTier], costs: Mapping[str, Costs], plan: Plan, *, fwd_fraction: float = 1 / 3
) -> Comparison:
    """Run all four schedules on one fleet and plan.

    ``costs`` maps `SPLITFROZEN`, `SPLITLORA` and `FEDLORA` to each method's measured costs;
    sequential split learning uses ``costs[SEQUENTIAL]`` if given, else the SplitFrozen costs.
    """
    timelines = {
        PIPELINED_SPLITFROZEN: pipelined_splitfrozen(tiers, costs[SPLITFROZEN], plan),
        SEQUENTIAL_SPLIT: sequential_split(tiers, costs.get(SEQUENTIAL, costs[SPLITFROZEN]), plan),
        SPLITLORA: splitlora(tiers, costs[SPLITLORA], plan, fwd_fraction=fwd_fraction),
        FEDLORA: fedlora(tiers, costs[FEDLORA], plan),
    }
    ours, theirs = timelines[PIPELINED_SPLITFROZEN].total_s, timelines[SPLITLORA].total_s
    reduction = 100.0 * (1.0 - ours / theirs) if theirs > 0 else 0.0
    return Comparison(timelines, reduction)


def describe(
    tiers: Sequence[DeviceTier] | None = None,
    costs: Mapping[str, Costs] | None = None,
    plan: Plan | None = None,
    *,
    fwd_fraction: float = 1 / 3,
) -> list[str]:
    """The model's assumptions as text lines, followed by the fleet, costs and plan when given."""
    lines = [
        "Time model assumptions:",
        "- Device and server times are the measured per-sample costs, charged linearly per sample (no warm-up, no batch-size effects).",
        "- One server (one GPU) trains one batch at a time, in arrival order; the mixing buffer is treated as FIFO.",
        "- Each device has its own full-duplex link: messages serialize on it, a message takes bytes/bandwidth + one-way latency.",
        "- ACKs carry no payload: one-way latency only; they do not occupy the downlink.",
        "- Pipelined SplitFrozen: a device computes only while its window has room; the server ACKs a batch when it enters the "
        "queue and holds the ACK while the queue is full. Pacing by data size (--pace) is not modelled.",
        "- Activation cache: devices send epoch 0 only; the server replays the later epochs (mixed across devices) once every "
        "device's batches have arrived, at the server's per-sample cost; reading the cache costs nothing.",
        "- Sequential split learning: window 1, ACK after training, no activation cache.",
        f"- SplitLoRA: device forward is {fwd_fraction:.0%} of the measured device step, backward and update the rest; device "
        "adapters are averaged every S server steps with every device stopped, and once more at the end.",
        "- FedLoRA: synchronous rounds of E local steps; a round ends when the slowest upload lands; all devices start from the "
        "same initial adapter; averaging costs aggregate_s on the server.",
        "- The run ends when the server's last work (training step or averaging) ends.",
    ]
    if tiers:
        lines.append("Fleet:")
        for t in tiers:
            shard = f", {t.samples} samples" if t.samples is not None else ""
            lines.append(
                f"- {t.name}: {t.count} x (SplitFrozen {t.splitfrozen_s * 1e3:.3g} ms, SplitLoRA {t.splitlora_s * 1e3:.3g} ms, "
                f"FedLoRA {t.fedlora_s * 1e3:.3g} ms per sample; up {_rate(t.uplink_bytes_s)}, down "
                f"{_rate(t.downlink_bytes_s)}, latency {t.latency_s * 1e3:.3g} ms{shard})"
            )
    if costs:
        lines.append("Costs:")
        for name, c in costs.items():
            lines.append(
                f"- {name}: server {c.server_s_per_batch * 1e3:.3g} ms per batch of {c.batch_size}; "
                f"{c.bytes_up_per_sample:.6g} B up and {c.bytes_down_per_sample:.6g} B down per sample; "
                f"adapter {c.adapter_bytes:.6g} B; averaging {c.aggregate_s * 1e3:.3g} ms"
            )
    if plan:
        rounds = plan.rounds if plan.rounds is not None else (fedlora_rounds(tiers, plan) if tiers else "from the data")
        lines.append(
            f"Plan: {plan.samples_per_device} samples per device, {plan.epochs} epoch(s), batch {plan.batch_size}, "
            f"window {plan.window}, queue {plan.queue}, cache {'on' if plan.cache else 'off'}; "
            f"SplitLoRA S={plan.agg_period}; FedLoRA E={plan.local_steps}, R={rounds}"
        )
    return lines


def _rate(bytes_s: float) -> str:
    return "unlimited" if math.isinf(bytes_s) else f"{bytes_s / 1e6:.3g} MB/s"
