"""The server's receiver on a real ROUTER socket: malformed messages get an ERROR and are dropped,
other devices keep being served, duplicates are never queued twice, a full queue withholds credit."""

from __future__ import annotations

import queue
import time

import msgpack
import numpy as np
import pytest
from link_helpers import RawDevice
from sftool.runtime.device_client import ClientConfig, DeviceClient
from sftool.runtime.manifest import load_manifest, manifest_sha256
from sftool.runtime.protocol import ErrorCode, MsgType, batch_arrays, encode
from sftool.server.receiver import AcceptedSplit, Receiver


@pytest.fixture
def server(tiny_artifacts):
    folder = tiny_artifacts("gpt2")
    manifest = load_manifest(folder)
    sha = manifest_sha256(folder)
    batches: queue.Queue = queue.Queue(maxsize=2)
    # These test devices never confirm the server's BYE: a short grace keeps teardown quick.
    receiver = Receiver("tcp://127.0.0.1:0", {sha: AcceptedSplit(sha, manifest, manifest.batch_schema(2))}, batches, window=4,
                        goodbye_grace_s=0.2)
    receiver.start()
    yield receiver, batches, manifest, sha
    receiver.request_stop("test over")
    receiver.join_stopped(5)


class Device(RawDevice):

    def hello(self, sha: str, split: int):
        self.send(encode(MsgType.HELLO, self.name, manifest_sha256=sha, split=split, precision="fp32/any", wire_dtype="fp16"))
        reply = self.recv()
        assert reply.type == MsgType.WELCOME, reply
        return reply

    def batch(self, seq: int, hidden_size: int, b: int = 2, t: int = 4, dtype=np.float16):
        hidden = np.ones((b, t, hidden_size), dtype)
        return encode(MsgType.BATCH, self.name, batch_arrays(hidden, np.ones((b, t), np.uint8), np.zeros(b), np.arange(b)), seq=seq, epoch=0)


def test_malformed_messages_get_errors_and_others_keep_being_served(server):
    receiver, batches, manifest, sha = server
    good, bad = Device(receiver.endpoint, "good"), Device(receiver.endpoint, "bad")
    good.hello(sha, manifest.split)
    bad.hello(sha, manifest.split)
    h = manifest.hidden_size

    cases = []
    wrong_shape = bad.batch(1, h + 1)
    cases.append(("wrong shape", wrong_shape, ErrorCode.BAD_ARRAY))
    wrong_dtype = encode(MsgType.BATCH, "bad", batch_arrays(np.ones((2, 4, h), np.int64), np.ones((2, 4), np.uint8), np.zeros(2), np.arange(2)), seq=2)
    cases.append(("wrong dtype", wrong_dtype, ErrorCode.BAD_ARRAY))
    truncated = [bytes(f) for f in bad.batch(3, h)]
    truncated[1] = truncated[1][:-7]
    cases.append(("truncated frame", truncated, ErrorCode.BAD_ARRAY))
    unknown = [msgpack.packb({"v": 1, "type": "EXPLODE", "device": "bad"})]
    cases.append(("unknown type", unknown, ErrorCode.UNKNOWN_TYPE))
    cases.append(("garbage header", [b"\xff\x00garbage"], ErrorCode.BAD_HEADER))
    cases.append(("server-only type", encode(MsgType.ACK, "bad", seq=1), ErrorCode.UNKNOWN_TYPE))

    for name, frames, code in cases:
        bad.send(frames)
        reply = bad.recv()
        assert reply.type == MsgType.ERROR and reply.fields["code"] == code, name
        # ... and the well-behaved device is still served after each bad message.
        seq = len(cases) + cases.index((name, frames, code))
        good.send(good.batch(seq, h))
        ack = good.recv()
        assert ack.type == MsgType.ACK and ack.fields["seq"] == seq, name
        batches.get(timeout=2)

    assert receiver.is_alive() and batches.empty()
    assert receiver.snapshot()["bad"].rejected >= 4


def test_batch_before_hello_is_refused(server):
    receiver, _, manifest, _ = server
    stranger = Device(receiver.endpoint, "stranger")
    stranger.send(stranger.batch(0, manifest.hidden_size))
    reply = stranger.recv()
    assert reply.type == MsgType.ERROR and reply.fields["code"] == ErrorCode.NOT_WELCOMED


def test_wrong_manifest_is_refused(server):
    receiver, _, manifest, _ = server
    other = Device(receiver.endpoint, "other")
    other.send(encode(MsgType.HELLO, "other", manifest_sha256="0" * 64, split=manifest.split, precision="fp32/any", wire_dtype="fp16"))
    reply = other.recv()
    assert reply.type == MsgType.ERROR and reply.fields["code"] == ErrorCode.MANIFEST_MISMATCH


def test_duplicates_are_acked_but_queued_once(server):
    receiver, batches, manifest, sha = server
    dev = Device(receiver.endpoint, "dup")
    dev.hello(sha, manifest.split)
    frames = dev.batch(0, manifest.hidden_size)
    for _ in range(3):  # a resend after a reconnect looks exactly like this
        dev.send(frames)
        assert dev.recv().type == MsgType.ACK
    assert batches.get(timeout=2).batch.seq == 0
    with pytest.raises(queue.Empty):
        batches.get(timeout=0.3)
    assert receiver.snapshot()["dup"].duplicates == 2


def test_full_queue_withholds_credit_until_there_is_room(server):
    receiver, batches, manifest, sha = server
    dev = Device(receiver.endpoint, "fast")
    dev.hello(sha, manifest.split)
    for seq in range(3):  # the queue holds 2
        dev.send(dev.batch(seq, manifest.hidden_size))
    acks = [dev.recv().fields["seq"] for _ in range(2)]
    assert acks == [0, 1]
    assert not dev.sock.poll(300), "the third batch must not be acknowledged while the queue is full"
    batches.get(timeout=1)
    assert dev.recv().fields["seq"] == 2


@pytest.mark.parametrize("pace", [True, False])
def test_credits_are_paced_by_announced_data_size(tiny_artifacts, pace):
    """A device with 4x less data must not race ahead (and finish early) unless pacing is off."""
    folder = tiny_artifacts("gpt2")
    manifest = load_manifest(folder)
    sha = manifest_sha256(folder)
    batches: queue.Queue = queue.Queue(maxsize=100)
    receiver = Receiver("tcp://127.0.0.1:0", {sha: AcceptedSplit(sha, manifest, manifest.batch_schema(2))}, batches,
                        window=4, pace=pace, goodbye_grace_s=0.2)
    receiver.start()
    try:
        small, big = Device(receiver.endpoint, "small"), Device(receiver.endpoint, "big")
        for dev, samples in ((small, 8), (big, 32)):  # batches of 2: 4 and 16 batches
            dev.send(encode(MsgType.HELLO, dev.name, manifest_sha256=sha, split=manifest.split, precision="fp32/any",
                            wire_dtype="fp16", num_samples=samples, epochs=1))
            assert dev.recv().type == MsgType.WELCOME
        small.send(small.batch(0, manifest.hidden_size))  # 25% of its data, while big is at 0%
        if not pace:
            assert small.recv().fields["seq"] == 0
            return
        assert not small.sock.poll(300), "small is ahead: its credit must wait"
        for seq in range(3):  # big at 6/32 = 19% (+5% slack < 25%): still waiting
            big.send(big.batch(seq, manifest.hidden_size))
            assert big.recv().fields["seq"] == seq
        assert not small.sock.poll(300)
        big.send(big.batch(3, manifest.hidden_size))  # big at 25%: small may go on
        assert big.recv().fields["seq"] == 3
        assert small.recv().fields["seq"] == 0
        assert receiver.snapshot()["small"].planned_samples == 8
        # a device that said BYE no longer holds anyone back
        big.send(encode(MsgType.BYE, "big"))
        assert big.recv().type == MsgType.BYE
        small.send(small.batch(1, manifest.hidden_size))
        assert small.recv().fields["seq"] == 1
    finally:
        receiver.request_stop("test over")
        receiver.join_stopped(5)


def test_server_closes_only_after_devices_confirm_its_bye(tiny_artifacts):
    """Closing right after BYE can cut a device mid-batch (libzmq then aborts it): the server waits for
    the device's confirming BYE, dropping what still arrives, and closes as soon as it comes."""
    folder = tiny_artifacts("gpt2")
    manifest = load_manifest(folder)
    sha = manifest_sha256(folder)
    batches: queue.Queue = queue.Queue(maxsize=4)
    receiver = Receiver("tcp://127.0.0.1:0", {sha: AcceptedSplit(sha, manifest, manifest.batch_schema(2))}, batches,
                        goodbye_grace_s=30.0)
    receiver.start()
    device = Device(receiver.endpoint, "d")
    device.hello(sha, manifest.split)
    receiver.request_stop("budget reached")
    bye = device.recv()
    assert bye.type == MsgType.BYE and bye.fields["reason"] == "budget reached"
    device.send(device.batch(0, manifest.hidden_size))  # was in flight: dropped, never acknowledged
    assert not receiver.join_stopped(0.5), "the server closed before the device confirmed"
    assert batches.empty() and not device.sock.poll(100)
    device.send(encode(MsgType.BYE, "d", batches=0, samples=0))
    assert receiver.join_stopped(5), "the confirmation did not end the grace period"


def test_device_client_confirms_the_servers_bye(tiny_artifacts):
    folder = tiny_artifacts("gpt2")
    manifest = load_manifest(folder)
    sha = manifest_sha256(folder)
    receiver = Receiver("tcp://127.0.0.1:0", {sha: AcceptedSplit(sha, manifest, manifest.batch_schema(2))}, queue.Queue(),
                        goodbye_grace_s=30.0)
    receiver.start()
    client = DeviceClient(ClientConfig(receiver.endpoint, "c", sha, manifest.split, "fp32/any", wire_dtype="fp16"))
    client.connect()
    receiver.request_stop("budget reached")
    deadline = time.monotonic() + 5
    while client.report.finished_by_server is None and time.monotonic() < deadline:
        client._drain(0.2, None)
    assert client.report.finished_by_server == "budget reached"
    client.close()
    assert receiver.join_stopped(5), "the server is still waiting: the client did not confirm its BYE"
