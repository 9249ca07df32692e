"""Run the real `sftool` CLI, in-process (fast) or as a subprocess (for isolation and exit codes)."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from pathlib import Path

from sftool.cli import app
from typer.testing import CliRunner

SFTOOL = [sys.executable, "-m", "sftool.cli"]


def run_cli(*args: str):
    """In-process run; returns the click Result (exit_code, output)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def _default_sigint() -> None:
    # A test run started in the background by a non-interactive shell inherits SIGINT as ignored,
    # and Python then never raises KeyboardInterrupt: give children the normal Ctrl-C behaviour.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: Every child started by ``spawn``; any still running when the test session ends is killed (a device
#: retries until stopped, so one whose test failed before its server came up would live on).
_SPAWNED: list[subprocess.Popen] = []


def _kill_leftovers() -> None:
    for proc in _SPAWNED:
        if proc.poll() is None:
            proc.kill()


atexit.register(_kill_leftovers)


def spawn(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """`sftool ARGS...` as a child process with captured output."""
    proc = subprocess.Popen(
        [*SFTOOL, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=_default_sigint,
        **kwargs,
    )
    _SPAWNED.append(proc)
    return proc


def torch_blocked_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing torch, transformers, peft or optimum raises ImportError."""
    site = tmp_path / "block_heavy"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "BLOCKED = ('torch', 'transformers', 'peft', 'optimum')\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is blocked: the device runtime must not import it')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def one_line_error(result) -> str:
    """Assert a CLI result is a user error: exit code 2, exactly one `error:` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]
