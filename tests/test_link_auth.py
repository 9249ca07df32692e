"""CurveZMQ on the device-server link, on real sockets over loopback: allow-listed devices stream,
unknown keys never get a WELCOME (and the device says why), a valid key cannot speak for another
device id, and the key files and security options are checked with one-line errors."""

from __future__ import annotations

import logging
import queue
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from cli_helpers import one_line_error, run_cli
from sftool.errors import SftoolError
from sftool.run_config import RUN_CONFIG, load_run_config, write_run_config
from sftool.runtime.device_client import ClientConfig, DeviceClient, OutgoingBatch
from sftool.runtime.link_keys import (
    generate_keypair,
    is_local_endpoint,
    load_allow_list,
    load_keypair,
    load_public_key,
)
from sftool.runtime.manifest import load_manifest, manifest_sha256
from sftool.runtime.protocol import ErrorCode, MsgType, batch_arrays, decode_header, encode
from sftool.server.link_auth import LinkAuth
from sftool.server.receiver import AcceptedSplit, Receiver
from sftool.server.serve import ServeOptions

ALLOWED = ("dev-a", "dev-b", "mallory")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """A key folder (server + every device's pair) and, inside it, the allow-list of public keys."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("server", *ALLOWED, "stranger"):
        generate_keypair(folder, name)
    allow = folder / "allow"
    allow.mkdir()
    for name in ALLOWED:
        shutil.copy(folder / f"{name}.key", allow / f"{name}.key")
    return folder


@pytest.fixture
def curve_server(tiny_artifacts, keys):
    folder = tiny_artifacts("gpt2")
    manifest = load_manifest(folder)
    sha = manifest_sha256(folder)
    link = LinkAuth.from_files(keys / "server.key_secret", keys / "allow")
    link.start()
    batches: queue.Queue = queue.Queue(maxsize=64)
    receiver = Receiver("tcp://127.0.0.1:0", {sha: AcceptedSplit(sha, manifest, manifest.batch_schema(2))}, batches,
                        window=4, goodbye_grace_s=0.2, **link.receiver_options())
    receiver.start()
    yield receiver, batches, manifest, sha, link
    receiver.request_stop("test over")
    receiver.join_stopped(5)
    link.stop()


def curve_keys(keys: Path, device: str) -> dict[str, bytes]:
    pair = load_keypair(keys / f"{device}.key_secret")
    return {"server_public": load_public_key(keys / "server.key"), "public": pair.public, "secret": pair.secret}


def batch_frames(device: str, seq: int, hidden_size: int, b: int = 2, t: int = 4) -> list:
    arrays = batch_arrays(np.ones((b, t, hidden_size), np.float16), np.ones((b, t), np.uint8), np.zeros(b),
                          np.arange(seq * b, seq * b + b))
    return encode(MsgType.BATCH, device, arrays, seq=seq, epoch=0)


class Plan:
    """A device's batch plan: ``n`` tiny batches of 2 samples."""

    def __init__(self, device: str, n: int, hidden_size: int):
        self.device, self.n, self.hidden_size = device, n, hidden_size

    def seqs(self) -> list[int]:
        return list(range(self.n))

    def make(self, seq: int) -> OutgoingBatch:
        return OutgoingBatch(seq, 2, batch_frames(self.device, seq, self.hidden_size))


def client(endpoint: str, device: str, sha: str, split: int, curve: dict | None, hello_timeout_s: float = 10.0) -> DeviceClient:
    return DeviceClient(ClientConfig(endpoint, device, sha, split, "fp32/any", wire_dtype="fp16", num_samples=8,
                                     hello_timeout_s=hello_timeout_s, curve=curve))


def stream(endpoint: str, device: str, sha: str, split: int, hidden_size: int, curve: dict) -> None:
    c = client(endpoint, device, sha, split, curve)
    c.connect()
    report = c.stream(Plan(device, 4, hidden_size))
    c.close()
    assert report.batches_acked == 4 and not report.rejected


class RawDevice:
    """A DEALER with CurveZMQ keys that sends whatever it is told to (an allow-listed device misbehaving)."""

    def __init__(self, endpoint: str, identity: str, curve: dict[str, bytes]):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.curve_serverkey, self.sock.curve_publickey = curve["server_public"], curve["public"]
        self.sock.curve_secretkey = curve["secret"]
        self.sock.connect(endpoint)

    def ask(self, frames) -> object:
        self.sock.send_multipart([bytes(f) for f in frames])
        assert self.sock.poll(3000), "no reply from the server"
        return decode_header(self.sock.recv_multipart()[0])

    def close(self) -> None:
        self.sock.close(0)


def hello(device: str, sha: str, split: int) -> list:
    return encode(MsgType.HELLO, device, manifest_sha256=sha, split=split, precision="fp32/any", wire_dtype="fp16")


# -- the link -------------------------------------------------------------------------------------
def test_allow_listed_devices_stream_over_curve(curve_server, keys):
    receiver, batches, manifest, sha, _ = curve_server
    assert receiver.sock.mechanism == zmq.CURVE
    for device in ("dev-a", "dev-b"):
        stream(receiver.endpoint, device, sha, manifest.split, manifest.hidden_size, curve_keys(keys, device))
    sessions = receiver.snapshot()
    assert {d: (sessions[d].batches, sessions[d].rejected) for d in ("dev-a", "dev-b")} == {"dev-a": (4, 0), "dev-b": (4, 0)}
    assert batches.qsize() == 8 and receiver.errors_sent == 0


def test_an_unknown_key_is_refused_clearly_and_others_keep_being_served(curve_server, keys, caplog):
    receiver, _, manifest, sha, link = curve_server
    stranger = client(receiver.endpoint, "stranger", sha, manifest.split, curve_keys(keys, "stranger"))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sftool.server"), pytest.raises(SftoolError, match="refused this device's key"):
        stranger.connect()
    assert time.monotonic() - started < 5, "the refusal must be reported at once, not after the HELLO timeout"
    assert "stranger" not in receiver.snapshot()  # never welcomed
    assert link.refused >= 1 and any("not on the allow-list" in r.getMessage() for r in caplog.records)
    stream(receiver.endpoint, "dev-a", sha, manifest.split, manifest.hidden_size, curve_keys(keys, "dev-a"))
    assert receiver.snapshot()["dev-a"].batches == 4


def test_a_device_without_keys_is_told_the_server_requires_them(curve_server):
    receiver, _, manifest, sha, _ = curve_server
    with pytest.raises(SftoolError, match="requires CurveZMQ"):
        client(receiver.endpoint, "dev-a", sha, manifest.split, None).connect()


def test_a_wrong_server_key_is_reported(curve_server, keys):
    receiver, _, manifest, sha, _ = curve_server
    wrong = {**curve_keys(keys, "dev-a"), "server_public": load_public_key(keys / "stranger.key")}
    with pytest.raises(SftoolError, match="--server-key"):
        client(receiver.endpoint, "dev-a", sha, manifest.split, wrong).connect()


def test_a_valid_key_cannot_speak_for_another_device(curve_server, keys):
    receiver, _, manifest, sha, _ = curve_server
    h = manifest.hidden_size
    victim = client(receiver.endpoint, "dev-a", sha, manifest.split, curve_keys(keys, "dev-a"))
    victim.connect()
    victim.stream(Plan("dev-a", 2, h))
    before = receiver.snapshot()["dev-a"]

    mallory = RawDevice(receiver.endpoint, "mallory", curve_keys(keys, "mallory"))
    try:
        for what, frames in (("take over", hello("dev-a", sha, manifest.split)),
                             ("send for", batch_frames("dev-a", 7, h)),
                             ("say BYE for", encode(MsgType.BYE, "dev-a", batches=0, samples=0))):
            reply = mallory.ask(frames)
            assert reply.type == MsgType.ERROR and reply.fields["code"] == ErrorCode.NOT_AUTHORIZED, what
        # Its own key still speaks for its own id.
        assert mallory.ask(hello("mallory", sha, manifest.split)).type == MsgType.WELCOME
    finally:
        mallory.close()

    after = receiver.snapshot()["dev-a"]
    assert (after.routing_id, after.said_bye, after.rejected, after.batches) == (before.routing_id, False, 0, 2)
    assert 7 not in after.seen
    victim.stream(Plan("dev-a", 4, h))  # the victim's session carries on: batches 2 and 3 are acknowledged
    victim.close()
    assert receiver.snapshot()["dev-a"].batches == 4


@pytest.mark.timeout(60)  # were the victim's replies taken, its stream would wait for them forever
def test_a_device_reusing_anothers_identity_cannot_take_its_replies_or_get_it_disconnected(curve_server, keys):
    receiver, _, manifest, sha, _ = curve_server
    h = manifest.hidden_size
    victim = client(receiver.endpoint, "dev-a", sha, manifest.split, curve_keys(keys, "dev-a"))
    victim.connect()
    victim.stream(Plan("dev-a", 2, h))
    # mallory's own key, dev-a's ZeroMQ identity: with keys the server lets no connection take over an
    # identity in use, so this connection never reaches it (or, were dev-a gone, gets NOT_AUTHORIZED).
    mallory = RawDevice(receiver.endpoint, "dev-a", curve_keys(keys, "mallory"))
    try:
        for _ in range(receiver.limits.max_strikes + 2):
            mallory.sock.send_multipart([bytes(f) for f in encode(MsgType.HEARTBEAT, "dev-a")])
        time.sleep(0.5)
    finally:
        mallory.close()
    session = receiver.snapshot()["dev-a"]
    assert session.state == "streaming" and session.rejected == 0
    victim.stream(Plan("dev-a", 4, h))  # its replies still reach it
    victim.close()
    assert receiver.snapshot()["dev-a"].batches == 4


# -- key files ------------------------------------------------------------------------------------
def test_keys_generate_writes_loadable_keys_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "keys"
    result = run_cli("keys", "generate", "--out", out)
    assert result.exit_code == 0, result.output
    pair = load_keypair(out / "server.key_secret")
    assert load_public_key(out / "server.key") == pair.public == zmq.curve_public(pair.secret)
    assert stat.S_IMODE((out / "server.key_secret").stat().st_mode) == 0o600
    assert zmq.auth.load_certificate(out / "server.key_secret") == (pair.public, pair.secret)  # pyzmq's format

    assert "already exists" in one_line_error(run_cli("keys", "generate", "--out", out))
    assert load_keypair(out / "server.key_secret") == pair  # untouched
    assert run_cli("keys", "generate", "--out", out, "--force").exit_code == 0
    assert load_keypair(out / "server.key_secret") != pair

    assert run_cli("keys", "generate", "--out", out, "--name", "board-1").exit_code == 0
    assert load_allow_list(_publics(out)).keys() == {"server", "board-1"}  # the public halves make an allow-list
    assert "key name" in one_line_error(run_cli("keys", "generate", "--out", out, "--name", "../escape"))


def _publics(folder: Path) -> Path:
    allow = folder.parent / "allow"
    allow.mkdir(exist_ok=True)
    for p in folder.glob("*.key"):
        shutil.copy(p, allow / p.name)
    return allow


def test_key_file_mistakes_are_one_line_errors(keys, tmp_path):
    with pytest.raises(SftoolError, match="no such key file"):
        load_keypair(tmp_path / "missing.key_secret")
    with pytest.raises(SftoolError, match="holds no secret key"):
        load_keypair(keys / "dev-a.key")
    bad = tmp_path / "bad.key"
    bad.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(SftoolError, match="40 Z85 characters"):
        load_public_key(bad)
    mixed = tmp_path / "mixed.key_secret"
    secret_line = next(line for line in (keys / "dev-b.key_secret").read_text().splitlines() if "secret-key" in line)
    mixed.write_text((keys / "dev-a.key").read_text() + secret_line + "\n")
    with pytest.raises(SftoolError, match="does not belong"):
        load_keypair(mixed)


@pytest.mark.parametrize("setup, message", [
    (lambda d, keys: None, "does not exist"),
    (lambda d, keys: d.mkdir(), "holds no DEVICE_ID.key"),
    (lambda d, keys: (d.mkdir(), shutil.copy(keys / "dev-a.key_secret", d)), "secret keys"),
    (lambda d, keys: (d.mkdir(), shutil.copy(keys / "dev-a.key", d / "x.key"), shutil.copy(keys / "dev-a.key", d / "y.key")), "same key"),
    (lambda d, keys: (d.mkdir(), (d / "bad.key").write_text("public-key = \"~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~\"\n")), "not valid Z85"),
])
def test_allow_list_mistakes_are_one_line_errors(keys, tmp_path, setup, message):
    folder = tmp_path / "allow"
    setup(folder, keys)
    with pytest.raises(SftoolError, match=message):
        load_allow_list(folder)


def test_allow_list_binds_file_names_to_keys(keys):
    assert load_allow_list(keys / "allow") == {name: load_public_key(keys / f"{name}.key").decode() for name in ALLOWED}


# -- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:0", True), ("tcp://[::1]:5555", True), ("tcp://127.0.0.2:1", True),
    ("ipc:///tmp/sftool.sock", True), ("inproc://x", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
    ("tcp://10.1.2.3:5555", False), ("tcp://trainer.example:5555", False), ("tcp://[::]:5555", False),
])
def test_loopback_endpoints(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_plain_links_beyond_loopback_need_insecure(tmp_path, keys):
    artifacts, data = tmp_path / "artifacts", tmp_path / "d.jsonl"
    serve = ("serve", "--model", "m", "--artifacts", artifacts, "--out", tmp_path / "run")
    err = one_line_error(run_cli(*serve, "--bind", "tcp://0.0.0.0:5555"))
    assert "--insecure" in err and "--curve-secret" in err
    # With --insecure the endpoint is accepted and the run fails later, on the missing artifacts.
    assert "--insecure" not in one_line_error(run_cli(*serve, "--bind", "tcp://0.0.0.0:5555", "--insecure"))
    assert "go together" in one_line_error(run_cli(*serve, "--curve-secret", keys / "server.key_secret"))

    device = ("device", "--artifacts", artifacts, "--data", data, "--device-id", "d")
    err = one_line_error(run_cli(*device, "--connect", "tcp://192.0.2.1:5555"))
    assert "--insecure" in err and "--server-key" in err
    assert "go together" in one_line_error(run_cli(*device, "--connect", "tcp://192.0.2.1:5555", "--server-key", keys / "server.key"))
    err = one_line_error(run_cli(*device, "--connect", "tcp://192.0.2.1:5555", "--server-key", keys / "server.key",
                                 "--device-key", keys / "dev-a.key"))
    assert "holds no secret key" in err


def test_run_config_keeps_the_link_settings(tmp_path):
    opts = ServeOptions(source="m", artifacts=[Path("a")], out=tmp_path, curve_secret=Path("k/server.key_secret"),
                        allow_keys=Path("k/allow"), insecure=True)
    write_run_config(tmp_path, opts)
    back = load_run_config(tmp_path / RUN_CONFIG, ServeOptions(source="", artifacts=[]))
    assert (back.curve_secret, back.allow_keys, back.insecure) == (opts.curve_secret, opts.allow_keys, True)
