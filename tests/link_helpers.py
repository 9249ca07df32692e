"""A raw device for receiver tests: a DEALER on loopback that sends whatever frames it is given."""

from __future__ import annotations

import zmq
from sftool.runtime.protocol import decode_header


class RawDevice:
    """Sends frames as they are and decodes the server's replies (no client logic in between)."""

    def __init__(self, endpoint: str, name: str):
        self.name = name
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames) -> None:
        self.sock.send_multipart([bytes(f) for f in frames])

    def recv(self, timeout_ms: int = 3000):
        assert self.sock.poll(timeout_ms), "no reply from the server"
        return decode_header(self.sock.recv_multipart()[0])
