"""Device-side trainable state for the baselines: each device's own copy of some parameters.

SplitLoRA devices each train their own LoRA on blocks 0..k-1; FedLoRA clients each train their
own LoRA on every block. In one process they share a single model: before a device's step its
values are loaded into the model's parameters, after it they are read back. Averaging is FedAvg
over the factors (A and B separately) — which is not the average of the products B·A:
mean(B)·mean(A) differs from mean(B·A) unless the clients' A factors agree (FFA-LoRA freezes A
at its shared initial value exactly so that they do, and its average is the average model).
"""

from __future__ import annotations

from typing import Sequence

import torch


def fedavg(states: Sequence[list[torch.Tensor]], weights: Sequence[float] | None = None) -> list[torch.Tensor]:
    """The weighted mean of each parameter over ``states`` (plain mean if ``weights`` is None)."""
    if not states:
        raise ValueError("nothing to average")
    w = torch.tensor([1.0] * len(states) if weights is None else [float(x) for x in weights], dtype=torch.float64)
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    return [sum(float(w[i]) * s[j].double() for i, s in enumerate(states)).to(states[0][j].dtype) for j in range(len(states[0]))]


class DeviceStates:
    """One value per device for each of ``params`` (tensors shared with the model)."""

    def __init__(self, params: list[torch.nn.Parameter], devices: Sequence[str]):
        self.params = params
        start = self.snapshot()
        self.states: dict[str, list[torch.Tensor]] = {d: [t.clone() for t in start] for d in devices}

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def load(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.copy_(v)

    def activate(self, device: str) -> None:
        """Put ``device``'s values into the model."""
        self.load(self.states[device])

    def store(self, device: str) -> None:
        """Read the model's values back as ``device``'s."""
        self.states[device] = self.snapshot()

    def average(self, weights: dict[str, float] | None = None) -> list[torch.Tensor]:
        names = sorted(self.states)
        return fedavg([self.states[d] for d in names], None if weights is None else [weights[d] for d in names])

    def set_all(self, values: list[torch.Tensor]) -> None:
        for d in self.states:
            self.states[d] = [v.clone() for v in values]

    @property
    def nbytes(self) -> int:
        """Bytes of one device's state (what an upload or download of it moves, fp32)."""
        return sum(p.numel() * 4 for p in self.params)


def layer_of(name: str) -> int | None:
    """The block index in a parameter name (``...layers.3...`` or ``...h.3...``), or None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
