"""`sftool bench flood` on a tiny run: every well-behaved device served, flooders refused or throttled,
the receiver alive to the end, the peak memory reported beside its bound (no timing asserted)."""

from __future__ import annotations

import json
import queue

import numpy as np
import zmq
from cli_helpers import run_cli
from sftool.bench_flood import FloodBenchConfig, MemoryBound, memory_bound
from sftool.bench_link import MANIFEST_SHA, LinkBenchConfig, _accepted
from sftool.runtime.protocol import ErrorCode, MsgType, batch_arrays, decode_header, encode
from sftool.server.receiver import LinkLimits, Receiver


def test_bench_flood_tiny_run(tmp_path):
    out = tmp_path / "flood.json"
    result = run_cli("bench", "flood", "--devices", "8", "--flooders", "2", "--seconds", "3", "--batch", "8",
                     "--seq-len", "64", "--hidden", "128", "--drain-rate", "100", "--json", out)
    assert result.exit_code == 0, result.output
    assert "well-behaved" in result.output and "flooders" in result.output and "peak RSS" in result.output
    r = json.loads(out.read_text())

    well, flood = r["well_behaved"], r["flooders"]
    assert well["devices"] == 6 and flood["devices"] == 2
    assert r["every_device_served"] and well["got_none"] == [] and well["acks_min"] > 0
    assert well["errors"] == {} and well["failures"] == {} and well["disconnected"] == 0
    # The server's count agrees with the devices': a well-behaved device's ACKs were all its batches.
    assert well["server_accepted"] >= well["acks_total"]
    # Flooders ignore their window: refused with WINDOW_EXCEEDED (and disconnected), or held back.
    assert flood["errors"].get("WINDOW_EXCEEDED", 0) > 0 or flood["acks_max"] < well["acks_min"]
    assert flood["sent"] > flood["acks_total"]
    assert not well["not_joined"] and not flood["not_joined"]

    server = r["server"]
    assert server["alive"] and server["stopped"] and server["drained"] > 0
    assert "INTERNAL" not in flood["errors"]

    bound, memory = r["bound"], r["memory"]
    assert bound["overhead_mb"] > 0 and bound["data_mb"] > 0
    assert bound["total_mb"] == bound["overhead_mb"] + bound["data_mb"]
    assert memory["peak_rss_mb"] > 0 and isinstance(memory["within_bound"], bool)
    assert memory["rss_timeline"], "the server's RSS is sampled over the run"
    assert r["machine"]["cpu"]


def test_the_bound_counts_queue_windows_and_the_flooders_transport():
    cfg = FloodBenchConfig(devices=10, flooders=3, batch=2, seq_len=8, hidden=16, window=4, queue_size=16)
    bound = memory_bound(cfg)
    assert isinstance(bound, MemoryBound)
    # queue + the trainer's batch + every session's window + per flooder libzmq's 2 x window + 8 and one being read
    assert bound.messages == 16 + 1 + 10 * 4 + 3 * (2 * 4 + 8 + 1)
    # the largest valid BATCH is float32 at the manifest's largest shape: more than the fp16 batch sent
    assert bound.largest_message_bytes > 2 * 8 * 16 * 4 > bound.sent_message_bytes
    assert cfg.plan_batches() >= 8


def test_bench_flood_refuses_a_bad_configuration():
    result = run_cli("bench", "flood", "--devices", "2", "--flooders", "3")
    assert result.exit_code != 0
    assert "flooders" in result.output


class RawDevice:
    """A bare DEALER that says HELLO and sends small valid batches with whatever seq it is given."""

    def __init__(self, endpoint: str, name: str = "flood"):
        self.name = name
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.arrays = batch_arrays(np.ones((2, 4, 8), np.float16), np.ones((2, 4), np.uint8), np.zeros(2), np.arange(2))

    def hello(self) -> None:
        self.sock.send_multipart(encode(MsgType.HELLO, self.name, manifest_sha256=MANIFEST_SHA, split=1,
                                        precision="fp32/any", wire_dtype="fp16"))
        assert self.replies(1)[0].type == MsgType.WELCOME

    def batch(self, seq: int) -> None:
        self.sock.send_multipart([bytes(f) for f in encode(MsgType.BATCH, self.name, self.arrays, seq=seq, epoch=0)])

    def replies(self, expected: int, timeout_ms: int = 2000) -> list:
        """Up to ``expected`` replies from the server, whatever their types."""
        got = []
        while len(got) < expected and self.sock.poll(timeout_ms):
            got.append(decode_header(self.sock.recv_multipart()[0], 1 << 20))
        return got

    def close(self) -> None:
        self.sock.close(0)


def test_a_flooder_is_disconnected_after_max_strikes_refusals_even_with_batches_accepted_between():
    batches: queue.Queue = queue.Queue(16)
    receiver = Receiver("tcp://127.0.0.1:0", _accepted(LinkBenchConfig(batch=2, seq_len=4, hidden=8)), batches,
                        window=1, ack="taken", goodbye_grace_s=0.1, limits=LinkLimits(max_strikes=3))
    receiver.start()
    dev = RawDevice(receiver.endpoint)
    try:
        dev.hello()
        replies, seq = [], 0
        for _ in range(3):  # 6 refused messages in all, 3 allowed
            dev.batch(seq)  # accepted: fills the window of 1 (its ACK waits for the trainer)
            dev.batch(seq + 1)  # beyond the window
            dev.batch(seq + 2)
            seq += 3
            replies += dev.replies(2)
            try:
                item = batches.get(timeout=1.0)
            except queue.Empty:
                break  # disconnected: its batches are no longer taken
            receiver.acknowledge(item.batch.device, item.batch.seq)
            replies += dev.replies(1)
        refused = [r for r in replies if r.type == MsgType.ERROR]
        assert refused and all(r.fields["code"] == ErrorCode.WINDOW_EXCEEDED for r in refused)
        assert any(r.type == MsgType.BYE and r.fields["reason"].startswith("disconnected") for r in replies)
        assert receiver.snapshot()["flood"].state == "disconnected"
    finally:
        dev.close()
        receiver.request_stop("test over")
        receiver.join_stopped(5)
