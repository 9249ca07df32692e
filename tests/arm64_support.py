"""Run the device runtime as ARM64 under QEMU user-mode emulation (a helper module, not a test file).

``arm64_python(project_root)`` runs ``scripts/arm64_sysroot.sh --project <project_root>`` once per test
session (the script caches the sysroot and wheels itself; the project wheel is rebuilt so the tests see
the current code) and returns the command prefix of the emulated aarch64 CPython 3.11, e.g.
``[".../bin/python-arm64"]``; or ``None`` when this machine cannot do it, with the reason given by
``arm64_unavailable_reason()``. Typical use::

    from arm64_support import arm64_python, arm64_unavailable_reason

    def test_runtime_on_arm64():
        cmd = arm64_python(PROJECT_ROOT)
        if cmd is None:
            pytest.skip(arm64_unavailable_reason())
        subprocess.run([*cmd, "-c", "import sftool.runtime"], check=True)

Notes for callers: emulated compute is ~300x slower than native (tiny models only); the emulated
process can fork but cannot exec another aarch64 program (no binfmt_misc), so no ``subprocess`` of
``sys.executable`` and no multiprocessing "spawn" inside it. Extra import paths go in the environment
variable ``SFTOOL_ARM64_EXTRA_PATH`` (prepended to the emulated PYTHONPATH). Set ``SFTOOL_ARM64=0`` to
turn the ARM64 tests off.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["arm64_python", "arm64_unavailable_reason"]

# Building from scratch takes ~25 s on a fast network; leave room for slow mirrors.
_BUILD_TIMEOUT_S = 1800

# (command prefix, reason): computed once per process, i.e. once per test session (per xdist worker;
# the script serialises concurrent builds with a lock file).
_result: tuple[list[str] | None, str | None] | None = None


def _precheck() -> str | None:
    """Why this host cannot run the emulated ARM64 python at all (None when it can try)."""
    if os.environ.get("SFTOOL_ARM64", "").strip().lower() in {"0", "false", "no", "off"}:
        return "ARM64 emulation turned off (SFTOOL_ARM64=0)"
    if not sys.platform.startswith("linux"):
        return f"ARM64 emulation needs a Linux host (QEMU user mode); this is {sys.platform}"
    machine = platform.machine().lower()
    if machine in {"aarch64", "arm64"}:
        return "native aarch64 host: run the regular tests"
    if machine not in {"x86_64", "amd64"}:
        return f"ARM64 emulation is only set up for x86_64 hosts; this is {machine}"
    if shutil.which("bash") is None:
        return "bash is not installed"
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        return "needs a Debian/Ubuntu host (apt-get and dpkg-deb build the aarch64 sysroot)"
    if shutil.which("qemu-aarch64-static") is None:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        if not is_root and not _passwordless_sudo():
            return "qemu-aarch64-static is missing and this user cannot install it (apt-get install qemu-user-static)"
    return None


def _passwordless_sudo() -> bool:
    if shutil.which("sudo") is None:
        return False
    try:
        return subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _build(project_root: Path) -> tuple[list[str] | None, str | None]:
    reason = _precheck()
    if reason is not None:
        return None, reason
    script = project_root / "scripts" / "arm64_sysroot.sh"
    if not script.is_file():
        return None, f"{script} not found"
    try:
        proc = subprocess.run(
            ["bash", str(script), "--project", str(project_root)],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return None, f"{script.name} did not finish within {_BUILD_TIMEOUT_S} s"
    except OSError as exc:
        return None, f"could not run {script.name}: {exc}"
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        return None, f"{script.name} failed (exit {proc.returncode}):\n{tail}"
    wrapper = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("SFTOOL_ARM64_PYTHON="):
            wrapper = Path(line.split("=", 1)[1].strip())
            break
    if wrapper is None or not os.access(wrapper, os.X_OK):
        return None, f"{script.name} succeeded but reported no runnable wrapper (stdout: {proc.stdout[-500:]!r})"
    return [str(wrapper)], None


def arm64_python(project_root: Path) -> list[str] | None:
    """Command prefix that runs the emulated aarch64 python (with the project installed), or None.

    The first call in a process builds/refreshes the environment (seconds when cached); later calls
    return the cached answer, whatever ``project_root`` they pass.
    """
    global _result
    if _result is None:
        _result = _build(Path(project_root).resolve())
    cmd, _ = _result
    return list(cmd) if cmd is not None else None


def arm64_unavailable_reason() -> str | None:
    """Why ``arm64_python`` returned None; None if it has not been called or the environment is ready."""
    if _result is None:
        return None
    return _result[1]
