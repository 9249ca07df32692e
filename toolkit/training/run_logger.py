"""Where a run's numbers go: ``metrics.jsonl`` (one line per step, one per evaluation) and
TensorBoard event files beside it. Only rank 0 writes; other ranks get a logger that discards."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from sftool.runtime.files import atomic_write_text
from sftool.server.trainer import StepResult
from sftool.training.ledger import SampleKey

log = logging.getLogger("sftool.server")
METRICS = "metrics.jsonl"


class RunLogger:
    """Appends step and evaluation records to ``folder/metrics.jsonl`` and TensorBoard."""

    def __init__(self, folder: Path, log_samples: bool = False, enabled: bool = True):
        self.folder = Path(folder)
        self.log_samples = log_samples
        self.enabled = enabled
        self._metrics = open(self.folder / METRICS, "a", buffering=1) if enabled else None
        self._tensorboard = _tensorboard_writer(self.folder / "tensorboard") if enabled else None

    def step(self, result: StepResult, samples: Iterable[SampleKey], extra: dict[str, float] | None = None) -> None:
        """One training step; with ``log_samples`` also which (device, epoch, id) it trained."""
        if not self.enabled:
            return
        record = {"time": time.time(), **asdict(result)}
        if self.log_samples:
            record["samples"] = [[k.device, k.epoch, k.sample_id] for k in samples]
        self._metrics.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("train/loss", result.loss, result.step)
            self._tensorboard.add_scalar("train/accuracy", result.correct / max(result.items, 1), result.step)
            for name, value in (extra or {}).items():
                self._tensorboard.add_scalar(f"train/{name}", value, result.step)

    def refused(self, result: StepResult, samples: Iterable[SampleKey]) -> None:
        """A step that was not applied (loss or gradients not finite), and which devices' samples it had."""
        if not self.enabled:
            return
        devices = sorted({k.device for k in samples})
        self._metrics.write(json.dumps({"time": time.time(), "refused_step": {
            "step": result.step, "loss": result.loss, "size": result.size, "devices": devices}}) + "\n")

    def evaluation(self, result: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"time": time.time(), "eval": result}) + "\n")
        if self._tensorboard is not None:
            for name in ("accuracy", "loss"):
                self._tensorboard.add_scalar(f"eval/{name}", result[name], result["step"])

    def rewind(self, step: int) -> None:
        """Forget the records after ``step``: a resumed run redoes those steps."""
        if not self.enabled:
            return
        self._metrics.close()
        _truncate_metrics(self.folder / METRICS, step)
        self._metrics = open(self.folder / METRICS, "a", buffering=1)
        if self._tensorboard is not None:  # hide the undone steps in TensorBoard too
            self._tensorboard.close()
            self._tensorboard = _tensorboard_writer(self.folder / "tensorboard", purge_step=step + 1)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(folder: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl (steps and evaluations), in order."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tensorboard_writer(folder: Path, purge_step: int | None = None):
    """TensorBoard event files beside metrics.jsonl (None if tensorboardX is not installed)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(folder), purge_step=purge_step, flush_secs=10)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines newer than the checkpoint: those steps are undone by resuming."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        at = record.get("step", record.get("eval", record.get("refused_step", {})).get("step", 0))
        if at <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
