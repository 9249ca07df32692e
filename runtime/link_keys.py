"""CurveZMQ key files for the device-server link (torch-free: pyzmq only).

A key pair is two files in the format of ``zmq.auth.create_certificates`` (czmq's): ``NAME.key``
holds the public key and may be copied anywhere; ``NAME.key_secret`` holds the secret key (and
the public one) and is written readable by its owner only. The server's allow-list is a folder of
device public keys, one ``DEVICE_ID.key`` per device: the file name binds the key to the device id.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from sftool.errors import SftoolError
from sftool.runtime.protocol import MAX_DEVICE_ID_LEN
from zmq.utils import z85

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: A key name is a file stem and (in an allow-list) a device id: no path separators, no leading dot.
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_DEVICE_ID_LEN - 1}}}")
_Z85_KEY_LEN = 40  # 32 bytes in Z85
_LOCAL_HOSTS = {"localhost"}

log = logging.getLogger("sftool.keys")


@dataclass(frozen=True)
class KeyPair:
    """A CurveZMQ key pair, both keys Z85-encoded (what pyzmq's curve socket options take)."""

    public: bytes
    secret: bytes


def check_key_name(name: str) -> str:
    """``name`` if it can name key files (and a device id): letters, digits, ``._-``, 1-64 characters."""
    if not _NAME.fullmatch(name):
        raise SftoolError(
            f"key name {name!r} must be 1-{MAX_DEVICE_ID_LEN} letters, digits, '.', '_' or '-' (not starting with '.' or '-')"
        )
    return name


def generate_keypair(folder: Path, name: str = "server", force: bool = False) -> tuple[Path, Path]:
    """Write a new key pair as ``folder/NAME.key`` and ``folder/NAME.key_secret`` (mode 0600).

    An existing pair is never replaced unless ``force``: a replaced secret locks out every peer
    that holds the old public key. Returns the (public, secret) file paths.
    """
    check_key_name(name)
    folder = Path(folder)
    public_file, secret_file = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    if not force:
        for existing in (secret_file, public_file):
            if existing.exists():
                raise SftoolError(f"{existing} already exists; use --force to replace the key pair {name!r}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.curve_keypair()
        # The secret first and never readable by others, not even for a moment.
        _write_private(secret_file, _key_file_text("Secret", public, secret))
        _write_public(public_file, _key_file_text("Public", public))
    except OSError as exc:
        raise SftoolError(f"cannot write keys into {folder}: {exc.strerror}") from None
    return public_file, secret_file


def load_public_key(path: Path) -> bytes:
    """The Z85 public key in a ``NAME.key`` (or ``NAME.key_secret``) file."""
    public, _ = _read_key_file(Path(path))
    if public is None:
        raise SftoolError(f"{path} holds no public-key entry (expected a NAME.key file from `sftool keys generate`)")
    return public


def load_keypair(path: Path) -> KeyPair:
    """The key pair of a ``NAME.key_secret`` file; its public key from the file itself or the sibling ``NAME.key``."""
    path = Path(path)
    public, secret = _read_key_file(path)
    if secret is None:
        raise SftoolError(f"{path} holds no secret key (give the NAME{SECRET_SUFFIX} file, not the public NAME{PUBLIC_SUFFIX})")
    derived = zmq.curve_public(secret)
    if public is None:
        sibling = path.with_suffix(PUBLIC_SUFFIX)
        public = load_public_key(sibling) if sibling.is_file() else derived
    if public != derived:
        raise SftoolError(f"{path}: the public key does not belong to the secret key (the files are from different pairs)")
    _warn_if_readable_by_others(path)
    return KeyPair(public, secret)


def load_allow_list(folder: Path) -> dict[str, str]:
    """The device keys a server accepts: ``{device id: Z85 public key}`` from ``folder/DEVICE_ID.key``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SftoolError(f"allow-list folder {folder} does not exist (put each device's DEVICE_ID{PUBLIC_SUFFIX} there)")
    secrets = sorted(p.name for p in folder.glob(f"*{SECRET_SUFFIX}"))
    if secrets:
        raise SftoolError(f"{folder} holds secret keys ({', '.join(secrets)}): the allow-list takes public {PUBLIC_SUFFIX} files only")
    keys: dict[str, str] = {}
    owners: dict[str, str] = {}
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        device = path.name[: -len(PUBLIC_SUFFIX)]
        try:
            check_key_name(device)
        except SftoolError:
            raise SftoolError(f"{path}: the file name must be a device id (letters, digits, '._-', 1-{MAX_DEVICE_ID_LEN})") from None
        key = load_public_key(path).decode("ascii")
        if key in owners:
            # One key for two ids would let either device speak for the other.
            raise SftoolError(f"{folder}: {owners[key]}{PUBLIC_SUFFIX} and {path.name} hold the same key; give every device its own")
        owners[key] = device
        keys[device] = key
    if not keys:
        raise SftoolError(f"allow-list folder {folder} holds no DEVICE_ID{PUBLIC_SUFFIX} files")
    return keys


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints that never leave this machine: ipc://, inproc://, and TCP on a loopback address."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp" or not rest:
        return False
    host = rest.rsplit(";", 1)[-1].rsplit(":", 1)[0].strip("[]")  # "src;dest", "[::1]:5555"
    if host.lower() in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: may reach the network
        return False


def check_plain_endpoint(endpoint: str, curve: bool, insecure: bool, curve_flags: str) -> None:
    """Unencrypted traffic beyond this machine must be asked for: with neither CurveZMQ nor
    ``--insecure`` a non-loopback endpoint is a one-line error naming ``curve_flags``."""
    if curve or insecure or is_local_endpoint(endpoint):
        return
    raise SftoolError(
        f"{endpoint} is not a loopback address and the link would be unauthenticated plain text: "
        f"give {curve_flags} (see `sftool keys generate`), or --insecure to allow it"
    )


# -- file format -------------------------------------------------------------------------------
def _key_file_text(kind: str, public: bytes, secret: bytes | None = None) -> str:
    """The text of a czmq/pyzmq certificate file (``zmq.auth.load_certificate`` reads it too)."""
    lines = [
        f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by sftool  ****",
        f"#   ZeroMQ CURVE {kind} Certificate",
        "#   Keep it private: readable by its owner only." if secret else "#   May be copied to the peers that must accept this key.",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_key_file(path: Path) -> tuple[bytes | None, bytes | None]:
    """(public, secret) Z85 keys of a certificate file, None where absent; malformed files are errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SftoolError(f"no such key file: {path}") from None
    except IsADirectoryError:
        raise SftoolError(f"{path} is a folder, not a key file") from None
    except UnicodeDecodeError:
        raise SftoolError(f"{path} is not a key file (not text)") from None
    except OSError as exc:
        raise SftoolError(f"cannot read {path}: {exc.strerror}") from None
    found: dict[str, bytes] = {}
    for line in text.splitlines():
        name, eq, value = line.strip().partition("=")
        name = name.strip()
        if eq and name in ("public-key", "secret-key"):
            found[name] = _z85_key(value.strip().strip("'\""), path, name)
    return found.get("public-key"), found.get("secret-key")


def _z85_key(value: str, path: Path, what: str) -> bytes:
    if len(value) != _Z85_KEY_LEN:
        raise SftoolError(f"{path}: {what} must be {_Z85_KEY_LEN} Z85 characters, not {len(value)}")
    try:
        z85.decode(value)
    except (ValueError, KeyError, UnicodeError):
        raise SftoolError(f"{path}: {what} is not valid Z85") from None
    return value.encode("ascii")


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; make it private: chmod 600 %s", path, path)
