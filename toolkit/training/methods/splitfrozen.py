"""SplitFrozen: devices run the frozen layers forward only; the server trains LoRA on the rest.

The method's step is the server's step on a mixed batch of activations. Where the activations
come from — devices streaming over ZeroMQ, or devices simulated in this process on the exported
ONNX — is the batch source's business (``sftool.training.sources``); the step is the same.
"""

from __future__ import annotations

from pathlib import Path

from sftool.server.mixing import TrainBatch
from sftool.server.split_model import SplitServerModel
from sftool.server.trainer import StepResult, Trainer
from sftool.training.methods.base import MethodBase


class SplitFrozen(MethodBase):
    name = "splitfrozen"

    def __init__(self, model: SplitServerModel, trainer: Trainer):
        self.model = model
        self.trainer = trainer

    def step(self, batch: TrainBatch) -> StepResult:
        return self.trainer.step(batch)

    def idle_step(self) -> StepResult | None:
        return self.trainer.idle_step()

    def save_adapter(self, folder: Path) -> None:
        self.model.save_adapter(folder)
