"""The optimisation step: AdamW with warm-up and clipping, and the step on a batch of activations.

Every method builds on these two parts: :class:`Optimizer` (what an update is, over any set of
trainable parameters: the server's LoRA + head, or a device's LoRA) and :class:`Trainer` (one step
on activations: forward from the cut, the task's loss, backward, update). Nothing here knows where
batches come from, and nothing assumes a single process (a distributed wrapper only has to
average the trainable parameters' gradients in ``before_update``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from sftool.server.mixing import TrainBatch
from sftool.settings import OptimSettings
from sftool.training.distributed import SINGLE, RankGroup
from sftool.training.task import ClassificationTask, Task


@dataclass
class StepResult:
    step: int
    loss: float
    correct: int
    size: int
    seconds: float
    #: Seconds of this step spent in device-side computation (0 where devices are not simulated here).
    device_s: float = 0.0
    #: Bytes that travelled device -> server and server -> device for this step.
    bytes_up: int = 0
    bytes_down: int = 0
    #: The step was not applied: its loss or gradients were not finite (the batch is refused).
    refused: bool = False
    #: Samples the global step trained over every server rank; 0: ``size`` alone (one process).
    global_size: int = 0
    #: What the loss and ``correct`` count over: samples, or labelled tokens (causal LM); 0: ``size``.
    counted: int = 0

    @property
    def items(self) -> int:
        return self.counted or self.size


class Optimizer:
    """AdamW over ``params`` with linear warm-up and gradient-norm clipping."""

    def __init__(self, params: list[torch.nn.Parameter], settings: OptimSettings):
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.params = params
        self.settings = settings
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        warmup = max(1, settings.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))

    def update(self, before_update: Callable[[], None] | None = None) -> bool:
        """Apply the accumulated gradients, advance the schedule, clear the gradients.

        Returns False, changing nothing but the gradients (cleared), when they are not finite: one
        such update would make every weight, and every later loss, NaN."""
        if before_update is not None:
            before_update()  # e.g. all-reduce of gradients across server ranks
        # An infinite max norm measures without clipping.
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm or float("inf"))
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def reset_moments(self) -> None:
        """Forget AdamW's moment estimates (a federated client starting a round from new weights)."""
        self.optimizer.state.clear()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class Trainer:
    """One step on a batch of activations: the model's forward from the cut, the task's loss,
    backward (LoRA + head only), update. Keeps the step count and a running loss/accuracy."""

    def __init__(
        self,
        model: torch.nn.Module,
        settings: OptimSettings,
        params: list[torch.nn.Parameter] | None = None,
        task: Task | None = None,
        ranks: RankGroup = SINGLE,
    ):
        self.model = model
        self.settings = settings
        #: The server ranks that train one global batch per step (``sftool.training.distributed``).
        self.ranks = ranks
        self.task: Task = task or getattr(model, "task", None) or ClassificationTask()
        params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.optim = Optimizer(params, settings)
        self.step_count = 0
        self._recent: deque[tuple[float, int, int]] = deque(maxlen=50)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optim.optimizer

    def step(self, batch: TrainBatch, before_update: Callable[[], None] | None = None) -> StepResult:
        """Forward, loss, backward (LoRA + head only), optimizer step."""
        return self.step_with(lambda: self.model(batch.hidden, batch.attention_mask), batch.labels, before_update)

    def step_with(
        self,
        forward: Callable[[], torch.Tensor],
        labels: torch.Tensor,
        before_update: Callable[[], None] | None = None,
        after_backward: Callable[[], None] | None = None,
    ) -> StepResult:
        """One step of any method: ``forward()`` gives the logits, the task gives the loss.

        ``after_backward`` runs once the gradients exist (SplitLoRA sends the cut gradient to its
        device there); ``before_update`` just before the parameters change.
        """
        started = time.perf_counter()
        self.model.train()
        logits = forward()
        loss = self.task.loss(logits, labels)
        score = self.task.score(logits.detach(), labels)
        finite = bool(torch.isfinite(loss.detach()))
        samples = int(labels.shape[0])
        if self.ranks.distributed:
            return self._global_step(loss if finite else None, score, samples, started, before_update, after_backward)
        if not finite:
            # Never applied: the batch is refused (the loop flags where it came from).
            self.optim.optimizer.zero_grad(set_to_none=True)
            return self._refused(float(loss.detach()), samples, score.count, started)
        loss.backward()
        if after_backward is not None:
            after_backward()
        if not self.optim.update(before_update):
            return self._refused(float(loss.detach()), samples, score.count, started)
        self.step_count += 1
        result = StepResult(self.step_count, float(loss.detach()), score.correct, samples, time.perf_counter() - started,
                            counted=score.count)
        self.record(result)
        return result

    def _refused(self, loss: float, samples: int, counted: int, started: float) -> StepResult:
        """A step that changed nothing: its batch is settled untrained (the loop flags where it came from)."""
        return StepResult(self.step_count, loss, 0, samples, time.perf_counter() - started, refused=True, counted=counted)

    def idle_step(self) -> StepResult | None:
        """This rank has no batch this turn but another has: take part in the global step with
        nothing (count 0, zero gradients). None when no rank had anything to train."""
        started = time.perf_counter()
        return self._global_step(None, None, 0, started, None, None)

    def _global_step(self, loss, score, samples: int, started: float, before_update, after_backward) -> StepResult | None:
        """One step of the global batch (see ``sftool.training.distributed``): weight this rank's
        mean by its share of the global count, sum the gradients over the ranks, update alike."""
        device = next(iter(self.optim.params)).device
        local = score.count if (score is not None and loss is not None) else 0
        total, total_samples = self.ranks.global_totals(local, samples if local else 0, device)
        if total == 0:  # nothing finite anywhere: every rank refuses together
            self.optim.optimizer.zero_grad(set_to_none=True)
            return None if score is None else self._refused(float("nan"), samples, score.count, started)
        if local:
            (loss * (local / total)).backward()
        if after_backward is not None:
            after_backward()

        def reduce() -> None:
            self.ranks.sum_gradients(self.optim.params)
            if before_update is not None:
                before_update()

        applied = self.optim.update(reduce)
        if applied:
            self.step_count += 1
        trained = total_samples if applied else 0
        if score is None:
            return StepResult(self.step_count, float("nan"), 0, 0, time.perf_counter() - started,
                              refused=not applied, global_size=trained)
        value = float(loss.detach()) if loss is not None else float("nan")
        refused = not applied or loss is None
        result = StepResult(self.step_count, value, 0 if refused else score.correct, samples,
                            time.perf_counter() - started, refused=refused, global_size=trained, counted=score.count)
        if not refused:
            self.record(result)
        return result

    def record(self, result: StepResult) -> None:
        """Count a step in the running loss and accuracy (also for steps a method runs itself)."""
        self._recent.append((result.loss * result.items, result.correct, result.items))

    @property
    def recent_loss(self) -> float:
        n = sum(s for _, _, s in self._recent)
        return sum(loss for loss, _, _ in self._recent) / n if n else float("nan")

    @property
    def recent_accuracy(self) -> float:
        n = sum(s for _, _, s in self._recent)
        return sum(c for _, c, _ in self._recent) / n if n else float("nan")

    def state_dict(self) -> dict:
        return {**self.optim.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)
        self.step_count = int(state["step"])
