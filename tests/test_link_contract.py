"""The link as a contract: what a hostile or careless device sends never changes server state unless
it is valid, never reaches the trainer unless it is finite and in range, and cannot make the server's
memory or time depend on what it claims. Real ROUTER/DEALER sockets on loopback."""

from __future__ import annotations

import queue
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
from link_helpers import RawDevice
from sftool.runtime.device_client import ClientConfig, DeviceClient
from sftool.runtime.manifest import Manifest
from sftool.runtime.protocol import ErrorCode, MsgType, batch_arrays, encode
from sftool.server.activation_cache import ActivationCache
from sftool.server.receiver import AcceptedSplit, LinkLimits, Receiver
from sftool.server.trainer import Trainer
from sftool.settings import OptimSettings

SHA = "ab" * 32
H = 8


def tiny_manifest(activation_abs_max: float | None = 3.0) -> Manifest:
    return Manifest(family="gpt2", source="tiny", split=2, num_layers=4, hidden_size=H, max_seq_len=16, pad_token_id=0,
                    variants=[], files={}, weights_fingerprint="", opset=20, max_batch=4,
                    activation_abs_max=activation_abs_max)


def make_receiver(queue_size: int = 16, window: int = 4, **kwargs) -> tuple[Receiver, queue.Queue]:
    manifest = tiny_manifest()
    batches: queue.Queue = queue.Queue(maxsize=queue_size)
    receiver = Receiver("tcp://127.0.0.1:0", {SHA: AcceptedSplit(SHA, manifest, manifest.batch_schema(2))}, batches,
                        window=window, goodbye_grace_s=0.1, **kwargs)
    receiver.start()
    return receiver, batches


@pytest.fixture
def link():
    made: list[Receiver] = []

    def start(**kwargs):
        receiver, batches = make_receiver(**kwargs)
        made.append(receiver)
        return receiver, batches

    yield start
    for receiver in made:
        receiver.request_stop("test over")
        receiver.join_stopped(5)


class Device(RawDevice):

    def hello(self, expect=MsgType.WELCOME, **fields):
        fields = {"manifest_sha256": SHA, "split": 2, "precision": "fp32/any", "wire_dtype": "fp16", **fields}
        self.send(encode(MsgType.HELLO, self.name, **fields))
        reply = self.recv()
        assert reply.type == expect, reply
        return reply

    def batch(self, seq: int, b: int = 2, hidden=None, ids=None, dtype=np.float16, **fields):
        hidden = np.ones((b, 4, H), dtype) if hidden is None else hidden
        ids = np.arange(b) + 100 * seq if ids is None else ids
        return encode(MsgType.BATCH, self.name, batch_arrays(hidden, np.ones(hidden.shape[:2], np.uint8),
                                                            np.zeros(hidden.shape[0]), ids), seq=seq, epoch=0, **fields)

    def expect_error(self, frames, code):
        self.send(frames)
        reply = self.recv()
        assert reply.type == MsgType.ERROR and reply.fields["code"] == code, reply
        return reply.fields["reason"]


def test_a_finite_activation_beyond_the_bound_never_reaches_the_trainer(link):
    receiver, batches = link()
    dev = Device(receiver.endpoint, "d")
    dev.hello(wire_dtype="fp32")
    huge = np.ones((2, 4, H), np.float32)
    huge[1, 2, 3] = 3.0e38  # finite fp32, and every later loss NaN if it were trained
    assert "bound" in dev.expect_error(dev.batch(0, hidden=huge), ErrorCode.BAD_VALUES)
    nan = np.ones((2, 4, H), np.float32)
    nan[0, 0, 0] = np.nan
    dev.expect_error(dev.batch(1, hidden=nan), ErrorCode.BAD_VALUES)
    assert batches.empty()
    # the bound comes from the export's calibration: 3.0 x 8 here; 20 passes, 30 does not
    ok = np.full((2, 4, H), 20.0, np.float32)
    dev.send(dev.batch(2, hidden=ok))
    assert dev.recv().type == MsgType.ACK
    dev.expect_error(dev.batch(3, hidden=np.full((2, 4, H), 30.0, np.float32)), ErrorCode.BAD_VALUES)


def test_a_refused_hello_leaves_no_session(link):
    receiver, _ = link()
    dev = Device(receiver.endpoint, "d")
    dev.hello(expect=MsgType.ERROR, wire_dtype="bf16")
    dev.hello(expect=MsgType.ERROR, epochs=0)
    dev.hello(expect=MsgType.ERROR, num_samples=2**40)
    assert receiver.snapshot() == {}
    dev.expect_error(dev.batch(0), ErrorCode.NOT_WELCOMED)


def test_sequence_numbers_are_range_checked_and_welcome_keeps_working(link):
    receiver, batches = link()
    dev = Device(receiver.endpoint, "d")
    dev.hello()
    dev.expect_error(dev.batch(0)[:1] and [msgpack.packb({"v": 1, "type": "BATCH", "device": "d", "seq": 2**64 - 1,
                                                           "epoch": 0, "arrays": []})], ErrorCode.BAD_HEADER)
    frames = dev.batch(0)
    header = msgpack.unpackb(frames[0])
    header["seq"] = 2**31
    dev.expect_error([msgpack.packb(header), *frames[1:]], ErrorCode.BAD_HEADER)
    welcome = dev.hello()  # a reconnect after the attempt: WELCOME still encodes
    assert welcome.fields["done_seqs"] == [] and batches.empty()


def test_arrays_are_matched_by_name_and_checked_against_the_announced_wire_dtype(link):
    receiver, batches = link()
    dev = Device(receiver.endpoint, "d")
    dev.hello(wire_dtype="fp32")
    frames = dev.batch(0, dtype=np.float32)
    header = msgpack.unpackb(frames[0])
    header["arrays"] = header["arrays"][::-1]
    dev.send([msgpack.packb(header), *frames[1:][::-1]])
    assert dev.recv().type == MsgType.ACK
    got = batches.get(timeout=2).batch
    np.testing.assert_array_equal(got.sample_ids, [0, 1])
    assert got.hidden.shape == (2, 4, H)
    # an fp32 device sending fp16 is not what it announced
    dev.expect_error(dev.batch(1, dtype=np.float16), ErrorCode.BAD_ARRAY)
    dev.expect_error(dev.batch(2, ids=np.array([5, 5])), ErrorCode.BAD_ARRAY)  # duplicate sample ids


def test_the_window_is_enforced_by_the_server(link):
    receiver, batches = link(queue_size=1, window=2)
    dev = Device(receiver.endpoint, "greedy")
    dev.hello()
    for seq in range(3):
        dev.send(dev.batch(seq))
    assert dev.recv().fields["seq"] == 0  # 1 and 2 wait for queue space: unacknowledged, the window is full
    dev.send(dev.batch(3))  # ignores its window: refused, nothing queued or held for it
    reply = dev.recv()
    assert reply.type == MsgType.ERROR and reply.fields["code"] == ErrorCode.WINDOW_EXCEEDED
    assert receiver.pending == 2 and batches.qsize() == 1


def test_a_message_with_too_many_frames_is_dropped_unread(link):
    receiver, batches = link()
    dev = Device(receiver.endpoint, "d")
    dev.hello()
    frames = dev.batch(0)
    dev.expect_error([*frames, *([b"x" * 1000] * 500)], ErrorCode.LIMIT_EXCEEDED)
    dev.send(dev.batch(1))
    assert dev.recv().type == MsgType.ACK and receiver.is_alive()


def test_sessions_and_announced_sizes_are_capped(link):
    receiver, _ = link(limits=LinkLimits(max_sessions=2, max_samples_per_device=100), pace=False)
    a, b, c = (Device(receiver.endpoint, name) for name in "abc")
    a.hello(num_samples=4)
    b.hello(num_samples=100)
    assert c.hello(expect=MsgType.ERROR).fields["code"] == ErrorCode.LIMIT_EXCEEDED
    assert set(receiver.snapshot()) == {"a", "b"}
    d = Device(receiver.endpoint, "a")  # a reconnect of a known device is not a new session
    d.hello(num_samples=4)
    big = Device(receiver.endpoint, "b2")
    assert big.hello(expect=MsgType.ERROR, num_samples=101).fields["code"] == ErrorCode.LIMIT_EXCEEDED
    # a device sends no more than it announced
    d.send(d.batch(0))
    d.send(d.batch(1))
    assert [d.recv().fields["seq"] for _ in range(2)] == [0, 1]
    d.expect_error(d.batch(2), ErrorCode.LIMIT_EXCEEDED)


def test_a_device_lying_about_its_size_cannot_stall_the_others(link):
    receiver, _ = link(limits=LinkLimits(pace_max_hold_s=0.5))
    liar, honest = Device(receiver.endpoint, "liar"), Device(receiver.endpoint, "honest")
    liar.hello(num_samples=1_000_000)  # and never sends anything
    honest.hello(num_samples=8)
    honest.send(honest.batch(0))
    assert not honest.sock.poll(200), "paced: the honest device is ahead of the liar"
    started = time.monotonic()
    assert honest.recv(3000).fields["seq"] == 0
    assert time.monotonic() - started < 2.0


def test_a_device_that_keeps_sending_invalid_messages_is_disconnected(link):
    receiver, batches = link(limits=LinkLimits(max_strikes=3))
    bad, good = Device(receiver.endpoint, "bad"), Device(receiver.endpoint, "good")
    bad.hello()
    good.hello()
    for seq in range(2):
        bad.expect_error(bad.batch(seq, ids=np.array([1, 1])), ErrorCode.BAD_ARRAY)
    bad.send(bad.batch(2, ids=np.array([1, 1])))
    assert bad.recv().type == MsgType.ERROR
    bye = bad.recv()
    assert bye.type == MsgType.BYE and bye.fields["reason"].startswith("disconnected")
    bad.send(bad.batch(3))  # ignored from now on
    assert not bad.sock.poll(300)
    assert receiver.snapshot()["bad"].state == "disconnected"
    good.send(good.batch(0))
    assert good.recv().type == MsgType.ACK and batches.qsize() == 1


def test_a_device_started_before_the_server_connects_once_it_is_up(free_port):
    endpoint = f"tcp://127.0.0.1:{free_port}"
    client = DeviceClient(ClientConfig(endpoint=endpoint, device_id="early", manifest_sha256=SHA, split=2,
                                       precision="fp32/any", hello_timeout_s=0.5, retry_backoff_s=(0.2, 0.5)))
    welcome: dict = {}
    thread = threading.Thread(target=lambda: welcome.update(client.connect_retrying()))
    thread.start()
    time.sleep(1.5)  # the device has retried a few times by now
    manifest = tiny_manifest()
    receiver = Receiver(endpoint, {SHA: AcceptedSplit(SHA, manifest, manifest.batch_schema(2))}, queue.Queue(4),
                        goodbye_grace_s=0.1)
    receiver.start()
    try:
        thread.join(10)
        assert welcome.get("window") == 4 and "early" in receiver.snapshot()
    finally:
        client.close(send_bye=False)
        receiver.request_stop("test over")
        receiver.join_stopped(5)


def test_the_activation_cache_keeps_fp32_values_beyond_fp16(tmp_path):
    cache = ActivationCache(tmp_path, H, 1 << 20)
    wide = np.full((3, H), 1.0e5, np.float32)  # a device sends these as fp32 for exactly this reason
    narrow = np.full((2, H), 0.5, np.float32)
    cache.put("d", 1, 0, wide)
    cache.put("d", 2, 1, narrow)
    cache.save_index()
    reopened = ActivationCache(tmp_path, H, 1 << 20)
    reopened.load_index()
    got, label = reopened.get("d", 1)
    assert np.isfinite(got).all() and label == 0
    np.testing.assert_array_equal(got, wide)
    assert reopened.get("d", 2)[0].dtype == np.float16


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(H, 2)

    def forward(self, hidden, mask):
        return self.proj(hidden.mean(1))


def test_a_step_whose_loss_is_not_finite_is_never_applied():
    torch.manual_seed(0)
    model = _Head()
    trainer = Trainer(model, OptimSettings(lr=0.1, warmup_steps=1))
    before = [p.detach().clone() for p in model.parameters()]
    hidden = torch.ones(2, 3, H)
    hidden[0, 0, 0] = float("inf")
    result = trainer.step_with(lambda: model(hidden, None), torch.tensor([0, 1]))
    assert result.refused and trainer.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    fine = trainer.step_with(lambda: model(torch.ones(2, 3, H), None), torch.tensor([0, 1]))
    assert not fine.refused and trainer.step_count == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
