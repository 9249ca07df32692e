"""The run folder: one definition of what a training run leaves on disk, for every command.

    RUN/run.json        the run record: source, artifacts, labels, method, the options it started with
    RUN/run.toml        the same options as a run configuration a user can edit and start again
    RUN/adapter/        peft adapter (LoRA + head), loadable on the unsplit model
    RUN/metrics.jsonl   one line per step, one per evaluation (``sftool.training.run_logger``)
    RUN/tensorboard/    event files
    RUN/checkpoints/    ``sftool.server.checkpoint``
    RUN/summary.json    how the run ended, what it trained, per device

Torch-free, so the exporters and the CLI read run folders without the server's modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftool.errors import SftoolError
from sftool.runtime.files import atomic_write_text

RUN_RECORD = "run.json"
SUMMARY = "summary.json"
ADAPTER = "adapter"


def write_json(path: Path, data: dict) -> None:
    """Pretty, sorted, atomic: a reader never sees half a file."""
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's run.json: source, artifacts, labels and the options it was started with."""
    try:
        return json.loads((Path(run_dir) / RUN_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        raise SftoolError(f"{run_dir} is not an sftool run folder (no readable {RUN_RECORD})") from None


def write_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RUN_RECORD, record)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        raise SftoolError(f"{run_dir} has no readable {SUMMARY} (the run has not ended)") from None
