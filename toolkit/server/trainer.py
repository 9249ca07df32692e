"""One optimisation step on a batch of activations; the only training step in sftool.

The streaming server, the experiments and the baselines all call ``Trainer.step``; nothing here
knows where batches come from, and nothing assumes a single process (a distributed wrapper
only has to average the trainable parameters' gradients before ``optimizer.step``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from sftool.server.mixing import TrainBatch


@dataclass
class OptimSettings:
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class StepResult:
    step: int
    loss: float
    correct: int
    size: int
    seconds: float


class Trainer:
    """AdamW over the trainable (LoRA + head) parameters, linear warm-up, gradient clipping."""

    def __init__(self, model: torch.nn.Module, settings: OptimSettings, params: list[torch.nn.Parameter] | None = None):
        self.model = model
        self.settings = settings
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        warmup = max(1, settings.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        self.step_count = 0
        self._recent: deque[tuple[float, int, int]] = deque(maxlen=50)

    def step(self, batch: TrainBatch, before_update: Callable[[], None] | None = None) -> StepResult:
        """Forward, loss, backward (LoRA + head only), optimizer step."""
        import time

        started = time.perf_counter()
        self.model.train()
        logits = self.model(batch.hidden, batch.attention_mask)
        loss = F.cross_entropy(logits, batch.labels)
        loss.backward()
        if before_update is not None:
            before_update()  # e.g. all-reduce of gradients across server ranks
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        correct = int((logits.detach().argmax(-1) == batch.labels).sum())
        result = StepResult(self.step_count, float(loss.detach()), correct, len(batch.labels), time.perf_counter() - started)
        self._recent.append((result.loss * result.size, result.correct, result.size))
        return result

    @property
    def recent_loss(self) -> float:
        n = sum(s for _, _, s in self._recent)
        return sum(loss for loss, _, _ in self._recent) / n if n else float("nan")

    @property
    def recent_accuracy(self) -> float:
        n = sum(s for _, _, s in self._recent)
        return sum(c for _, c, _ in self._recent) / n if n else float("nan")

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step_count,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
