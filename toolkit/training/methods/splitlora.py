"""SplitLoRA (split federated learning with LoRA): devices train LoRA on their blocks too.

As in the SplitLoRA reference: each device holds embeddings + blocks 0..k-1 with its own LoRA; one
server model (blocks k..L-1 with LoRA + head) is shared by all devices, which take turns. A step:
the device's forward gives the cut activations; the server's forward and backward give its
update and the gradient at the cut, which goes back to the device; the device backpropagates it
through its blocks and updates its own LoRA. Every ``aggregate_every`` steps (reference: 100) the
devices' LoRA factors are averaged (FedAvg over A and B; the reference takes the plain mean,
``weighted=True`` weighs by shard size) and every device continues from the average. AdamW
moments are kept across averaging, as in the reference.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sftool.server.split_model import SplitServerModel
from sftool.server.trainer import Optimizer, OptimSettings, StepResult, Trainer
from sftool.training.methods.base import MethodBase
from sftool.training.methods.device_side import DeviceStates, layer_of
from sftool.training.sources import TokenBatch


class SplitLoRA(MethodBase):
    name = "splitlora"

    def __init__(self, model: SplitServerModel, split: int, settings: OptimSettings, shard_sizes: dict[str, int],
                 aggregate_every: int = 100, weighted: bool = False):
        if model.lora_layers[0] != 0:
            raise ValueError("SplitLoRA needs LoRA on the device blocks too (lora_layers from 0)")
        self.model = model
        self.split = split
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        device_params = [p for n, p in named if (layer_of(n) is not None and layer_of(n) < split)]
        server_params = [p for n, p in named if not (layer_of(n) is not None and layer_of(n) < split)]
        self.trainer = Trainer(model, settings, params=server_params)
        self.devices = DeviceStates(device_params, sorted(shard_sizes))
        self.optims = {d: Optimizer(device_params, settings) for d in shard_sizes}
        self.shard_sizes = shard_sizes
        self.aggregate_every = aggregate_every
        self.weighted = weighted
        self.device_s = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        #: The gradient at the cut that the last step sent down to its device.
        self.last_cut_gradient: torch.Tensor | None = None

    def device_forward(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The device's half, forward: its LoRA in place, (activations with their graph, the cut leaf)."""
        self.devices.activate(batch.device)
        self.model.train()
        hidden = self.model.device_forward(batch.input_ids, batch.attention_mask, self.split)
        return hidden, hidden.detach().requires_grad_(True)  # what travels up; its gradient travels down

    def device_backward(self, batch: TokenBatch, hidden: torch.Tensor, cut_gradient: torch.Tensor) -> None:
        """The device's half, backward: the returned gradient through its blocks, its LoRA updated."""
        hidden.backward(cut_gradient)
        self.optims[batch.device].update()
        self.devices.store(batch.device)

    def step(self, batch: TokenBatch) -> StepResult:
        batch = batch.to(self.model.device)
        started = time.perf_counter()
        hidden, cut = self.device_forward(batch)
        device_s = time.perf_counter() - started

        def device_backward() -> None:
            nonlocal device_s
            t0 = time.perf_counter()
            self.last_cut_gradient = cut.grad.detach()
            self.device_backward(batch, hidden, cut.grad)
            device_s += time.perf_counter() - t0

        result = self.trainer.step_with(lambda: self.model(cut, batch.attention_mask), batch.labels,
                                        after_backward=device_backward)
        result.device_s = device_s
        # fp32 activations up and their gradient down, as the reference sends them.
        result.bytes_up = result.bytes_down = cut.numel() * 4
        result.seconds -= device_s
        self.device_s += device_s
        self.bytes_up += result.bytes_up
        self.bytes_down += result.bytes_down
        return result

    def after_step(self, result: StepResult) -> None:
        if self.aggregate_every and result.step % self.aggregate_every == 0:
            self.aggregate()

    def aggregate(self) -> None:
        """Average the devices' LoRA; every device continues from the average."""
        n = len(self.devices.states)
        self.bytes_up += n * self.devices.nbytes
        self.bytes_down += n * self.devices.nbytes
        average = self.devices.average(self.shard_sizes if self.weighted else None)
        self.devices.set_all(average)
        self.devices.load(average)

    def finish(self) -> None:
        self.aggregate()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The unsplit model with the devices' averaged LoRA (what the federation ends with)."""
        self.devices.load(self.devices.average(self.shard_sizes if self.weighted else None))
        return self.model.full_forward(input_ids, attention_mask)

    def save_adapter(self, folder: Path) -> None:
        self.devices.load(self.devices.average(self.shard_sizes if self.weighted else None))
        self.model.save_adapter(folder)
