"""Small file and socket helpers shared by the device, the server and the tools (torch-free)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (for loopback servers in tools and tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_json(path: Path | str, data: Any) -> Path:
    """``data`` as indented JSON at ``path`` (folders made, written atomically); values JSON does not know
    (paths, numpy scalars) are written as their str."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def proc_status_mb(key: str, pid: int | str = "self") -> float:
    """A memory figure of this process (or ``pid``) from /proc/PID/status in MB (``VmRSS``, ``VmHWM`` =
    peak RSS); NaN where there is no /proc."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_name() -> str:
    """The processor's model name (what a timing holds for), e.g. 'AMD EPYC 9B14'; the architecture if unknown."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
