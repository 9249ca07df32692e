"""Centralized LoRA on the pooled data: the ceiling the federated methods are measured against.

The whole model runs on the server; LoRA sits on the server blocks only (what SplitFrozen trains)
or on every block (what SplitLoRA and FedLoRA train), chosen by the model's ``lora_layers``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sftool.server.split_model import SplitServerModel
from sftool.server.trainer import OptimSettings, StepResult, Trainer
from sftool.training.distributed import SINGLE, RankGroup
from sftool.training.methods.base import MethodBase
from sftool.training.sources import TokenBatch


class Centralized(MethodBase):
    name = "centralized"

    def __init__(self, model: SplitServerModel, settings: OptimSettings, ranks: RankGroup = SINGLE):
        self.model = model
        self.trainer = Trainer(model, settings, ranks=ranks)
        self.device_s = 0.0
        self.bytes_up = 0
        self.bytes_down = 0

    def step(self, batch: TokenBatch) -> StepResult:
        batch = batch.to(self.model.device)
        return self.trainer.step_with(lambda: self.model.full_forward(batch.input_ids, batch.attention_mask), batch.labels)

    def idle_step(self) -> StepResult | None:
        return self.trainer.idle_step()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.full_forward(input_ids, attention_mask)

    def save_adapter(self, folder: Path) -> None:
        self.model.save_adapter(folder)
