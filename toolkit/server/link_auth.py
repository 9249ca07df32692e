"""CurveZMQ on the server side: the server's key pair, the allow-list of device keys, and a ZAP
handler that lets only allow-listed keys complete the handshake.

The receiver's socket lives on a context of this object's own: ZAP handlers are per context, and
one registered on the shared ``zmq.Context.instance()`` would also judge unrelated sockets there.
The handler puts each client's Z85 public key in the ZAP User-Id; the receiver checks it against
the key bound to the device id each message names (``Receiver.device_keys``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from sftool.errors import SftoolError
from sftool.runtime.link_keys import KeyPair, check_plain_endpoint, load_allow_list, load_keypair
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("sftool.server")

#: A refused key is logged at most this often: a misconfigured device retries every few hundred ms.
REFUSAL_LOG_EVERY_S = 60.0
_MAX_REMEMBERED_REFUSALS = 1024
CURVE_FLAGS = "--curve-secret FILE and --allow-keys DIR"


class _AllowListAuthenticator(ThreadAuthenticator):
    """A ZAP handler (its own thread) that accepts CURVE clients whose key is on the allow-list."""

    def __init__(self, context: zmq.Context, allowed: set[bytes], on_refused):
        super().__init__(context)
        self._keys = allowed  # not `_allowed`: the base class keeps its address allow-list there
        self._on_refused = on_refused
        self._address = "an unknown address"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The key callback is not told where the client connects from; remember it for the log.
        # One request at a time runs on the handler thread, so this cannot mix up two clients.
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "an unknown address"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """``configure_curve_callback`` provider: is this Z85 client key allow-listed?"""
        if key in self._keys:
            return True
        self._on_refused(key.decode("ascii", "replace"), self._address)
        return False


@dataclass
class LinkAuth:
    """The server's side of CurveZMQ for one run: ``start()`` before the receiver binds, ``stop()`` after it closed."""

    keys: KeyPair
    #: device id -> Z85 public key, for ``Receiver(device_keys=...)``.
    device_keys: dict[str, str]
    context: zmq.Context | None = None
    refused: int = 0
    _authenticator: _AllowListAuthenticator | None = None
    _last_logged: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_files(cls, secret_file: Path, allow_dir: Path) -> LinkAuth:
        """Load the server's key pair and the allow-list (errors are one line, nothing started yet)."""
        return cls(load_keypair(secret_file), load_allow_list(allow_dir))

    def start(self) -> None:
        """Start the ZAP handler on a fresh context; the receiver must be built on ``self.context``."""
        self.context = zmq.Context()
        allowed = {key.encode("ascii") for key in self.device_keys.values()}
        self._authenticator = _AllowListAuthenticator(self.context, allowed, self._log_refusal)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(domain="*", credentials_provider=self._authenticator)

    def receiver_options(self) -> dict[str, Any]:
        """The ``Receiver`` keyword arguments that put its socket under this authentication."""
        if self.context is None:
            raise RuntimeError("LinkAuth.start() must run before the receiver is built")
        return {
            "context": self.context,
            "curve": {"secret": self.keys.secret, "public": self.keys.public},
            "device_keys": dict(self.device_keys),
        }

    def stop(self) -> None:
        """Stop the ZAP handler and release the context (closing a socket left open on it)."""
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self.context is not None:
            self.context.destroy(linger=0)
            self.context = None

    def _log_refusal(self, key: str, address: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_logged.get(key, float("-inf")) < REFUSAL_LOG_EVERY_S:
            return
        if len(self._last_logged) >= _MAX_REMEMBERED_REFUSALS:  # random keys must not grow memory
            self._last_logged.clear()
        self._last_logged[key] = now
        log.warning("refused a connection from %s: its key %s is not on the allow-list", address, key)


def link_auth_for(bind: str, curve_secret: Path | None, allow_keys: Path | None, insecure: bool) -> LinkAuth | None:
    """The run's CurveZMQ setup from its options, or None for a plain link (allowed on loopback or with ``insecure``)."""
    if (curve_secret is None) != (allow_keys is None):
        raise SftoolError("--curve-secret and --allow-keys go together: give both (CurveZMQ) or neither")
    check_plain_endpoint(bind, curve_secret is not None, insecure, CURVE_FLAGS)
    if curve_secret is None:
        return None
    return LinkAuth.from_files(Path(curve_secret), Path(allow_keys))
