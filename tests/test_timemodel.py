"""The time model: hand-computed toy schedules, link terms, FedAvg rounds, the cache, monotonicity."""

from __future__ import annotations

import math

import pytest
from sftool.timemodel import (
    BREAKDOWN_KEYS,
    FEDLORA,
    PIPELINED_SPLITFROZEN,
    SEQUENTIAL_SPLIT,
    SPLITFROZEN,
    SPLITLORA,
    Costs,
    DeviceTier,
    Plan,
    activation_bytes,
    compare,
    describe,
    fedlora,
    pipelined_splitfrozen,
    sequential_split,
    splitlora,
)


def tier(count: int = 1, frozen: float = 1.0, **link) -> DeviceTier:
    return DeviceTier("dev", count, splitfrozen_s=frozen, splitlora_s=3 * frozen, fedlora_s=5 * frozen, **link)


def test_two_devices_pipelined_vs_sequential_by_hand():
    # 2 devices x 2 batches of 1 sample, 1 s device compute per batch, an instant link, 0.5 s server.
    fleet, costs = [tier(2)], Costs(server_s_per_batch=0.5, batch_size=1)
    # Pipelined: ACK on entering the queue, so neither device ever waits; both compute [0,1] and [1,2].
    # Server: a1 [1,1.5], b1 [1.5,2], a2 [2,2.5], b2 [2.5,3] -> 3.0 s, whatever the window, since
    # the ACK is instant and the queue never fills.
    for window in (1, 4):
        t = pipelined_splitfrozen(fleet, costs, Plan(samples_per_device=2, batch_size=1, window=window))
        assert t.total_s == pytest.approx(3.0)
        assert t.server_busy_s == pytest.approx(2.0)
        assert t.device_busy_s == {"dev#0": pytest.approx(2.0), "dev#1": pytest.approx(2.0)}
        assert t.breakdown["waiting"] == pytest.approx(0.0)
    # Sequential: ACK after training. a1 [1,1.5] -> A computes a2 [1.5,2.5]; b1 [1.5,2] -> B
    # computes b2 [2,3]; a2 trained [2.5,3], b2 [3,3.5] -> 3.5 s. A waits [1,1.5] and [2.5,3] (1 s),
    # B waits [1,2] and [3,3.5] (1.5 s): 1.25 s on average.
    t = sequential_split(fleet, costs, Plan(samples_per_device=2, batch_size=1, window=4))
    assert t.total_s == pytest.approx(3.5)
    assert t.device_done_s == {"dev#0": pytest.approx(3.0), "dev#1": pytest.approx(3.5)}
    assert t.breakdown["waiting"] == pytest.approx(1.25)
    assert set(t.breakdown) == set(BREAKDOWN_KEYS)


def test_window_hides_the_ack_round_trip_by_hand():
    # 1 device, 3 batches, 1 s compute, 0.5 s one-way latency, infinite bandwidth, 0.25 s server.
    fleet, costs = [tier(latency_s=0.5)], Costs(server_s_per_batch=0.25, batch_size=1)
    # Window 1: each batch costs compute 1 + up 0.5 + ACK 0.5 before the next starts: batches
    # computed [0,1], [2,3], [4,5]; the last arrives at 5.5 and is trained [5.5,5.75].
    one = pipelined_splitfrozen(fleet, costs, Plan(samples_per_device=3, batch_size=1, window=1))
    assert one.total_s == pytest.approx(5.75)
    # Window 4: computed back to back [0,1], [1,2], [2,3]; the last arrives at 3.5 -> 3.75.
    four = pipelined_splitfrozen(fleet, costs, Plan(samples_per_device=3, batch_size=1, window=4))
    assert four.total_s == pytest.approx(3.75)
    assert four.device_done_s["dev#0"] == pytest.approx(4.0)  # last ACK: admitted at 3.5, +0.5


def test_full_queue_withholds_the_ack_by_hand():
    # 1 device, 4 batches, 1 s compute, window 1, instant link, 2.5 s server: the server is the
    # bottleneck (1 + 4 x 2.5 = 11 s), and the queue size decides how long the device is held.
    fleet, costs = [tier()], Costs(server_s_per_batch=2.5, batch_size=1)
    # Queue 1: b1 arrives at 1, is admitted (ACK) and trained [1,3.5]; b2 [1,2] admitted at 2;
    # b3 [2,3] finds b2 queued: held until the trainer takes b2 at 3.5; b4 [3.5,4.5] finds b3
    # queued: held until 6, its ACK the device's last.
    q1 = pipelined_splitfrozen(fleet, costs, Plan(samples_per_device=4, batch_size=1, window=1, queue=1))
    assert q1.total_s == pytest.approx(11.0)
    assert q1.device_done_s["dev#0"] == pytest.approx(6.0)
    assert q1.breakdown["waiting"] == pytest.approx(2.0)  # [3,3.5] and [4.5,6]
    # Queue 2: b3 is admitted at 3; b4 [3,4] arrives after b2 left the queue (3.5): admitted at 4.
    q2 = pipelined_splitfrozen(fleet, costs, Plan(samples_per_device=4, batch_size=1, window=1, queue=2))
    assert q2.total_s == pytest.approx(11.0)
    assert q2.device_done_s["dev#0"] == pytest.approx(4.0)


def test_link_terms_single_device_one_batch():
    # One batch of 4 samples, 250 B each up: 1000 B at 500 B/s = 2 s, + 0.1 s latency = 2.1 s.
    B, L = 500.0, 0.1
    fleet = [tier(frozen=0.25, uplink_bytes_s=B, downlink_bytes_s=200.0, latency_s=L)]
    plan = Plan(samples_per_device=4, batch_size=4)
    costs = Costs(server_s_per_batch=0.5, batch_size=4, bytes_up_per_sample=250.0)
    uplink = 1000 / B + L
    assert uplink == pytest.approx(2.1)
    # Compute 4 x 0.25 = 1 s, uplink 2.1 s, server 0.5 s.
    for schedule in (pipelined_splitfrozen, sequential_split):
        t = schedule(fleet, costs, plan)
        assert t.total_s == pytest.approx(1.0 + uplink + 0.5)
        assert t.breakdown["uplink"] == pytest.approx(uplink)
    # Sequential's ACK comes after training, one latency later.
    assert sequential_split(fleet, costs, plan).device_done_s["dev#0"] == pytest.approx(3.6 + L)
    # SplitLoRA: device step 4 x 0.75 = 3 s, forward 1 s and backward 2 s. 100 B per sample down:
    # 400 B at 200 B/s + 0.1 = 2.1 s. Then the (empty) adapter goes up for the last averaging: 0.1 s.
    lora = Costs(server_s_per_batch=0.5, batch_size=4, bytes_up_per_sample=250.0, bytes_down_per_sample=100.0)
    t = splitlora(fleet, lora, plan)
    assert t.total_s == pytest.approx(1.0 + 2.1 + 0.5 + 2.1 + 2.0 + 0.1)
    assert t.breakdown["downlink"] == pytest.approx(2.1)


def test_splitlora_aggregation_barrier_by_hand():
    # 1 device, 2 batches of 1 sample, device step 1.5 s (forward 0.5, backward 1), server 0.5 s,
    # no activation bytes, a 100 B adapter over 100 B/s links: 1 s each way.
    fleet = [DeviceTier("d", 1, 0.0, 1.5, 0.0, uplink_bytes_s=100.0, downlink_bytes_s=100.0)]
    costs = Costs(server_s_per_batch=0.5, batch_size=1, adapter_bytes=100.0)
    # S = 1: fwd [0,0.5], server [0.5,1], bwd [1,2], adapter up [2,3], average, down [3,4];
    # fwd [4,4.5], server [4.5,5], bwd [5,6], last adapter up [6,7] -> 7 s.
    t = splitlora(fleet, costs, Plan(samples_per_device=2, batch_size=1, agg_period=1))
    assert t.total_s == pytest.approx(7.0)
    assert t.breakdown == pytest.approx(
        {"device_compute": 3.0, "uplink": 2.0, "server_compute": 1.0, "downlink": 1.0, "waiting": 1.0}
    )
    # S = 10: no averaging until the end: 2 steps of 2 s, then the adapter up -> 5 s.
    once = splitlora(fleet, costs, Plan(samples_per_device=2, batch_size=1, agg_period=10))
    assert once.total_s == pytest.approx(5.0)


def test_fedlora_round_is_set_by_the_slowest_device():
    # E = 5 steps of 2 samples per round, R = 3. Fast: 0.1 s/sample -> 1 s per round; slow: 0.3 ->
    # 3 s. Adapter 1000 B at 1000 B/s: 1 s up, 1 s down. Round 1 ends when the slow upload lands
    # (3 + 1 = 4); each later round adds down 1 + compute 3 + up 1 = 5 -> 4 + 5 + 5 = 14 s.
    fleet = [
        DeviceTier("fast", 1, 0.0, 0.0, 0.1, uplink_bytes_s=1000.0, downlink_bytes_s=1000.0),
        DeviceTier("slow", 1, 0.0, 0.0, 0.3, uplink_bytes_s=1000.0, downlink_bytes_s=1000.0),
    ]
    costs = Costs(server_s_per_batch=0.0, batch_size=2, adapter_bytes=1000.0)
    plan = Plan(samples_per_device=100, batch_size=2, local_steps=5, rounds=3)
    t = fedlora(fleet, costs, plan)
    assert t.total_s == pytest.approx(14.0)
    assert t.device_busy_s == {"fast#0": pytest.approx(3.0), "slow#0": pytest.approx(9.0)}
    # The fast device is done 2 s before the slow one and waited 2 s per later round for it.
    assert t.device_done_s == {"fast#0": pytest.approx(12.0), "slow#0": pytest.approx(14.0)}
    assert t.breakdown["waiting"] == pytest.approx((4.0 + 0.0) / 2)
    # Without the slow tier the same plan takes 2 + 3 + 3 = 8 s.
    assert fedlora(fleet[:1], costs, plan).total_s == pytest.approx(8.0)
    # Averaging adds to every round, on the server.
    slow_avg = fedlora(fleet, Costs(0.0, 2, adapter_bytes=1000.0, aggregate_s=0.5), plan)
    assert slow_avg.total_s == pytest.approx(14.0 + 3 * 0.5)
    assert slow_avg.server_busy_s == pytest.approx(1.5)


def test_fedlora_rounds_default_to_the_data():
    fleet = [tier()]
    costs = Costs(server_s_per_batch=0.0, batch_size=2)
    # 10 samples in batches of 4 -> 3 steps per epoch, x 2 epochs = 6 steps -> 2 rounds of E = 4.
    t = fedlora(fleet, costs, Plan(samples_per_device=10, epochs=2, batch_size=4, local_steps=4))
    assert t.device_busy_s["dev#0"] == pytest.approx(2 * 4 * 4 * 5.0)


def test_activation_cache_device_works_one_epoch():
    # 2 devices x 4 samples in batches of 2, 3 epochs; device 0.1 s/sample, server 0.05 s/sample.
    fleet = [tier(2, frozen=0.1)]
    costs = Costs(server_s_per_batch=0.1, batch_size=2)
    plan = Plan(samples_per_device=4, epochs=3, batch_size=2, cache=True)
    t = pipelined_splitfrozen(fleet, costs, plan)
    # One epoch of device compute (4 x 0.1) and three of server work (3 x 8 x 0.05).
    assert t.device_busy_s == {"dev#0": pytest.approx(0.4), "dev#1": pytest.approx(0.4)}
    assert t.server_busy_s == pytest.approx(1.2)
    # Epoch 0 arrives at 0.2 and 0.4 (two batches each time) and is trained by 0.6; the 8 replay
    # batches of 0.1 s follow -> 1.4 s. Devices are done once epoch 0 is acknowledged.
    assert t.total_s == pytest.approx(1.4)
    assert max(t.device_done_s.values()) == pytest.approx(0.4)
    no_cache = pipelined_splitfrozen(fleet, costs, Plan(samples_per_device=4, epochs=3, batch_size=2))
    assert no_cache.device_busy_s["dev#0"] == pytest.approx(1.2)
    # The classic schedule has no cache: its devices compute every epoch.
    assert sequential_split(fleet, costs, plan).device_busy_s["dev#0"] == pytest.approx(1.2)


def test_replays_wait_for_every_live_batch():
    # 1 device, 2 samples in batches of 1, 2 epochs, 1 s/sample on the device, 0.25 s on the server.
    # b1 is trained [1,1.25] and the server idles until b2 arrives at 2 ([2,2.25]): replaying in
    # that gap would train samples the trainer has not cached yet. Replays follow: [2.25,2.75].
    plan = Plan(samples_per_device=2, epochs=2, batch_size=1, cache=True)
    t = pipelined_splitfrozen([tier()], Costs(server_s_per_batch=0.25, batch_size=1), plan)
    assert t.total_s == pytest.approx(2.75)


def mixed_fleet() -> list[DeviceTier]:
    return [
        DeviceTier("pi", 3, 0.05, 0.15, 0.6, uplink_bytes_s=2e5, downlink_bytes_s=5e5, latency_s=0.03),
        DeviceTier("jetson", 2, 0.01, 0.03, 0.1, uplink_bytes_s=1e6, downlink_bytes_s=2e6, latency_s=0.01, samples=70),
    ]


def mixed_costs(server_scale: float = 1.0) -> dict[str, Costs]:
    act = activation_bytes(tokens=16, hidden=64)
    return {
        SPLITFROZEN: Costs(0.04 * server_scale, 8, bytes_up_per_sample=act),
        SPLITLORA: Costs(0.06 * server_scale, 8, act, act, adapter_bytes=5e4, aggregate_s=0.01 * server_scale),
        FEDLORA: Costs(0.0, 8, adapter_bytes=4e5, aggregate_s=0.05 * server_scale),
    }


def test_larger_window_never_makes_pipelined_slower():
    fleet, costs = mixed_fleet(), mixed_costs()[SPLITFROZEN]
    for queue in (1, 2, 8):
        totals = [
            pipelined_splitfrozen(fleet, costs, Plan(samples_per_device=50, epochs=2, window=w, queue=queue)).total_s
            for w in range(1, 9)
        ]
        assert all(b <= a + 1e-9 for a, b in zip(totals, totals[1:])), totals
        # And the window matters here: latency and serialized uplinks make window 1 slower.
        assert totals[-1] < totals[0]


def test_faster_server_never_makes_anything_slower():
    fleet = mixed_fleet()
    plan = Plan(samples_per_device=50, epochs=2, window=2, queue=2, local_steps=3, agg_period=4)
    runs = [compare(fleet, mixed_costs(scale), plan) for scale in (4.0, 2.0, 1.0, 0.5, 0.25)]
    for method in (PIPELINED_SPLITFROZEN, SEQUENTIAL_SPLIT, SPLITLORA, FEDLORA):
        totals = [r[method].total_s for r in runs]
        assert all(b <= a + 1e-9 for a, b in zip(totals, totals[1:])), (method, totals)
    # A slow server bounds every split schedule from below by its busy time.
    for method in (PIPELINED_SPLITFROZEN, SEQUENTIAL_SPLIT, SPLITLORA):
        assert runs[0][method].total_s >= runs[0][method].server_busy_s


def test_compare_and_describe():
    fleet, costs = mixed_fleet(), mixed_costs()
    plan = Plan(samples_per_device=40, epochs=3, cache=True, local_steps=5, agg_period=10)
    result = compare(fleet, costs, plan)
    assert set(result.timelines) == {PIPELINED_SPLITFROZEN, SEQUENTIAL_SPLIT, SPLITLORA, FEDLORA}
    ours, theirs = result[PIPELINED_SPLITFROZEN].total_s, result[SPLITLORA].total_s
    assert result.reduction_vs_splitlora_pct == pytest.approx(100 * (1 - ours / theirs))
    assert ours < result[SEQUENTIAL_SPLIT].total_s < theirs
    for t in result.timelines.values():
        assert set(t.breakdown) == set(BREAKDOWN_KEYS)
        assert len(t.device_busy_s) == 5 and all(math.isfinite(v) for v in t.breakdown.values())
        assert 0 < t.server_utilization <= 1 or t.method == FEDLORA
    lines = describe(fleet, costs, plan)
    assert all(isinstance(line, str) for line in lines)
    assert any("window 4, queue 16, cache on" in line for line in lines)
    assert any(line.startswith("- jetson: 2 x") for line in lines)


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError):
        pipelined_splitfrozen([tier(0)], Costs(1.0, 1), Plan(samples_per_device=1))
    with pytest.raises(ValueError):
        pipelined_splitfrozen([tier()], Costs(1.0, 1), Plan(samples_per_device=1, window=0))
    with pytest.raises(ValueError):
        splitlora([tier()], Costs(1.0, 1), Plan(samples_per_device=1), fwd_fraction=1.5)
