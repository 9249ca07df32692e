"""Checkpoints of a training run: adapter + head, optimizer, scheduler, RNG and progress.

Layout inside the run folder::

    checkpoints/step-00000120/adapter/        peft save (usable on its own)
    checkpoints/step-00000120/trainer.pt      optimizer, scheduler, RNG states (tensors + plain data)
    checkpoints/step-00000120/progress.json   what is trained, per device and epoch
    checkpoints/LATEST                         name of the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete, and LATEST is
replaced atomically after that, so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sftool.errors import SftoolError
from sftool.runtime.files import atomic_write_text
from sftool.server.accelerator import rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
KEEP = 2


@dataclass
class TrainingProgress:
    """What has been trained. Sample keys are (epoch, sample id) per device: after a restart the
    devices resend what was not trained and the trainer skips any sample already in here."""

    step: int = 0
    samples_trained: int = 0
    #: Samples whose step was refused (not finite): settled in the ledger, never trained.
    samples_refused: int = 0
    refused_by_device: dict[str, int] = field(default_factory=dict)
    trained: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # device -> epoch -> ids
    done_seqs: dict[str, list[list[int]]] = field(default_factory=dict)  # device -> [start, end) ranges
    finished_devices: list[str] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(run_dir: Path, model, trainer, mixing_rng: random.Random, progress: TrainingProgress) -> Path:
    """Write a complete checkpoint and point LATEST at it; keep the newest ``KEEP``."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress.step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_adapter(tmp / "adapter")
    torch.save(
        {
            "trainer": trainer.state_dict(),
            **rng_state(),
            "mixing_rng": mixing_rng.getstate(),
        },
        tmp / "trainer.pt",
    )
    (tmp / "progress.json").write_text(json.dumps(asdict(progress)) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        raise SftoolError(f"{run_dir} has no checkpoint to resume from") from None
    folder = root / name
    if not folder.is_dir():
        raise SftoolError(f"{folder} named by {root / LATEST} is missing")
    return folder


def adapter_weights_file(adapter_folder: Path) -> Path:
    """The saved adapter's weights file in ``adapter_folder``; SftoolError if there is none."""
    weights_file = Path(adapter_folder) / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise SftoolError(f"{adapter_folder} holds no trained adapter")
    return weights_file


def load_adapter_weights(model, adapter_folder: Path) -> None:
    """Load a saved adapter (LoRA + head, peft format) into ``model.peft_model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_file = adapter_weights_file(adapter_folder)
    result = set_peft_model_state_dict(model.peft_model, load_file(str(weights_file)))
    if getattr(result, "unexpected_keys", None):
        raise SftoolError(f"{weights_file} does not fit this model ({len(result.unexpected_keys)} unexpected keys)")


def load_checkpoint(folder: Path, model, trainer, mixing_rng: random.Random) -> TrainingProgress:
    """Restore model, optimizer, scheduler and RNG from ``folder``; return its progress."""
    load_adapter_weights(model, folder / "adapter")
    # On the CPU first: optimizer state follows its parameters' device when loaded, wherever it was saved.
    state = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
    trainer.load_state_dict(state["trainer"])
    set_rng_state(state)
    mixing_rng.setstate(_as_tuples(state["mixing_rng"]))
    return TrainingProgress(**json.loads((folder / "progress.json").read_text()))


def _as_tuples(value):
    # random.Random.setstate wants tuples; serialization may hand back lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
