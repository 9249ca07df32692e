"""FedLoRA: every device holds the whole model with LoRA on every block and trains it locally.

FedAvg over the adapters: in each round every device starts from the global adapter (LoRA factors
+ head), takes ``local_steps`` steps on its own shard, and the server averages the devices'
adapters weighted by their shard sizes (FedAvg's n_k / n). The average is over A and B
separately, so mean(B)·mean(A) is not the mean of the devices' B·A updates; ``ffa=True`` is
FFA-LoRA, which freezes every A at the shared initial value and trains B (and the head) only, so
the averaged adapter is exactly the average of the devices' models. AdamW moments start afresh
each round (a client has no optimizer state from a model it has not seen).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sftool.server.split_model import SplitServerModel
from sftool.server.trainer import OptimSettings, StepResult, Trainer
from sftool.training.methods.base import MethodBase
from sftool.training.methods.device_side import DeviceStates, fedavg
from sftool.training.sources import TokenBatch


class FedLoRA(MethodBase):
    name = "fedlora"

    def __init__(self, model: SplitServerModel, settings: OptimSettings, shard_sizes: dict[str, int],
                 local_steps: int = 10, ffa: bool = False):
        if ffa:
            for n, p in model.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(False)
            self.name = "ffa"
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainer = Trainer(model, settings, params=params)
        self.clients = DeviceStates(params, sorted(shard_sizes))
        self.global_state = self.clients.snapshot()
        self.shard_sizes = shard_sizes
        self.local_steps = local_steps
        self.round_steps = local_steps * len(shard_sizes)
        self._client: str | None = None
        self._trained: set[str] = set()
        self.rounds = 0
        self.device_s = 0.0
        self.bytes_up = 0
        self.bytes_down = 0

    def _switch(self, device: str) -> None:
        if self._client is not None:
            self.clients.store(self._client)
            self._trained.add(self._client)
            self.bytes_up += self.clients.nbytes
        self.clients.load(self.global_state)
        self.trainer.optim.reset_moments()
        self.bytes_down += self.clients.nbytes
        self._client = device

    def step(self, batch: TokenBatch) -> StepResult:
        if batch.device != self._client:
            self._switch(batch.device)
        batch = batch.to(self.model.device)
        t0 = time.perf_counter()
        result = self.trainer.step_with(lambda: self.model.full_forward(batch.input_ids, batch.attention_mask), batch.labels)
        result.device_s = time.perf_counter() - t0  # the whole step runs on the device
        self.device_s += result.device_s
        return result

    def after_step(self, result: StepResult) -> None:
        if result.step % self.round_steps == 0:
            self.aggregate()

    def aggregate(self) -> None:
        """End the round: FedAvg of the adapters of the devices that trained in it."""
        if self._client is None:
            return
        self.clients.store(self._client)
        self._trained.add(self._client)
        self.bytes_up += self.clients.nbytes
        names = sorted(self._trained)
        states = [self.clients.states[d] for d in names]
        self.global_state = fedavg(states, [self.shard_sizes[d] for d in names])
        self.clients.load(self.global_state)
        self._client, self._trained = None, set()
        self.rounds += 1

    def finish(self) -> None:
        self.aggregate()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The global model's logits; a client in the middle of its local steps is left as it was."""
        current = self.clients.snapshot()
        self.clients.load(self.global_state)
        try:
            return self.model.full_forward(input_ids, attention_mask)
        finally:
            self.clients.load(current)

    def save_adapter(self, folder: Path) -> None:
        self.clients.load(self.global_state)
        self.model.save_adapter(folder)
